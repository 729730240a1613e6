"""Sensors and admin jobs with real runs on a test Dagster instance and real PostgreSQL."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import dagster as dg
import pytest

from marketdata_pipeline.defs.admin_jobs import (
    add_symbol,
    create_api_key,
    remove_symbol,
    revoke_key,
)
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.sensors import (
    StatusNotWritten,
    backfill_status_sensor,
    symbol_registry_sensor,
    window_states,
)
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.errors import NotFound
from marketdata_pipeline.polygon.simulator import Faults
from marketdata_pipeline.registry import api_keys as apikeys
from marketdata_pipeline.registry import backfill_state, key_delivery
from marketdata_pipeline.registry import symbols as registry
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from tests.test_bars_assets import materialize

RESOURCES = {"warehouse": WarehouseResource()}


@pytest.fixture
def url(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("MARKETDATA_HOME", str(tmp_path))
    with db.connection(database_url) as conn:
        bootstrap(conn)
    return database_url


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


CURSORS: dict[int, str | None] = {}


def sync(instance: dg.DagsterInstance) -> dg.SensorResult:
    """Evaluate the registry sensor and apply its partition requests and cursor, as the
    daemon does."""
    context = dg.build_sensor_context(
        instance=instance, resources=RESOURCES, cursor=CURSORS.get(id(instance))
    )
    result = symbol_registry_sensor(context)
    assert isinstance(result, dg.SensorResult)
    CURSORS[id(instance)] = result.cursor
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def test_registry_sensor_adds_removes_and_backfills_new_symbols(url, instance) -> None:
    first = sync(instance)
    assert len(instance.get_dynamic_partitions("stock_symbols")) == 17
    assert sorted(instance.get_dynamic_partitions("crypto_symbols")) == ["BTC", "ETH", "SOL"]
    runs = first.run_requests or []
    history = [r for r in runs if r.job_name != "stock_splits_refresh"]
    assert len(history) == 20 * 2  # history of daily and minute bars per symbol
    # The new stock symbols' splits are fetched by one run over them: nothing is told
    # materialized before a fetch.
    [splits] = [r for r in runs if r.job_name == "stock_splits_refresh"]
    stock = instance.get_dynamic_partitions("stock_symbols")
    assert splits.tags["dagster/asset_partition_range_start"] == stock[0]
    assert splits.tags["dagster/asset_partition_range_end"] == stock[-1]
    assert not first.asset_events

    again = sync(instance)
    assert not again.run_requests and not again.dynamic_partitions_requests

    with db.connection(url) as conn:
        registry.remove(conn, "XYZ")
        registry.add(conn, "DOGE", AssetClass.CRYPTO)
    changed = sync(instance)
    assert "XYZ" not in instance.get_dynamic_partitions("stock_symbols")
    assert "DOGE" in instance.get_dynamic_partitions("crypto_symbols")
    new_runs = changed.run_requests or []
    assert {r.job_name for r in new_runs} == {"crypto_bars_refresh"}
    assert {key.path[-1] for r in new_runs for key in r.asset_selection or []} == {
        "crypto_daily_bars",
        "crypto_minute_bars",
    }
    tags = new_runs[0].tags
    assert tags["dagster/asset_partition_range_start"] == "2020-01-01|DOGE"
    assert tags["dagster/asset_partition_range_end"].endswith("|DOGE")

    removed = sync(instance)  # nothing changed since: the tick says so
    assert removed.skip_reason == dg.SkipReason("partitions already match the registry")
    with db.connection(url) as conn:
        registry.remove(conn, "DOGE")
    gone = sync(instance)
    assert gone.skip_reason == dg.SkipReason(
        "partitions removed {'crypto_symbols': ['DOGE']}: not active in tracked_symbols (a "
        "symbol is registered with `marketdata symbols add` or the add_symbol job)"
    )
    time.sleep(1.1)  # a registration is named by its second
    with db.connection(url) as conn:
        registry.add(conn, "DOGE", AssetClass.CRYPTO)
    back = sync(instance).run_requests or []
    assert len(back) == 2, "a symbol added again is backfilled again"
    assert not {r.run_key for r in back} & {r.run_key for r in new_runs}


def state_rows(url: str) -> list[tuple]:
    with db.connection(url) as conn:
        return conn.execute("SELECT * FROM backfill_state ORDER BY asset, symbol, month").fetchall()


def symbol_row(url: str, symbol: str) -> tuple:
    with db.connection(url) as conn:
        [row] = conn.execute(
            "SELECT backfill_status, last_backfill, backfill_error FROM tracked_symbols "
            "WHERE symbol = %s",
            (symbol,),
        ).fetchall()
    return row


TICKS: list[str] = []  # what each evaluation of the status sensor said


def evaluate_status_sensor(instance: dg.DagsterInstance, cursor: str | None = None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=RESOURCES)
    said = backfill_status_sensor(context)
    assert isinstance(said, dg.SkipReason)  # no runs to request: the tick's text is its record
    TICKS.append(said.skip_message or "")
    return context.cursor


def test_status_sensor_after_success_failure_and_ranged_runs_twice(
    url, instance, sim, server
) -> None:
    sync(instance)
    assert materialize(instance, server, "stock_daily_bars", key="2024-01-01|AAPL").success
    assert materialize(
        instance, server, "stock_minute_bars", first="2024-01-01|MSFT", last="2024-03-01|MSFT"
    ).success
    sim.inject(Faults(not_authorized=True), "X:ETHUSD")
    assert not materialize(instance, server, "crypto_daily_bars", key="2024-05-01|ETH").success

    cursor = evaluate_status_sensor(instance)  # first tick: sees the runs before it
    said = re.fullmatch(
        r"6 run event\(s\) read, 6 of bars runs: 10 write\(s\) to window states \(a run's "
        r"start and end each write\) and (\d+) to symbol statuses",
        TICKS[-1],
    )  # a start and an end for each of 1 + 3 + 1 windows
    assert said and int(said.group(1)) >= 3, f"the tick says what it did: {TICKS[-1]}"
    rows = state_rows(url)
    by_window = {(r[0], r[1], str(r[2])): r for r in rows}
    assert len(rows) == 1 + 3 + 1
    aapl = by_window[("stock_daily_bars", "AAPL", "2024-01-01")]
    assert aapl[3] == "completed" and aapl[5] == 21 and aapl[6] == 0  # 21 sessions, 0 rejected
    assert [by_window[("stock_minute_bars", "MSFT", f"2024-0{m}-01")][3] for m in (1, 2, 3)] == [
        "completed"
    ] * 3
    eth = by_window[("crypto_daily_bars", "ETH", "2024-05-01")]
    assert eth[3] == "failed" and "not entitled" in eth[7]

    # A month or three of a history that reaches back to 2020 is not a completed backfill.
    assert symbol_row(url, "AAPL")[0] == "pending" and symbol_row(url, "AAPL")[1] is not None
    assert symbol_row(url, "MSFT")[0] == "pending"
    eth_row = symbol_row(url, "ETH")
    assert eth_row[0] == "failed" and "not entitled" in eth_row[2]
    assert symbol_row(url, "NVDA")[0] == "pending"

    # Processing the same runs again (a daemon restart without its cursor) changes nothing.
    evaluate_status_sensor(instance)
    assert state_rows(url) == rows
    assert evaluate_status_sensor(instance, cursor) == cursor

    # A later successful run of the failed window clears the failure; the rest of the
    # history is still to load.
    sim.clear_faults()
    assert materialize(instance, server, "crypto_daily_bars", key="2024-05-01|ETH").success
    evaluate_status_sensor(instance, cursor)
    assert symbol_row(url, "ETH")[:3:2] == ("pending", None)


def test_started_run_is_in_progress_and_a_replayed_start_never_regresses(
    url, instance, server
) -> None:
    sync(instance)
    unrelated = dg.Definitions(jobs=[add_symbol], resources=RESOURCES).get_job_def("add_symbol")
    assert unrelated.execute_in_process(
        instance=instance, run_config={"ops": {"register_symbol": {"config": {"symbol": "ZZ"}}}}
    ).success
    result = materialize(instance, server, "stock_daily_bars", key="2024-02-01|NVDA")
    start = next(
        r.event_log_entry
        for r in instance.get_records_for_run(
            result.run_id, of_type=dg.DagsterEventType.RUN_START
        ).records
    )
    with db.connection(url) as conn:
        backfill_state.record(conn, window_states(instance, start))
    assert [(r[1], str(r[2]), r[3]) for r in state_rows(url)] == [
        ("NVDA", "2024-02-01", "in_progress")
    ]
    assert symbol_row(url, "NVDA")[0] == "in_progress"

    evaluate_status_sensor(instance)  # the unrelated admin run is skipped, not an error
    assert [r[3] for r in state_rows(url)] == ["completed"]
    with db.connection(url) as conn:  # STARTED delivered again after SUCCESS
        backfill_state.record(conn, window_states(instance, start))
    assert [r[3] for r in state_rows(url)] == ["completed"]
    assert symbol_row(url, "NVDA")[0] == "pending"  # one window of its history


def test_a_symbol_is_completed_only_when_its_whole_history_is(url) -> None:
    def state(asset: str, month: str, status: str) -> backfill_state.WindowState:
        started = datetime(2026, 1, 1, tzinfo=UTC)
        return backfill_state.WindowState(
            asset, "AAPL", date.fromisoformat(month), status, f"run-{asset}-{month}",
            started, started, 1, 0, None,
        )  # fmt: skip

    expected = 4  # two months of history, daily and minute
    with db.connection(url) as conn:
        backfill_state.record(
            conn, [state("stock_daily_bars", "2026-01-01", "completed")], expected
        )
        assert symbol_row(url, "AAPL")[0] == "pending"
        backfill_state.record(
            conn,
            [
                state("stock_daily_bars", "2026-02-01", "completed"),
                state("stock_minute_bars", "2026-01-01", "unavailable"),  # beyond the plan
                state("stock_minute_bars", "2026-02-01", "completed"),
            ],
            expected,
        )
        assert symbol_row(url, "AAPL")[0] == "completed"
        assert backfill_state.window_counts(conn) == {"AAPL": backfill_state.WindowCounts(3, 1)}
        assert backfill_state.window_counts(conn)["AAPL"].of(expected) == "3/4 (1 beyond the plan)"

    with db.connection(url) as conn:  # none of IBM's history is within the plan
        conn.execute("INSERT INTO tracked_symbols (symbol, asset_class) VALUES ('IBM', 'stock')")
        backfill_state.record(
            conn,
            [
                replace(state(asset, month, "unavailable"), symbol="IBM")
                for asset in ("stock_daily_bars", "stock_minute_bars")
                for month in ("2026-01-01", "2026-02-01")
            ],
            expected,
        )
    assert symbol_row(url, "IBM")[0] == "unavailable"


def add_config(**config: str) -> dict:
    return {"ops": {"register_symbol": {"config": config}}}


def test_admin_jobs_and_no_secret_in_the_event_log(
    url, instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defs = dg.Definitions(jobs=[add_symbol, remove_symbol, create_api_key], resources=RESOURCES)
    added = defs.get_job_def("add_symbol").execute_in_process(
        instance=instance,
        run_config={"ops": {"register_symbol": {"config": {"symbol": "hood"}}}},
    )
    assert added.success
    with db.connection(url) as conn:
        assert registry.get(conn, "HOOD").active
    crypto = defs.get_job_def("add_symbol").execute_in_process(
        instance=instance,
        run_config={
            "ops": {"register_symbol": {"config": {"symbol": "doge", "asset_class": "CRYPTO"}}}
        },
    )
    assert crypto.success
    with db.connection(url) as conn:
        assert registry.get(conn, "DOGE").asset_class == "crypto"
    with pytest.raises(dg.DagsterInvalidConfigError):  # refused by the config, not at run time
        defs.get_job_def("add_symbol").execute_in_process(
            instance=instance,
            run_config={
                "ops": {"register_symbol": {"config": {"symbol": "TLT", "asset_class": "bond"}}}
            },
        )
    duplicate = defs.get_job_def("add_symbol").execute_in_process(
        instance=instance,
        run_config={"ops": {"register_symbol": {"config": {"symbol": "HOOD"}}}},
        raise_on_error=False,
    )
    assert not duplicate.success
    assert (
        defs.get_job_def("remove_symbol")
        .execute_in_process(
            instance=instance,
            run_config={"ops": {"deactivate_symbol": {"config": {"symbol": "HOOD"}}}},
        )
        .success
    )

    identity = key_delivery.create_identity(tmp_path / "operator-identity")
    recipient = key_delivery.public_text(identity.recipient)
    monkeypatch.setenv(key_delivery.RECIPIENT_VARIABLE, recipient)
    created = defs.get_job_def("create_api_key").execute_in_process(
        instance=instance, run_config={"ops": {"issue_api_key": {"config": {"name": "ops"}}}}
    )
    assert created.success
    shown: list[str] = []

    def fail_to_write(raw: str) -> None:
        raise OSError("No space left on device")

    with db.connection(url) as conn:
        with pytest.raises(OSError):
            key_delivery.reveal(conn, 2, identity, fail_to_write)
        assert key_delivery.sealed_key_ids(conn) == {2}, "a failed write keeps the sealed key"
        key_delivery.reveal(conn, 2, identity, shown.append)
        [raw] = shown
        assert apikeys.authenticate(conn, raw).name == "ops"
        with pytest.raises(NotFound, match="API key 2 has no sealed raw key: revealed already"):
            key_delivery.reveal(conn, 2, identity, shown.append)  # shown once
        with pytest.raises(NotFound, match="no API key with id 99"):
            key_delivery.reveal(conn, 99, identity, shown.append)
    assert len(shown) == 1

    everything = []
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id):
            everything.append(str(record))
        everything.append(str(run.run_config))
    text = "\n".join(everything)
    assert "marketdata keys reveal 2" in text and recipient in text, "the operator is told how"
    assert raw not in text
    assert raw.removeprefix("mdw_")[:20] not in text


def test_create_api_key_without_a_recipient_creates_nothing(
    url, instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(key_delivery.RECIPIENT_VARIABLE, raising=False)
    result = create_key(instance, "nobody")
    assert not result.success
    message = step_failure(result)
    assert "MARKETDATA_KEY_RECIPIENT is not set" in message and "keys identity" in message
    with db.connection(url) as conn:
        assert apikeys.find_by_name(conn, "nobody") is None, "no key that no one can read"

    monkeypatch.setenv(key_delivery.RECIPIENT_VARIABLE, "mdpub_not-a-key")
    malformed = create_key(instance, "nobody")
    assert "MARKETDATA_KEY_RECIPIENT must be a public key" in step_failure(malformed)
    with db.connection(url) as conn:
        assert apikeys.find_by_name(conn, "nobody") is None


def test_a_key_that_cannot_be_sealed_is_not_created(
    url, instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = key_delivery.create_identity(tmp_path / "identity")
    monkeypatch.setenv(
        key_delivery.RECIPIENT_VARIABLE, key_delivery.public_text(identity.recipient)
    )
    with db.connection(url) as conn:
        conn.execute("ALTER TABLE api_key_deliveries RENAME TO api_key_deliveries_away")
    try:
        assert not create_key(instance, "unsealed").success
    finally:
        with db.connection(url) as conn:
            conn.execute("ALTER TABLE api_key_deliveries_away RENAME TO api_key_deliveries")
    with db.connection(url) as conn:
        assert apikeys.find_by_name(conn, "unsealed") is None, "created and sealed together"


def test_polygon_key_stays_out_of_resource_config() -> None:
    os.environ["POLYGON_API_KEY_TEST_ONLY"] = "pk_secret_never_shown"
    try:
        resource = PolygonResource(api_key=dg.EnvVar("POLYGON_API_KEY_TEST_ONLY"))
        assert "pk_secret_never_shown" not in repr(resource)
    finally:
        del os.environ["POLYGON_API_KEY_TEST_ONLY"]


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    """The one failed step's error message, as the run's event log shows it."""
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_failure_data is not None
    error = failure.step_failure_data.error
    assert error is not None
    return error.message


def create_key(instance: dg.DagsterInstance, name: str) -> dg.ExecuteInProcessResult:
    return create_api_key.execute_in_process(
        instance=instance,
        resources=RESOURCES,
        run_config={"ops": {"issue_api_key": {"config": {"name": name}}}},
        raise_on_error=False,
    )


def test_revoke_key_job_with_an_id_beyond_bigint_fails_with_one_line(url, instance) -> None:
    result = revoke_key.execute_in_process(
        instance=instance,
        resources=RESOURCES,
        run_config={"ops": {"revoke_api_key": {"config": {"key_id": 99999999999999999999}}}},
        raise_on_error=False,
    )
    assert not result.success
    message = step_failure(result)
    assert "no API key with id 99999999999999999999" in message, message
    assert "NumericValueOutOfRange" not in message


def test_a_status_event_the_warehouse_refused_is_written_by_the_next_tick(
    url, instance, server
) -> None:
    """A failover leaves the warehouse read-only for a tick: the status of the runs of that
    tick is not lost, the next tick writes it."""
    sync(instance)
    assert materialize(instance, server, "stock_daily_bars", key="2024-01-01|AAPL").success
    with db.connection(url, autocommit=True) as conn:
        [(name,)] = conn.execute("SELECT current_database()").fetchall()
        read_only = f'ALTER DATABASE "{name}" SET default_transaction_read_only = '
        conn.execute(read_only + "on")  # each new session of the sensor is read-only
    context = dg.build_sensor_context(instance=instance, cursor=None, resources=RESOURCES)
    with pytest.raises(StatusNotWritten, match=r"retried next tick: .*read-only transaction"):
        backfill_status_sensor(context)
    assert context.cursor is None, "the cursor did not pass the unwritten events"
    assert state_rows(url) == []
    with db.connection(url, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")  # this session can undo it
        conn.execute(read_only + "off")

    cursor = evaluate_status_sensor(instance, context.cursor)
    assert TICKS[-1].startswith("2 run event(s) read, 2 of bars runs: 2 write(s)"), TICKS[-1]
    assert [(r[1], str(r[2]), r[3]) for r in state_rows(url)] == [
        ("AAPL", "2024-01-01", "completed")
    ]
    assert evaluate_status_sensor(instance, cursor) == cursor
