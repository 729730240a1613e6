"""The nightly refresh: one run per bars asset over every symbol, loading only what is new,
stock daily bars from the grouped endpoint, one symbol's failure isolated from the others.

Real PostgreSQL, the simulator on a loopback socket, Dagster runs built from the schedule's own
run requests. The clock is the real one: the night is the last complete session's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import dagster as dg
import polars as pl
import psycopg
import pytest

from marketdata_pipeline import clock
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, BarsAsset, bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.schedules import crypto_bars_daily, stock_bars_after_close
from marketdata_pipeline.defs.sensors import backfill_status_sensor
from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.pipeline import ingest_grouped
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer
from marketdata_pipeline.quality.calendars import last_complete_session, sessions
from marketdata_pipeline.warehouse import connection as db
from tests.conftest import bars_frame, read_bars

SYMBOLS = ["AAPL", "MSFT", "SPY"]
ASSETS = {a.key.to_user_string(): a for a in bars_assets}
SPECS = {spec.name: spec for spec in ALL_BARS_ASSETS}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions("stock_symbols", SYMBOLS)
        yield test_instance


def resources(server: SimulatorHTTPServer) -> dict[str, object]:
    return {
        "warehouse": WarehouseResource(),
        "polygon": PolygonResource(
            base_url=server.url, retry_attempts=2, retry_max_seconds=5, simulated=True
        ),
    }


def night(instance: dg.DagsterInstance, now: datetime) -> dict[str, dg.RunRequest]:
    """The night's run requests, by asset, as the schedule makes them."""
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=now)
    requests = stock_bars_after_close(context)
    assert isinstance(requests, list)
    return {r.asset_selection[0].to_user_string(): r for r in requests}


def run(
    instance: dg.DagsterInstance, server: SimulatorHTTPServer, request: dg.RunRequest
) -> dg.ExecuteInProcessResult:
    asset = request.asset_selection[0].to_user_string()  # type: ignore[index]
    return dg.materialize(
        [ASSETS[asset]],
        instance=instance,
        tags=request.tags,
        run_config=request.run_config,
        resources=resources(server),
        raise_on_error=False,
    )


def the_night() -> tuple[datetime, date, date]:
    """Now, the session the night loads, and the session before it (loaded the night before)."""
    now = datetime.now(UTC)
    through = last_complete_session(Market.STOCK, now)
    before = sessions(Market.STOCK, through - timedelta(days=10), through)[-2]
    return now, through, before


def load_the_night_before(
    instance: dg.DagsterInstance,
    sim: Simulator,
    server: SimulatorHTTPServer,
    requests: dict[str, dg.RunRequest],
    before: date,
) -> None:
    """Whole months of every symbol, as they stood on the evening of `before`."""
    sim.now = datetime.combine(before, time(21), Market.STOCK.zone)
    for request in requests.values():
        # The same partitions, whole months.
        whole = dg.RunRequest(asset_selection=request.asset_selection, tags=request.tags)
        assert run(instance, server, whole).success
    sim.now = None
    sim.requests.clear()


def expected(sim: Simulator, spec: BarsAsset, symbol: str, months: list[date], through: date):
    first = Window.of_month(spec.market, spec.timeframe, symbol, months[0])
    last = Window(spec.market, spec.timeframe, symbol, through.replace(day=1), through)
    bars = sim.expected_bars(symbol, spec.timeframe.timespan, first.first_day, last.last_day)
    frame = bars_frame(bars)
    return frame.filter((pl.col("ts") >= first.start) & (pl.col("ts") < last.end)), first, last


def stored(url: str, spec: BarsAsset, symbol: str, first: Window, last: Window) -> pl.DataFrame:
    with db.connection(url) as conn:
        return read_bars(conn, spec.timeframe, symbol, first.start, last.end)


def months_of(request: dg.RunRequest) -> list[date]:
    first = request.tags["dagster/asset_partition_range_start"].split("|")[0]
    last = request.tags["dagster/asset_partition_range_end"].split("|")[0]
    return sorted({date.fromisoformat(first), date.fromisoformat(last)})


def test_a_night_is_one_run_per_asset_loading_only_new_days_exactly(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    now, through, before = the_night()
    requests = night(instance, now)
    assert sorted(requests) == ["stock_daily_bars", "stock_minute_bars"]
    load_the_night_before(instance, sim, server, requests, before)
    # A bar of the day loaded the night before changed since (a correction): the night's
    # window starts at that day, so it is replaced too.
    with psycopg.connect(warehouse_url) as conn:
        conn.execute(
            "UPDATE bars_daily SET close = close * 2 WHERE symbol = 'MSFT' AND ts >= %s",
            (datetime.combine(before, time(0), Market.STOCK.zone),),
        )

    daily = run(instance, server, requests["stock_daily_bars"])
    assert daily.success
    grouped = [r for r in sim.requests if "/grouped/" in r]
    assert len(grouped) == 2 and len(sim.requests) == 2, sim.requests
    assert {r.split("?")[0].rsplit("/", 1)[1] for r in grouped} == {str(before), str(through)}
    sim.requests.clear()

    minute = run(instance, server, requests["stock_minute_bars"])
    assert minute.success
    assert len(sim.requests) == len(SYMBOLS), sim.requests
    assert all(f"/{before}/{through}?" in r for r in sim.requests), sim.requests

    for name in ("stock_daily_bars", "stock_minute_bars"):
        spec = SPECS[name]
        for symbol in SYMBOLS:
            want, first, last = expected(sim, spec, symbol, months_of(requests[name]), through)
            got = stored(warehouse_url, spec, symbol, first, last)
            assert got.equals(want), f"{name} {symbol}"
    windows = {
        str(m.partition): m.materialization.metadata["window"].value
        for m in daily.get_asset_materialization_events()
    }
    assert set(windows.values()) <= {f"{before}..{through}", f"{through.replace(day=1)}..{through}"}
    assert len(windows) >= len(SYMBOLS)
    # A partition's row count is its month's, not the few days the night loaded.
    for event in daily.get_asset_materialization_events():
        month, symbol = str(event.partition).split("|")
        whole = Window.of_month(Market.STOCK, Timeframe.DAILY, symbol, date.fromisoformat(month))
        in_month = stored(warehouse_url, SPECS["stock_daily_bars"], symbol, whole, whole).height
        metadata = event.materialization.metadata
        assert metadata["dagster/row_count"].value == in_month
        with psycopg.connect(warehouse_url) as conn:
            [(quarantined,)] = conn.execute(
                "SELECT count(*) FROM bars_rejected WHERE symbol = %s AND month = %s",
                (symbol, month),
            ).fetchall()
        assert metadata["rejected_in_month"].value == quarantined
        assert in_month >= metadata["rows_loaded"].value  # type: ignore[operator]


def test_one_failing_symbol_fails_the_run_by_name_and_the_others_load(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    now, through, before = the_night()
    requests = night(instance, now)
    load_the_night_before(instance, sim, server, requests, before)
    sim.inject(Faults(truncated=-1), "MSFT")
    result = run(instance, server, requests["stock_minute_bars"])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error_display_string
    assert "1 symbol(s) failed (MSFT)" in message and "malformed JSON" in message
    loaded = {str(m.partition).split("|")[1] for m in result.get_asset_materialization_events()}
    assert loaded == {"AAPL", "SPY"}

    context = dg.build_sensor_context(instance=instance, resources=resources(server))
    said = backfill_status_sensor(context)
    assert isinstance(said, dg.SkipReason)
    with psycopg.connect(warehouse_url) as conn:
        states: dict[str, str] = dict(
            conn.execute(
                "SELECT symbol, status || coalesce(': ' || error, '') FROM backfill_state "
                "WHERE asset = 'stock_minute_bars' AND run_id = %s AND month = %s",
                (result.run_id, through.replace(day=1)),
            ).fetchall()
        )
    assert states["AAPL"] == "completed" and states["SPY"] == "completed"
    assert states["MSFT"].startswith("failed: ") and "malformed JSON" in states["MSFT"]


def test_a_provider_down_is_not_waited_for_once_per_symbol(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    now, _, before = the_night()
    requests = night(instance, now)
    load_the_night_before(instance, sim, server, requests, before)
    sim.inject(Faults(server_errors=-1))
    result = run(instance, server, requests["stock_minute_bars"])
    assert not result.success
    message = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "3 symbol(s) failed" in message.error_display_string
    # The first symbol used its two attempts; the others were not attempted.
    assert len(sim.requests) == 2, sim.requests
    observed = [
        e.event_specific_data.asset_observation  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    not_attempted = [
        o for o in observed if str(o.metadata["failed"].value).startswith("not attempted")
    ]
    assert len(not_attempted) == 2 * len(months_of(requests["stock_minute_bars"]))


def test_grouped_days_asked_for_one_symbol_are_not_anothers_rejects(
    migrated_conn: psycopg.Connection, sim: Simulator
) -> None:
    """A new symbol needs the whole month, the others two days: every session of the month is
    fetched, and each symbol takes only its own days; nothing is quarantined."""
    through = date(2024, 3, 15)
    windows = [
        Window(Market.STOCK, Timeframe.DAILY, "AAPL", date(2024, 3, 14), through),
        Window(Market.STOCK, Timeframe.DAILY, "MSFT", date(2024, 3, 1), through),
    ]
    client = PolygonClient(None, "http://simulator", transport=sim.transport())
    outcomes = {o.window.symbol: o for o in ingest_grouped(client, migrated_conn, windows)}
    assert len([r for r in sim.requests if "/grouped/" in r]) == 11  # Mar 1..15's sessions
    for window in windows:
        load = outcomes[window.symbol].load
        assert load is not None and load.rows_rejected == 0, window.symbol
        want = bars_frame(sim.expected_bars(window.symbol, "day", window.first_day, through))
        got = read_bars(migrated_conn, Timeframe.DAILY, window.symbol, window.start, window.end)
        assert got.equals(want), window.symbol
    [(rejected,)] = migrated_conn.execute("SELECT count(*) FROM bars_rejected").fetchall()
    assert rejected == 0


FIRST_SESSION_NIGHTS = [
    # The schedule's tick on the evening a month's first session ends, and a time the
    # month before was loaded whole (the previous night).
    (
        Market.STOCK,
        datetime(2026, 12, 1, 20, 30, tzinfo=Market.STOCK.zone),
        datetime(2026, 11, 30, 21, 0, tzinfo=Market.STOCK.zone),
    ),
    (
        Market.CRYPTO,
        datetime(2026, 12, 2, 0, 30, tzinfo=UTC),
        datetime(2026, 12, 1, 0, 30, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize(("market", "tick", "night_before"), FIRST_SESSION_NIGHTS, ids=str)
def test_the_night_of_a_months_first_session_loads_and_passes(
    warehouse_url: str,
    sim: Simulator,
    server: SimulatorHTTPServer,
    market: Market,
    tick: datetime,
    night_before: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The new month's window holds one day, the one just complete: it loads, its coverage
    counts that day, and every check passes."""
    symbols = ["AAPL", "MSFT"] if market is Market.STOCK else ["BTC", "ETH"]
    schedule = stock_bars_after_close if market is Market.STOCK else crypto_bars_daily
    with psycopg.connect(warehouse_url) as conn:  # only the night's symbols are registered
        conn.execute("DELETE FROM tracked_symbols WHERE NOT symbol = ANY(%s)", (symbols,))
    monkeypatch.setenv(clock.NOW_VARIABLE, tick.isoformat())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(market.symbol_dimension, symbols)
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        requests = schedule(context)
        assert isinstance(requests, list) and len(requests) == 2
        monkeypatch.setenv(clock.NOW_VARIABLE, night_before.isoformat())
        sim.now = night_before
        for request in requests:
            whole = dg.RunRequest(asset_selection=request.asset_selection, tags=request.tags)
            assert run(instance, server, whole).success
        monkeypatch.setenv(clock.NOW_VARIABLE, tick.isoformat())
        sim.now = tick
        for request in requests:
            result = run(instance, server, request)
            assert result.success, request.asset_selection
            checks = result.get_asset_check_evaluations()
            assert checks and all(c.passed for c in checks), [
                (c.check_name, c.metadata) for c in checks if not c.passed
            ]
            first_day = [
                m.materialization.metadata
                for m in result.get_asset_materialization_events()
                if str(m.partition).startswith("2026-12-01|")
            ]
            assert len(first_day) == len(symbols)
            if "minute" in str(request.asset_selection):
                # Regular hours of Dec 1 are expected and (nearly) all there.
                assert all(float(md["coverage"].value) > 0.9 for md in first_day)  # type: ignore[arg-type]
