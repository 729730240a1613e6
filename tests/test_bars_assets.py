"""The bars assets end to end: real PostgreSQL, the simulator on a loopback socket, Dagster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import polars as pl
import psycopg
import pytest

from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, BarsAsset, bars_assets
from marketdata_pipeline.defs.checks import stale_symbols
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.sensors import backfill_status_sensor
from marketdata_pipeline.domain import BAR_SCHEMA, Market, Timeframe, Window, next_month
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from marketdata_pipeline.warehouse.loading import WINDOW_LOCK_CLASS, replace_window
from tests.conftest import PROJECT_DIR, bars_frame, read_bars

ASSETS = {a.key.path[-1]: a for a in bars_assets}
SPLIT_DAY = date(2023, 6, 15)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions("stock_symbols", ["AAPL", "MSFT", "SPY"])
        test_instance.add_dynamic_partitions("crypto_symbols", ["BTC"])
        yield test_instance


def materialize(
    instance: dg.DagsterInstance,
    server: SimulatorHTTPServer,
    asset: str,
    *,
    key: str | None = None,
    first: str | None = None,
    last: str | None = None,
) -> dg.ExecuteInProcessResult:
    tags: dict[str, str] = {}
    if first and last:
        tags = {
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
        }
    return dg.materialize(
        [ASSETS[asset]],
        instance=instance,
        partition_key=key,
        tags=tags,
        resources={
            "warehouse": WarehouseResource(),
            "polygon": PolygonResource(
                base_url=server.url, retry_attempts=2, retry_max_seconds=5, simulated=True
            ),
        },
        raise_on_error=False,
    )


def expected(sim: Simulator, market: str, timeframe: str, symbol: str, months: list[date]):
    """The simulator's bars for these months, as the warehouse should hold them."""
    ticker = f"X:{symbol}USD" if market == Market.CRYPTO else symbol
    span = "day" if timeframe == Timeframe.DAILY else "minute"
    first, last = months[0], next_month(months[-1])
    frame = bars_frame(sim.expected_bars(ticker, span, first, last))
    start, end = span_of(market, timeframe, symbol, months)
    return frame.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


def stored(url: str, market: str, timeframe: str, symbol: str, months: list[date]):
    start, end = span_of(market, timeframe, symbol, months)
    with db.connection(url) as conn:
        return read_bars(conn, Timeframe(timeframe), symbol, start, end)


def span_of(
    market: str, timeframe: str, symbol: str, months: list[date]
) -> tuple[datetime, datetime]:
    """[start, end) in UTC of these months of the symbol's market."""
    first = Window.of_month(Market(market), Timeframe(timeframe), symbol, months[0])
    last = Window.of_month(Market(market), Timeframe(timeframe), symbol, months[-1])
    return first.start, last.end


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    """The error text of the run's failed step."""
    failure = next(e for e in result.all_events if e.is_step_failure)
    return failure.step_failure_data.error_display_string


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """Each partition's materialization metadata (every bars materialization has a partition)."""
    return {
        str(event.partition): dict(event.materialization.metadata)
        for event in result.get_asset_materialization_events()
    }


def check(result: dg.ExecuteInProcessResult, name: str):
    for event in result.get_asset_check_evaluations():
        if event.check_name == name:
            return event
    raise AssertionError(f"no {name} check result")


def months_of(year: int) -> list[date]:
    return [date(year, m, 1) for m in range(1, 13)]


def test_one_partition_equals_the_simulators_bars(warehouse_url, sim, server, instance) -> None:
    result = materialize(instance, server, "stock_minute_bars", key="2024-03-01|AAPL")
    assert result.success
    want = expected(sim, "stock", "minute", "AAPL", [date(2024, 3, 1)])
    got = stored(warehouse_url, "stock", "minute", "AAPL", [date(2024, 3, 1)])
    assert got.height == want.height > 10_000
    assert got.equals(want)
    metadata = materializations(result)["2024-03-01|AAPL"]
    assert metadata["rows_loaded"].value == want.height
    assert metadata["rows_rejected"].value == 0
    assert metadata["validation_rate"].value == 1.0
    assert metadata["pages"].value == 1
    assert "simulator" in metadata["source"].value
    assert metadata["polygon_base_url"].value == server.url
    assert metadata["first_bar"].value == want["ts"][0].timestamp()
    assert "| ts | open |" in metadata["preview"].value
    assert check(result, "rejection_rate").passed
    coverage = check(result, "minute_coverage")
    assert coverage.passed and 0.97 < coverage.metadata["coverage"].value < 1.0


def test_daily_stock_and_crypto_partitions(warehouse_url, sim, server, instance) -> None:
    stock = materialize(instance, server, "stock_daily_bars", key="2024-11-01|SPY")
    crypto = materialize(instance, server, "crypto_daily_bars", key="2024-02-01|BTC")
    assert stock.success and crypto.success
    spy = stored(warehouse_url, "stock", "daily", "SPY", [date(2024, 11, 1)])
    assert spy.height == 20  # November 2024: 21 weekdays less Thanksgiving
    assert spy.equals(expected(sim, "stock", "daily", "SPY", [date(2024, 11, 1)]))
    btc = stored(warehouse_url, "crypto", "daily", "BTC", [date(2024, 2, 1)])
    assert btc.height == 29  # leap year, every day
    assert check(stock, "missing_sessions").passed
    assert check(crypto, "missing_days").passed


def test_ranged_run_of_twelve_months_then_rerun_is_identical(
    warehouse_url, sim, server, instance
) -> None:
    months = months_of(2023)
    first = materialize(
        instance, server, "stock_minute_bars", first="2023-01-01|MSFT", last="2023-12-01|MSFT"
    )
    assert first.success
    assert sorted(materializations(first)) == [f"{m}|MSFT" for m in months]
    want = expected(sim, "stock", "minute", "MSFT", months)
    assert want.height > 130_000
    assert stored(warehouse_url, "stock", "minute", "MSFT", months).equals(want)
    pages = sum(m["pages"].value for m in materializations(first).values())
    assert pages >= 5, "one request stream for the range, paged"

    again = materialize(
        instance, server, "stock_minute_bars", first="2023-01-01|MSFT", last="2023-12-01|MSFT"
    )
    assert again.success
    assert stored(warehouse_url, "stock", "minute", "MSFT", months).equals(want)
    assert all(
        m["rows_replaced"].value == m["rows_loaded"].value for m in materializations(again).values()
    )


def test_revised_history_is_replaced_exactly(warehouse_url, sim, server, instance) -> None:
    months = [date(2023, 5, 1), date(2023, 6, 1)]
    assert materialize(
        instance, server, "stock_minute_bars", first="2023-05-01|AAPL", last="2023-06-01|AAPL"
    ).success
    before = stored(warehouse_url, "stock", "minute", "AAPL", months)
    sim.split("AAPL", SPLIT_DAY, 4.0)
    assert materialize(
        instance, server, "stock_minute_bars", first="2023-05-01|AAPL", last="2023-06-01|AAPL"
    ).success
    after = stored(warehouse_url, "stock", "minute", "AAPL", months)
    assert after.equals(expected(sim, "stock", "minute", "AAPL", months))
    assert not after.equals(before)
    assert after.height == before.height


def test_bars_without_vwap_or_trades_load_with_nulls(warehouse_url) -> None:
    # Polygon's vw and n are optional; the binary COPY encodes each null pattern apart.
    target = Window.of_month(Market.STOCK, Timeframe.MINUTE, "AAPL", date(2024, 3, 1))
    bars = pl.DataFrame(
        {
            "ts": [target.start + timedelta(minutes=m) for m in range(4)],
            "open": [10.0, 11.0, 12.0, 13.0],
            "high": [10.5, 11.5, 12.5, 13.5],
            "low": [9.5, 10.5, 11.5, 12.5],
            "close": [10.2, 11.2, 12.2, 13.2],
            "volume": [100.0, 0.5, 300.0, 400.0],
            "vwap": [10.1, None, 12.1, None],
            "trades": [5, 6, None, None],
        },
        schema=BAR_SCHEMA,
    )
    with db.connection(warehouse_url) as conn:
        load = replace_window(conn, target, bars, bars.clear())
        stored_bars = read_bars(conn, Timeframe.MINUTE, "AAPL", target.start, target.end)
    assert load.rows_loaded == 4
    assert stored_bars.equals(bars)


def test_bad_bars_are_quarantined_with_reasons_and_fail_the_check(
    warehouse_url, sim, server, instance
) -> None:
    sim.inject(Faults(bad_ohlc_every=20, repeat_timestamp_every=500), "AAPL")
    result = materialize(instance, server, "stock_minute_bars", key="2024-02-01|AAPL")
    assert result.success
    metadata = materializations(result)["2024-02-01|AAPL"]
    rejected = metadata["rows_rejected"].value
    assert rejected > 0
    with psycopg.connect(warehouse_url) as conn:
        rows = conn.execute(
            "SELECT reasons, high, low FROM bars_rejected "
            "WHERE symbol = 'AAPL' AND month = '2024-02-01'"
        ).fetchall()
        dupes = conn.execute(
            "SELECT count(*) FROM bars_minute GROUP BY symbol, ts HAVING count(*) > 1"
        ).fetchall()
    assert len(rows) == rejected
    assert any("high below low" in reasons for reasons, _, _ in rows)
    assert any(reasons == ["repeated timestamp"] for reasons, _, _ in rows)
    assert all(high < low for reasons, high, low in rows if "high below low" in reasons)
    assert dupes == []
    served = expected(sim, "stock", "minute", "AAPL", [date(2024, 2, 1)]).height
    assert metadata["rows_loaded"].value + rejected == served, "nothing dropped silently"
    rate = check(result, "rejection_rate")
    assert not rate.passed and rate.severity == dg.AssetCheckSeverity.ERROR
    assert rate.metadata["worst_rate"].value > 0.01

    sim.clear_faults()
    clean = materialize(instance, server, "stock_minute_bars", key="2024-02-01|AAPL")
    assert check(clean, "rejection_rate").passed
    with psycopg.connect(warehouse_url) as conn:
        left = conn.execute("SELECT count(*) FROM bars_rejected WHERE symbol = 'AAPL'").fetchone()
    assert left == (0,), "reloading a window replaces its quarantine too"


def test_not_authorized_fails_clearly_and_leaves_the_warehouse_untouched(
    warehouse_url, sim, server, instance
) -> None:
    assert materialize(instance, server, "stock_daily_bars", key="2024-01-01|AAPL").success
    before = stored(warehouse_url, "stock", "daily", "AAPL", [date(2024, 1, 1)])
    sim.split("AAPL", date(2024, 1, 15), 2.0)  # a reload would change the bars
    sim.inject(Faults(not_authorized=True), "AAPL")
    result = materialize(instance, server, "stock_daily_bars", key="2024-01-01|AAPL")
    assert not result.success
    message = step_failure(result)
    assert "AAPL" in message and "not entitled" in message
    assert stored(warehouse_url, "stock", "daily", "AAPL", [date(2024, 1, 1)]).equals(before)


def test_persistent_5xx_fails_and_leaves_the_warehouse_untouched(
    warehouse_url, sim, server, instance
) -> None:
    assert materialize(instance, server, "crypto_daily_bars", key="2024-01-01|BTC").success
    before = stored(warehouse_url, "crypto", "daily", "BTC", [date(2024, 1, 1)])
    sim.inject(Faults(server_errors=-1))
    result = materialize(instance, server, "crypto_daily_bars", key="2024-01-01|BTC")
    assert not result.success
    assert "kept failing" in step_failure(result)
    assert stored(warehouse_url, "crypto", "daily", "BTC", [date(2024, 1, 1)]).equals(before)


# -- crash safety and concurrency, with real processes ------------------------------------


def child(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "tests/load_child.py", url, *args],
        cwd=PROJECT_DIR,
        env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def waiting_on_locks(conn: psycopg.Connection) -> int:
    """Sessions of this database waiting for a lock (pg_locks is live, even in a transaction)."""
    row = conn.execute(
        "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
    ).fetchone()
    return row[0] if row else 0


def locks_held_on(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT mode FROM pg_locks WHERE relation = %s::regclass AND granted "
        "AND pid <> pg_backend_pid()",
        (table,),
    ).fetchall()
    return [mode for (mode,) in rows]


def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_in_the_middle_of_a_load_leaves_the_previous_bars(warehouse_url) -> None:
    months = [date(2023, 6, 1)]
    first = child(warehouse_url, "AAPL", "2023-06-01", "2023-06-01")
    code, _, err = finished(first)
    assert code == 0, err
    before = stored(warehouse_url, "stock", "minute", "AAPL", months)
    assert before.height > 10_000

    with db.connection(warehouse_url, autocommit=True) as holder:
        # Block the reload after it has deleted and re-inserted the window's bars, on its way
        # to replace the window's quarantine: the middle of the load's transaction.
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE bars_rejected IN EXCLUSIVE MODE")
        revised = child(warehouse_url, "AAPL", "2023-06-01", "2023-06-01", "4")
        wait_until(lambda: waiting_on_locks(holder) >= 1)
        # It has written the window (holds bars_minute) and waits for the quarantine.
        assert "RowExclusiveLock" in locks_held_on(holder, "bars_minute")
        revised.send_signal(signal.SIGKILL)
        assert revised.wait(timeout=30) == -signal.SIGKILL
        holder.execute("ROLLBACK")
    assert stored(warehouse_url, "stock", "minute", "AAPL", months).equals(before)

    rerun = child(warehouse_url, "AAPL", "2023-06-01", "2023-06-01", "4")
    code, _, err = finished(rerun)
    assert code == 0, err
    after = stored(warehouse_url, "stock", "minute", "AAPL", months)
    assert after.height == before.height and not after.equals(before)
    assert after["close"][0] == pytest.approx(before["close"][0] / 4, abs=1e-4)


def test_two_processes_loading_the_same_window_serialize(warehouse_url) -> None:
    months = [date(2023, 3, 1)]
    with db.connection(warehouse_url, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(%s, hashtext(%s))",
            (WINDOW_LOCK_CLASS, "minute|MSFT|2023-03-01"),
        )
        loaders = [child(warehouse_url, "MSFT", "2023-03-01", "2023-03-01") for _ in range(2)]
        wait_until(lambda: waiting_on_locks(holder) >= 2)
        holder.execute(
            "SELECT pg_advisory_unlock(%s, hashtext(%s))",
            (WINDOW_LOCK_CLASS, "minute|MSFT|2023-03-01"),
        )
        outputs = [finished(p) for p in loaders]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    got = stored(warehouse_url, "stock", "minute", "MSFT", months)
    assert got.equals(expected(Simulator(), "stock", "minute", "MSFT", months))
    with psycopg.connect(warehouse_url) as conn:
        assert conn.execute(
            "SELECT count(*) - count(DISTINCT ts) FROM bars_minute WHERE symbol = 'MSFT'"
        ).fetchone() == (0,)


def test_freshness_lists_symbols_behind_the_last_complete_session(warehouse_url) -> None:
    spec = BarsAsset(Market.STOCK, Timeframe.DAILY)
    now = datetime(2024, 3, 13, 12, tzinfo=UTC)  # Wednesday morning: Tuesday is complete
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)
        conn.execute(
            "INSERT INTO bars_daily VALUES "
            "('AAPL', '2024-03-12 04:00Z', 1, 2, 1, 1.5, 10, NULL, NULL), "
            "('MSFT', '2024-03-08 05:00Z', 1, 2, 1, 1.5, 10, NULL, NULL)"
        )
        expected, stale = stale_symbols(conn, spec.market, spec.timeframe, now)
    assert expected == "2024-03-12"
    assert "AAPL" not in stale
    assert stale["MSFT"] == "2024-03-08"
    assert stale["NVDA"] == "no bars"
    assert len(stale) == 16


def test_freshness_is_evaluated_with_the_bars_or_alone_never_skipped(
    warehouse_url, sim, server, instance
) -> None:
    spec = next(s for s in ALL_BARS_ASSETS if s.name == "stock_daily_bars")
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)  # the default symbols, AAPL among them
    # Everything selected, as the UI's Materialize does: the bars, then the freshness check.
    result = materialize(instance, server, spec.name, key="2024-01-01|AAPL")
    assert result.success
    assert {e.check_name for e in result.get_asset_check_evaluations()} == {
        "rejection_rate", "missing_sessions", "freshness"
    }  # fmt: skip
    assert not [e for e in result.all_events if e.event_type_value == "STEP_SKIPPED"]
    # The check alone, as its schedule runs it: no bars fetched, nothing materialized.
    sim.requests.clear()
    alone = dg.materialize(
        [ASSETS[spec.name]],
        instance=instance,
        selection=dg.AssetSelection.checks(spec.freshness_check_key),
        resources={"warehouse": WarehouseResource(), "polygon": PolygonResource()},
    )
    [evaluation] = alone.get_asset_check_evaluations()
    assert evaluation.check_name == "freshness" and not evaluation.passed  # 2024 is long ago
    assert "AAPL (2024-01-31)" in str(evaluation.metadata["stale"].value)
    assert not alone.get_asset_materialization_events() and not sim.requests


def test_a_run_without_partitions_fails_in_one_line(warehouse_url, sim, server, instance) -> None:
    result = materialize(instance, server, "stock_daily_bars")
    assert not result.success
    message = step_failure(result)
    assert "Failure: stock_daily_bars: choose partitions (months x symbols)" in message
    assert not sim.requests


def test_a_partition_typed_into_the_ui_that_is_no_symbol_fails_in_one_line(
    warehouse_url, sim, server, instance
) -> None:
    instance.add_dynamic_partitions("stock_symbols", ["ZZZZ"])  # "Add a partition" in the UI
    result = materialize(instance, server, "stock_daily_bars", key="2024-03-01|ZZZZ")
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = failure.step_failure_data.error
    assert error is not None and error.cls_name == "Failure"
    message = error.message.strip()
    assert "\n" not in message, message
    assert "ZZZZ: not a registered stock symbol" in message
    assert "`marketdata symbols add ZZZZ`" in message
    assert not sim.requests
    context = dg.build_sensor_context(
        instance=instance, resources={"warehouse": WarehouseResource()}
    )
    status = backfill_status_sensor(context)
    assert status is not None
    with db.connection(warehouse_url) as conn:
        rows = conn.execute("SELECT count(*) FROM backfill_state WHERE symbol = 'ZZZZ'")
        assert rows.fetchone() == (0,), "no state for what is no symbol"
