"""The provider's plans: a per-key request limit shared by concurrent runs, and a history
limit that makes older months unavailable rather than failing the run."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime

import dagster as dg

from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.sensors import window_states
from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.pipeline import ingest
from marketdata_pipeline.polygon.client import PolygonClient, RetryPolicy
from marketdata_pipeline.polygon.simulator import Simulator, serve
from marketdata_pipeline.registry import backfill_state
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.request_limit import MARGIN_SECONDS, SharedRequestLimit

KEY = "pk_free_plan_key"
NOW = datetime(2024, 6, 15, 12, tzinfo=UTC)
WINDOW = 3.0  # the plan's "minute", shortened for the test


def test_four_concurrent_runs_share_the_free_plan_and_none_is_refused(migrated_url: str) -> None:
    sim = Simulator(api_key=KEY, plan="free", now=NOW, plan_window_seconds=WINDOW)
    server = serve(sim)
    symbols = ["AAPL", "MSFT", "NVDA", "AMD"]
    months = [date(2024, 1, 1), date(2024, 3, 1), date(2024, 5, 1)]  # three separate streams
    errors: list[BaseException] = []
    # No retries: a single 429 would fail its run.
    no_retry = RetryPolicy(max_attempts=1)

    def backfill(symbol: str) -> None:
        limit = SharedRequestLimit(migrated_url, KEY, 5, window_seconds=WINDOW)
        try:
            with (
                PolygonClient(KEY, server.url, rate_limiter=limit, retry=no_retry) as client,
                db.connection(migrated_url) as conn,
            ):
                for _ in ingest(
                    client,
                    conn,
                    market=Market.STOCK,
                    timeframe=Timeframe.DAILY,
                    symbol=symbol,
                    months=months,
                ):
                    pass
        except BaseException as error:
            errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=backfill, args=(s,)) for s in symbols]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    took = time.monotonic() - started
    server.shutdown()
    assert errors == []
    requests = len(sim.requests)
    print(f"{requests} requests, 0 refused, {took:.1f} s ({WINDOW:g} s plan window)")
    assert requests == len(symbols) * len(months)
    # 12 requests at 5 per window: the last waits for the third window, not longer.
    window = WINDOW + MARGIN_SECONDS
    assert 2 * window - 0.5 < took < 3 * window + 5


def materialize_history(sim: Simulator, first: str, last: str):
    server = serve(sim)
    asset = next(a for a in bars_assets if a.key.path[-1] == "stock_daily_bars")
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("stock_symbols", ["AAPL"])
            result = dg.materialize(
                [asset],
                instance=instance,
                tags={
                    "dagster/asset_partition_range_start": f"{first}|AAPL",
                    "dagster/asset_partition_range_end": f"{last}|AAPL",
                },
                resources={
                    "warehouse": WarehouseResource(),
                    "polygon": PolygonResource(api_key=KEY, base_url=server.url, simulated=True),
                },
            )
            [end] = instance.fetch_run_status_changes(
                dg.RunStatusChangeRecordsFilter(event_type=dg.DagsterEventType.RUN_SUCCESS),
                limit=1,
            ).records
            states = window_states(instance, end.event_log_entry)
            return result, states
    finally:
        server.shutdown()


def test_months_the_plan_does_not_cover_are_unavailable_and_the_rest_load(
    warehouse_url: str,
) -> None:
    migrated_url = warehouse_url
    sim = Simulator(api_key=KEY, plan="free", now=NOW)  # history back to 2022-06-15
    result, states = materialize_history(sim, "2022-01-01", "2022-12-01")
    assert result.success
    loaded = sorted(str(e.partition) for e in result.get_asset_materialization_events())
    # 2022-06 starts before the plan's reach, so it is refused whole; 2022-07.. load.
    assert loaded == [f"2022-{m:02d}-01|AAPL" for m in range(7, 13)]
    by_month = {s.month: s for s in states}
    assert [by_month[date(2022, m, 1)].status for m in range(1, 13)] == ["unavailable"] * 6 + [
        "completed"
    ] * 6
    assert "doesn't include this data timeframe" in (by_month[date(2022, 1, 1)].error or "")
    with db.connection(migrated_url) as conn:
        backfill_state.record(conn, states)
        rows = dict(conn.execute("SELECT status, count(*) FROM backfill_state GROUP BY 1"))
    assert rows == {"unavailable": 6, "completed": 6}
    # one refused stream, a binary search over twelve months, then one stream: not 12 probes
    assert len(sim.requests) <= 7
