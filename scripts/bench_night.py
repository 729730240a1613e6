"""What a night costs: requests, wall time and Dagster runs of the nightly stock refresh.

    python scripts/bench_night.py [--symbols 20 500] [--json PATH]

For each symbol count, on a fresh `marketdata_bench_night` database (the embedded PostgreSQL,
or the server of DATABASE_URL) and the Polygon simulator on loopback (in this process, so its
rendering is inside the wall time of both ways alike):

1. the night before: every symbol's daily and minute bars of the refresh months loaded whole,
   with the simulator's clock on the evening of the session before the last complete one;
2. the clock moves to the evening of the last complete session, and the night is loaded:
   - now: what the schedule's runs do, new days only: stock daily bars from the grouped
     daily endpoint when that is fewer requests, minute bars one request stream per symbol
     from the day of its latest stored bar;
   - before (issue 12): the refresh months reloaded whole, one request stream per symbol;
   both leave the same bars, which the script checks.

Dagster runs per night are counted from the schedules' run requests: before, one run per
(month, symbol); now, one per bars asset. Their start-up cost is not part of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path

from bench import fresh_database, machine

from marketdata_pipeline import config
from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.pipeline import (
    grouped_saves_requests,
    ingest_grouped,
    ingest_windows,
    new_days,
)
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.polygon.simulator import Simulator, serve
from marketdata_pipeline.quality.calendars import last_complete_session, refresh_months, sessions
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded, migrations

DATABASE = "marketdata_bench_night"


def symbols(count: int) -> list[str]:
    return [f"S{i:04d}" for i in range(count)]


def evening(day: date) -> datetime:
    return datetime.combine(day, clock(21), Market.STOCK.zone)


def load(
    url: str, base_url: str, timeframe: Timeframe, plan: dict[str, list[Window]], grouped: bool
) -> int:
    """Load the plan's windows; the bars loaded."""
    windows = [w for ws in plan.values() for w in ws]
    with PolygonClient(None, base_url) as client, db.connection(url) as conn:
        if grouped:
            outcomes = list(ingest_grouped(client, conn, windows))
        else:
            outcomes = [o for ws in plan.values() for o in ingest_windows(client, conn, ws)]
    refused = [o.refused for o in outcomes if o.refused]
    if refused:
        raise SystemExit(f"bench_night: a load was refused: {refused[0]}")
    return sum(o.load.rows_loaded for o in outcomes if o.load)


def whole_months(
    timeframe: Timeframe, names: list[str], months: list[date]
) -> dict[str, list[Window]]:
    return {s: [Window.of_month(Market.STOCK, timeframe, s, m) for m in months] for s in names}


def stored(url: str, timeframe: Timeframe) -> int:
    with db.connection(url) as conn:
        [(count,)] = conn.execute(f"SELECT count(*) FROM {timeframe.table}").fetchall()
    return int(count)


def measure(admin_url: str, count: int) -> tuple[str, list[dict[str, object]]]:
    url = fresh_database(admin_url, DATABASE)
    with db.connection(url) as conn:
        migrations.migrate(conn)
    names = symbols(count)
    sim = Simulator(listed=names)
    server = serve(sim)
    through = last_complete_session(Market.STOCK, datetime.now(UTC))
    before = sessions(Market.STOCK, through - timedelta(days=10), through)[-2]
    months = refresh_months(Market.STOCK, evening(through))
    rows = []
    try:
        sim.now = evening(before)
        for timeframe in Timeframe:
            load(url, server.url, timeframe, whole_months(timeframe, names, months), False)
        sim.now = evening(through)
        for timeframe in Timeframe:
            for way in ("now: new days", "before: whole months"):
                sim.requests.clear()
                started = time.perf_counter()
                if way.startswith("now"):
                    with db.connection(url) as conn:
                        plan = new_days(
                            conn, Market.STOCK, timeframe, {s: months for s in names}, through
                        )
                    grouped = grouped_saves_requests([w for ws in plan.values() for w in ws])
                    runs = len(Timeframe)  # one run per stock bars asset
                else:
                    plan, grouped = whole_months(timeframe, names, months), False
                    runs = count * len(months)  # one run per (month, symbol), both assets
                bars = load(url, server.url, timeframe, plan, grouped)
                seconds = time.perf_counter() - started
                rows.append(
                    {
                        "symbols": count,
                        "timeframe": str(timeframe),
                        "way": way + (" (grouped daily)" if grouped else ""),
                        "requests": len(sim.requests),
                        "bars_loaded": bars,
                        "seconds": round(seconds, 2),
                        "dagster_runs": runs,
                        "stored": stored(url, timeframe),
                    }
                )
                print(f"  {rows[-1]}", flush=True)
    finally:
        server.shutdown()
        server.server_close()
    for timeframe in Timeframe:
        counts = {r["stored"] for r in rows if r["timeframe"] == str(timeframe)}
        if len(counts) != 1:
            raise SystemExit(f"bench_night: the two ways left different {timeframe} bars: {counts}")
    return f"{before}..{through}", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--symbols", type=int, nargs="+", default=[20, 500])
    parser.add_argument("--json", type=Path, help="default: $MARKETDATA_HOME/bench_night.json")
    args = parser.parse_args()
    os.environ["MARKETDATA_ALLOW_SYNTHETIC"] = "1"  # its own database takes simulator bars
    if any(n < 1 for n in args.symbols):
        parser.error("--symbols must be positive")
    admin_url = config.database_url() or embedded.start()
    results = []
    for count in args.symbols:
        print(f"{count} symbols ...", flush=True)
        night, rows = measure(admin_url, count)
        results += rows
    about = machine(db.with_database(admin_url, DATABASE))
    print(f"\nmachine:  {about['cpu']}; {about['os']}; Python {about['python']}")
    print(f"database: {about['database']}")
    print(f"night:    {night} (the session before is stored; the night loads the last one)\n")
    header = ("symbols", "bars", "way", "requests", "seconds", "loaded", "runs")
    print("{:>7}  {:<6}  {:<36}  {:>8}  {:>7}  {:>9}  {:>5}".format(*header))
    for r in results:
        print(
            f"{r['symbols']:>7}  {r['timeframe']:<6}  {r['way']:<36}  {r['requests']:>8}  "
            f"{r['seconds']:>7.2f}  {r['bars_loaded']:>9,}  {r['dagster_runs']:>5}"
        )
    output = args.json or config.marketdata_home() / "bench_night.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": about, "night": night, "results": results}, indent=2))
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
