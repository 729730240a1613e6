"""Benchmark the Polygon client: page decoding, and fetching minute bars from the simulator.

    python scripts/bench_polygon.py [--bars 1000000]

Prints bars per second for (1) decoding one 50,000-bar page into a typed frame and (2)
fetching N minute bars from the simulator over a real loopback socket, with the simulator's
pages rendered before timing so its own cost is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date, timedelta

import httpx

from marketdata_pipeline.polygon import PolygonClient, decode_page
from marketdata_pipeline.simulator import Simulator, serve

TICKER = "X:BTCUSD"  # 1,440 bars every day, so N bars is a whole number of days


def bench_decode(sim: Simulator, repeats: int = 7) -> float:
    with httpx.Client(transport=sim.transport(), base_url="http://sim") as http:
        content = http.get(
            f"/v2/aggs/ticker/{TICKER}/range/1/minute/2024-01-01/2024-03-31?limit=50000"
        ).content
    assert decode_page(content, ticker=TICKER, adjusted=True).frame.height == 50_000
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode_page(content, ticker=TICKER, adjusted=True)
        timings.append(time.perf_counter() - started)
    return 50_000 / statistics.median(timings)


def bench_fetch(sim: Simulator, bars: int) -> tuple[float, int, int]:
    server = serve(sim)
    first = date(2023, 1, 1)
    last = first + timedelta(days=-(-bars // 1440) - 1)
    client = PolygonClient(None, server.url)
    try:
        expected = client.aggregates(TICKER, 1, "minute", first, last).height  # renders pages
        before = len(sim.requests)
        started = time.perf_counter()
        pages = client.aggregate_pages(TICKER, 1, "minute", first, last)
        fetched = sum(page.frame.height for page in pages)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        server.shutdown()
    assert fetched == expected
    return fetched / elapsed, fetched, len(sim.requests) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000, help="minute bars to fetch")
    args = parser.parse_args()
    sim = Simulator(cache_pages=args.bars // 50_000 + 4)
    decode_rate = bench_decode(sim)
    fetch_rate, fetched, pages = bench_fetch(sim, args.bars)
    machine = f"{platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} cores"
    print(f"machine:                       {machine}")
    print(f"decode one 50,000-bar page:    {decode_rate:>12,.0f} bars/s")
    print(f"fetch {fetched:,} minute bars:  {fetch_rate:>12,.0f} bars/s ({pages} pages, loopback)")
    print(
        json.dumps(
            {
                "machine": machine,
                "decode_bars_per_s": round(decode_rate),
                "fetch_bars": fetched,
                "fetch_pages": pages,
                "fetch_bars_per_s": round(fetch_rate),
            }
        )
    )


if __name__ == "__main__":
    main()
