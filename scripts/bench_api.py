"""The read API's speed: bars over HTTP against reading them straight from the database.

    python scripts/bench_api.py [--bars 1000000] [--clients 20] [--requests 25] [--json PATH]

On a fresh `marketdata_bench_api` database (the embedded PostgreSQL, or the server of
DATABASE_URL): one crypto symbol's minute bars (24/7, so one day is 1,440 bars), random
full-precision doubles with a few vwap and trades NULL. `marketdata serve` runs as its own
process on loopback; the clients are this process. Each figure is the best of three runs.

- COPY TO: the same SELECT read by psycopg straight from the database, binary and CSV, into
  memory (the bytes, not decoded): the database's own limit for a Python consumer.
- Arrow: GET /v1/bars?format=arrow, the whole range streamed, read into a polars DataFrame.
- JSON: the same bars as JSON pages of 50,000 following `next`, read into one DataFrame.
- Latency: --clients threads, each with its own key, ask --requests times each for one
  random day of minute bars (JSON, then Arrow); p50 and p99 of the request times.
- Refusals: the median time of a 401 for a near miss of the real key, an unknown key and a
  malformed one, interleaved: they should not differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
from bench import free_port, fresh_database, machine
from psycopg import sql

from marketdata_pipeline import config
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.registry import api_keys, symbols
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded, migrations
from marketdata_pipeline.warehouse.reading import BarRange, BarSize

DATABASE = "marketdata_bench_api"
SYMBOL = "BTC"
FIRST_BAR = datetime(2022, 1, 1, tzinfo=UTC)


JSON_SCHEMA = {
    "ts": pl.String,
    **{c: pl.Float64 for c in ("open", "high", "low", "close", "volume", "vwap")},
    "trades": pl.Int64,
}


def prepare(url: str, bars: int) -> str:
    """Migrate, register the symbol, store `bars` minute bars; returns an API key."""
    with db.connection(url) as conn:
        migrations.migrate(conn)
        symbols.add(conn, SYMBOL, AssetClass.CRYPTO)
        conn.execute("SELECT setseed(0.5)")
        conn.execute(
            "INSERT INTO bars_minute SELECT %s, %s::timestamptz + n * interval '1 minute', "
            "100 + random(), 101 + random(), 99 + random(), 100 + random(), random() * 5, "
            "CASE WHEN random() < 0.02 THEN NULL ELSE 100 + random() END, "
            "CASE WHEN random() < 0.02 THEN NULL ELSE (random() * 900)::int END "
            "FROM generate_series(0, %s - 1) n",
            (SYMBOL, FIRST_BAR, bars),
        )
        conn.execute("ANALYZE bars_minute")
        return api_keys.create(conn, "bench")[1]


@contextmanager
def api_server(url: str, log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "marketdata_pipeline", "serve", "--port", str(port),
             "--rate-limit", "1000000/minute"],
            env={**os.environ, "DATABASE_URL": url},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, log, "marketdata serve")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_serving(base: str, log: Path, what: str) -> None:
    """Until the API at `base` answers (30 s), or exit with the server's log."""
    for _ in range(150):
        try:
            httpx.get(f"{base}/v1/openapi.json", timeout=2).raise_for_status()
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"bench: {what} did not start: {log.read_text()}")


def best_of_three(run: Callable[[], int], expected: int) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        got = run()
        times.append(time.perf_counter() - started)
        if got != expected:
            raise SystemExit(f"bench: read {got:,} bars, expected {expected:,}")
    return min(times)


def copy_to(url: str, fmt: str, bars: BarRange) -> Callable[[], int]:
    def run() -> int:
        with db.connection(url) as conn, conn.cursor() as cur:  # a new session, as a client
            statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT {})").format(
                bars.select(), sql.SQL(fmt)
            )
            with cur.copy(statement) as copy:
                body = b"".join(bytes(chunk) for chunk in copy)
            return cur.rowcount if body else 0

    return run


def arrow_over_http(client: httpx.Client, query: str) -> Callable[[], int]:
    def run() -> int:
        response = client.get(f"{query}&format=arrow")
        response.raise_for_status()
        return pl.read_ipc_stream(response.content).height

    return run


def json_over_http(client: httpx.Client, query: str) -> Callable[[], int]:
    """The pages into one DataFrame, typed as the Arrow one: the same end product."""

    def run() -> int:
        frames, url = [], f"{query}&format=json&limit=50000"
        while url:
            page = client.get(url)
            page.raise_for_status()
            body = page.json()
            frames.append(pl.DataFrame(body["bars"], schema=JSON_SCHEMA))
            url = body["next"]
        bars = pl.concat(frames).with_columns(
            pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_unit="us", time_zone="UTC")
        )
        return bars.height

    return run


def latencies(base: str, keys: list[str], days: int, requests: int, fmt: str) -> list:
    """Seconds of each one-day request, a thread per key at once (a stream is at most two a
    key: these are separate consumers)."""
    times: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(keys))

    def client(seed: int) -> None:
        try:
            ask(seed)
        except BaseException as failure:
            failures.append(failure)
            raise

    def ask(seed: int) -> None:
        pick = random.Random(seed)
        headers = {"X-API-Key": keys[seed]}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            barrier.wait()
            for _ in range(requests):
                day = (FIRST_BAR + timedelta(days=pick.randrange(days))).date()
                started = time.perf_counter()
                response = http.get(
                    f"/v1/bars/{SYMBOL}?timeframe=minute&start={day}&end={day}&format={fmt}"
                    + ("&limit=2000" if fmt == "json" else "")
                )
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                with lock:
                    times.append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(keys))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"bench: {len(failures)} client(s) failed, first: {failures[0]}")
    return times


def refusal_times(base: str, key: str, requests: int) -> dict[str, float]:
    """Median seconds of a 401 for keys near the real one and far from it, interleaved."""
    keys = {
        "near miss (last character)": key[:-1] + ("A" if key[-1] != "A" else "B"),
        "unknown, well-formed": api_keys.generate_key(),
        "malformed": "x" * len(key),
    }
    times: dict[str, list[float]] = {name: [] for name in keys}
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(requests):
            for name, candidate in keys.items():
                started = time.perf_counter()
                status = http.get("/v1/health", headers={"X-API-Key": candidate}).status_code
                times[name].append(time.perf_counter() - started)
                if status != 401:
                    raise SystemExit(f"bench: a {name} key got {status}, not 401")
    return {name: statistics.median(values) for name, values in times.items()}


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    url = fresh_database(config.database_url() or embedded.start(), DATABASE)
    print(f"storing {args.bars:,} minute bars of {SYMBOL} ...", flush=True)
    key = prepare(url, args.bars)
    end = FIRST_BAR + timedelta(minutes=args.bars)
    whole = BarRange(SYMBOL, BarSize.MINUTE, FIRST_BAR, end)
    query = f"/v1/bars/{SYMBOL}?timeframe=minute&start={FIRST_BAR:%Y-%m-%dT%H:%M:%SZ}"
    query += f"&end={end:%Y-%m-%dT%H:%M:%SZ}"
    log = config.marketdata_home() / "bench_api_serve.log"  # the server's own output
    log.parent.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {}
    with api_server(url, log) as base:
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=600) as client:
            for name, run in (
                ("copy_binary_s", copy_to(url, "binary", whole)),
                ("copy_csv_s", copy_to(url, "csv", whole)),
                ("arrow_http_s", arrow_over_http(client, query)),
                ("json_http_s", json_over_http(client, query)),
            ):
                figures[name] = best_of_three(run, args.bars)
                print(f"  {name}: {figures[name]:.2f} s", flush=True)
        refusals = refusal_times(base, key, 200)
        days = max(1, args.bars // 1440)
        with db.connection(url) as conn:
            consumers = [api_keys.create(conn, f"client {i}")[1] for i in range(args.clients)]
        for fmt in ("json", "arrow"):
            times = latencies(base, consumers, days, args.requests, fmt)
            figures[f"day_{fmt}_p50_ms"] = percentile(times, 0.50) * 1000
            figures[f"day_{fmt}_p99_ms"] = percentile(times, 0.99) * 1000
            figures[f"day_{fmt}_requests"] = len(times)
    copy_best = min(figures["copy_binary_s"], figures["copy_csv_s"])
    figures["arrow_vs_copy"] = copy_best / figures["arrow_http_s"]
    figures["arrow_vs_json"] = figures["json_http_s"] / figures["arrow_http_s"]
    about = machine(url)
    print(f"\nmachine:  {about['cpu']}; {about['os']}; Python {about['python']}")
    print(f"database: {about['database']}\n")
    n = f"{args.bars:,} minute bars"
    print(f"COPY TO, binary, psycopg into memory     {figures['copy_binary_s']:6.2f} s  {n}")
    print(f"COPY TO, CSV, psycopg into memory        {figures['copy_csv_s']:6.2f} s")
    print(f"Arrow IPC over HTTP into a DataFrame     {figures['arrow_http_s']:6.2f} s")
    print(f"JSON pages over HTTP into a DataFrame    {figures['json_http_s']:6.2f} s")
    verdict = {True: "met", False: "MISSED"}
    ratio = figures["arrow_vs_copy"]
    print(f"\nArrow vs the faster COPY TO   {ratio:5.2f}x  target >= 0.5x  {verdict[ratio >= 0.5]}")
    ratio = figures["arrow_vs_json"]
    print(f"Arrow vs JSON                 {ratio:5.1f}x  target >= 10x   {verdict[ratio >= 10]}")
    for fmt in ("json", "arrow"):
        print(
            f"one day of minute bars ({fmt}), {args.clients} clients, "
            f"{figures[f'day_{fmt}_requests']:.0f} requests: p50 "
            f"{figures[f'day_{fmt}_p50_ms']:.0f} ms, p99 {figures[f'day_{fmt}_p99_ms']:.0f} ms"
        )
    print("401 for a refused key, median of 200 each: " + ", ".join(
        f"{name} {seconds * 1000:.2f} ms" for name, seconds in refusals.items()
    ))  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"machine": about, **figures, "refusals": refusals}, indent=2)
        )


if __name__ == "__main__":
    main()
