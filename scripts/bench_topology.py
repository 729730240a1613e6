"""The same Dagster backfill through the distributed topology and through `dagster dev`.

    python scripts/bench_topology.py [--symbols 4] [--months 3] [--repeat 3] [--json PATH]

A backfill of `stock_minute_bars` over S symbols x M months (from 2024-01), launched through
the webserver's GraphQL API as the UI's Materialize dialog does, run by the daemon, each run
launched through the code server (the default run launcher), timed:

- topology: the code location as its own gRPC code server with two replicas behind a
  round-robin TCP proxy standing for a Kubernetes Service, `dagster-webserver` and
  `dagster-daemon run` as separate processes (tests/topology.py, as the topology test runs it);
- dagster dev: `dagster dev` on the shipped workspace.yaml, one process tree starting its own
  code server (what `marketdata ui` runs).

Both on the same warehouse (the embedded PostgreSQL, or the server of DATABASE_URL, whose role
must be able to create databases), emptied of bars before each backfill, with a new Dagster
instance database each time (the shipped dagster.yaml), and the Polygon simulator in its own
process with every page rendered before timing. The ways alternate, topology first in each
pair; the ratio is taken pair by pair.

Two figures per backfill, from the times Dagster recorded: from the launch to the last run's
end, and from the first run's creation to the last run's end. The first includes the wait for
the backfill daemon, which looks every 30 s, at a moment neither way chooses (a uniform wait
of 0-30 s): the second, the backfill's own work, is what the ratio target is on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import date
from pathlib import Path

import dagster as dg
from bench import dagster_dev, fresh_database, machine, months_from, render, simulator_process

from marketdata_pipeline import config
from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.defs.partitions import partition_key
from marketdata_pipeline.defs.sensors import register_symbol_partitions
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.registry.splits import replace_splits
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from tests.topology import GraphQL, dagster_home, finished_backfill, launch_backfill, topology

WAREHOUSE, INSTANCE = "marketdata_bench_topology", "dagster_bench_topology"
FIRST_MONTH = date(2024, 1, 1)
ASSET = "stock_minute_bars"
WAYS = ("topology", "dagster dev")
# What a bars run writes: emptied before each backfill, so that each loads the same bars.
RUN_TABLES = "bars_minute, bars_rejected, backfill_state, loaded_months, polygon_requests"


def parse_args() -> argparse.Namespace:
    stocks = [s.symbol for s in DEFAULT_SYMBOLS if s.asset_class is AssetClass.STOCK]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--symbols", type=int, default=4, help=f"stock symbols, 1..{len(stocks)}")
    parser.add_argument("--months", type=int, default=3, help=f"months from {FIRST_MONTH:%Y-%m}")
    parser.add_argument("--repeat", type=int, default=3, help="backfills through each way")
    parser.add_argument("--json", type=Path, help="default: $MARKETDATA_HOME/bench_topology.json")
    args = parser.parse_args()
    if not 1 <= args.symbols <= len(stocks) or not 1 <= args.months <= 24 or args.repeat < 1:
        parser.error(f"--symbols 1..{len(stocks)}, --months 1..24, --repeat 1 or more")
    args.stocks = stocks[: args.symbols]
    return args


@contextmanager
def the_topology(home: Path, env: dict[str, str]) -> Iterator[GraphQL]:
    """The topology as a GraphQL client (what dagster_dev yields); the daemon starts with the
    webserver, as under `dagster dev`."""
    with topology(home, env, with_daemon=True) as started:
        yield started.query


def backfill(
    way: str, admin_url: str, url: str, env: dict[str, str], keys: list[str], work: Path
) -> dict[str, float]:
    """One backfill through `way` on a new instance; its figures in seconds."""
    home = work / "dagster"
    shutil.rmtree(work, ignore_errors=True)
    instance_url = db.psycopg2_url(fresh_database(admin_url, INSTANCE))
    env = env | dagster_home(home, instance_url)
    os.environ.update(dagster_home(home, instance_url))  # read by the instance config below
    with dg.DagsterInstance.from_config(str(home)) as instance, db.connection(url) as conn:
        register_symbol_partitions(instance, conn)
        conn.execute(f"TRUNCATE {RUN_TABLES}")
        conn.commit()
    start: Callable[[], AbstractContextManager[GraphQL]] = (
        (lambda: the_topology(home, env))
        if way == "topology"
        else (lambda: dagster_dev(env, work / "dagster-dev.log"))
    )
    with start() as query:
        launched = time.time()
        backfill_id = launch_backfill(query, ASSET, keys)
        status, runs = finished_backfill(query, backfill_id, 1800)
    failed = [run["runId"] for run in runs if run["status"] != "SUCCESS"]
    if status != "COMPLETED_SUCCESS" or failed:
        raise SystemExit(f"bench: the backfill ended {status}, failed runs {failed}; see {work}")
    first_created = min(run["creationTime"] for run in runs)
    last_end = max(run["endTime"] for run in runs)
    return {
        "runs": len(runs),
        "launch_to_last_end": last_end - launched,
        "first_run_to_last_end": last_end - first_created,
        "wait_for_daemon": first_created - launched,
    }


def spread(values: list[float]) -> str:
    return f"{min(values):6.1f} {statistics.median(values):6.1f} {max(values):6.1f}"


def main() -> None:
    args = parse_args()
    os.environ["MARKETDATA_ALLOW_SYNTHETIC"] = "1"  # its own database takes simulator bars
    months = months_from(FIRST_MONTH, args.months)
    admin_url = config.database_url() or embedded.start()
    url = fresh_database(admin_url, WAREHOUSE)
    work = config.marketdata_home() / "bench_topology"
    keys = [str(partition_key(month, symbol)) for symbol in args.stocks for month in months]
    results: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with simulator_process() as base_url:
        print(f"rendering {args.symbols} symbols x {args.months} months ...", flush=True)
        with PolygonClient(None, base_url) as client, db.connection(url) as conn:
            bootstrap(conn)
            bars = sum(render(client, symbol, months).height for symbol in args.stocks)
            # The splits fetched beforehand: the registry sensor's first tick on a new instance
            # then asks for no splits run beside the backfill.
            for seed in DEFAULT_SYMBOLS:
                if seed.asset_class is not AssetClass.CRYPTO:
                    replace_splits(conn, seed.symbol, client.splits(seed.symbol))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DAGSTER_"))}
        env |= {
            "DATABASE_URL": url,
            "POLYGON_BASE_URL": base_url,
            "MARKETDATA_SIMULATED": "1",
            "MARKETDATA_HISTORY_START": f"{FIRST_MONTH:%Y-%m}",
            "MARKETDATA_HOME": str(work),
        }
        os.environ["MARKETDATA_HISTORY_START"] = env["MARKETDATA_HISTORY_START"]
        for repeat in range(args.repeat):
            for way in WAYS:
                figures = backfill(way, admin_url, url, env, keys, work / way.replace(" ", "-"))
                with db.connection(url) as conn:
                    [(stored,)] = conn.execute("SELECT count(*) FROM bars_minute").fetchall()
                if stored != bars:
                    raise SystemExit(f"bench: {way} stored {stored:,} bars, not {bars:,}")
                results[way].append(figures)
                print(
                    f"  {repeat + 1}/{args.repeat} {way}: {figures['runs']:.0f} runs, "
                    f"first run to last end {figures['first_run_to_last_end']:.1f} s, "
                    f"launch to last end {figures['launch_to_last_end']:.1f} s",
                    flush=True,
                )
    about = machine(url)
    print(f"\nmachine:  {about['cpu']}; {about['os']}; Python {about['python']}")
    print(
        f"workload: {ASSET}, {args.symbols} symbols x {args.months} months from "
        f"{FIRST_MONTH:%Y-%m} ({bars:,} bars, {results[WAYS[0]][0]['runs']:.0f} runs), "
        f"{args.repeat} backfills each way\n"
    )
    print(f"{'seconds (min median max)':<36} {'topology':>20}  {'dagster dev':>20}  ratio")
    ratios: dict[str, float] = {}
    for figure, label in (
        ("first_run_to_last_end", "first run created -> last run end"),
        ("launch_to_last_end", "GraphQL launch -> last run end"),
        ("wait_for_daemon", "  of which waiting for the daemon"),
    ):
        per_way = [[r[figure] for r in results[way]] for way in WAYS]
        pairs = [a / b for a, b in zip(*per_way, strict=True) if b > 0]
        ratios[figure] = statistics.median(pairs) if pairs else float("nan")
        shown = f"{ratios[figure]:.2f}x" if figure != "wait_for_daemon" else ""
        print(f"{label:<36} {spread(per_way[0]):>20}  {spread(per_way[1]):>20}  {shown}")
    met = ratios["first_run_to_last_end"] <= 1.2
    print(
        f"\ntopology / dagster dev, the backfill's own work (median of pairs): "
        f"{ratios['first_run_to_last_end']:.2f}x, target at most 1.2x: "
        f"{'met' if met else 'MISSED'}"
    )
    output = args.json or config.marketdata_home() / "bench_topology.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "machine": about,
                "workload": {"symbols": args.stocks, "months": args.months, "bars": bars},
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"figures: {output}")


if __name__ == "__main__":
    main()
