"""Sensors: the registry drives the symbol partitions; bars runs drive backfill state."""

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

import dagster as dg
import psycopg

from marketdata_pipeline import clock, config
from marketdata_pipeline.defs.assets import (
    ALL_BARS_ASSETS,
    FAILED,
    REFUSED,
    UNAVAILABLE,
    UP_TO_DATE,
    BarsAsset,
)
from marketdata_pipeline.defs.partitions import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    month_and_symbol,
    months,
)
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.defs.schedules import REFRESH_JOBS, REVISION_TAG, TRIGGER_TAG, bars_run
from marketdata_pipeline.defs.splits import stock_splits_refresh
from marketdata_pipeline.domain import Market
from marketdata_pipeline.errors import first_line
from marketdata_pipeline.registry import backfill_state
from marketdata_pipeline.registry.splits import never_fetched
from marketdata_pipeline.registry.symbols import active_symbols


def active_symbols_by_market(conn: psycopg.Connection) -> dict[Market, list[str]]:
    return {market: active_symbols(conn, market) for market in Market}


def register_symbol_partitions(
    instance: dg.DagsterInstance, conn: psycopg.Connection
) -> dict[str, list[str]]:
    """Add the registry's active symbols as partitions now, so a backfill can be launched
    before the registry sensor's first tick; returns what was added, by dimension."""
    adds, _, added = partition_changes(instance, active_symbols_by_market(conn))
    for request in adds:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    return _by_dimension(added)


def first_splits_fetches(stock_symbols: Sequence[str], never: Sequence[str]) -> list[dg.RunRequest]:
    """A stock_splits run over each block of adjacent partitions (`stock_symbols`, in the
    partitions' order) whose splits were never fetched (`never`): a symbol's splits partition
    is materialized by a real fetch, as soon as it is registered."""
    blocks: list[list[str]] = []
    pending = set(never)
    for position, symbol in enumerate(stock_symbols):
        if symbol not in pending:
            continue
        if blocks and stock_symbols[position - 1] == blocks[-1][-1]:
            blocks[-1].append(symbol)
        else:
            blocks.append([symbol])
    return [
        dg.RunRequest(
            # Asked once (the sensor's cursor): a fetch that failed is made by the daily
            # schedule's run.
            run_key=f"first-splits|{block[0]}..{block[-1]}|{clock.now():%Y-%m-%dT%H:%M:%S}",
            job_name=stock_splits_refresh.name,
            tags={
                RANGE_START_TAG: block[0],
                RANGE_END_TAG: block[-1],
                TRIGGER_TAG: "new symbol",
            },
        )
        for block in blocks
    ]


def partition_changes(
    instance: dg.DagsterInstance, active: dict[Market, list[str]]
) -> tuple[
    list[dg.AddDynamicPartitionsRequest],
    list[dg.DeleteDynamicPartitionsRequest],
    dict[Market, list[str]],
]:
    """Requests that make each market's symbol partitions equal its active symbols."""
    adds, deletes = [], []
    added: dict[Market, list[str]] = {}
    for market, symbols in active.items():
        dimension = market.symbol_dimension
        current = set(instance.get_dynamic_partitions(dimension))
        new = [s for s in symbols if s not in current]
        gone = sorted(current - set(symbols))
        if new:
            adds.append(dg.AddDynamicPartitionsRequest(dimension, new))
            added[market] = new
        if gone:
            deletes.append(dg.DeleteDynamicPartitionsRequest(dimension, gone))
    return adds, deletes, added


def history_backfill(market: Market, symbol: str, registered: datetime) -> list[dg.RunRequest]:
    """One ranged run per bars asset of the symbol's market, over the whole history."""
    keys = months().get_partition_keys()
    return [
        bars_run(
            spec,
            [keys[0], keys[-1]],
            [symbol],
            # Once per registration: a symbol removed and added again is backfilled again.
            run_key=f"history|{spec.name}|{symbol}|{registered:%Y-%m-%dT%H:%M:%S}",
            trigger="new symbol",
        )
        for spec in ALL_BARS_ASSETS
        if spec.market is market
    ]


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps the stock_symbols / crypto_symbols partitions equal to the active "
    f"symbols of tracked_symbols, backfills history from {config.history_start():%Y-%m} "
    "for each newly added symbol, and fetches the splits of every stock symbol whose splits "
    "were never fetched (one stock_splits run).",
    jobs=[*REFRESH_JOBS.values(), stock_splits_refresh],
)
def symbol_registry_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SensorResult:
    with warehouse.connection() as conn:
        active = active_symbols_by_market(conn)
        unfetched = never_fetched(conn, active[Market.STOCK])
    adds, deletes, added = partition_changes(context.instance, active)
    stock_partitions = [
        *context.instance.get_dynamic_partitions(Market.STOCK.symbol_dimension),
        *added.get(Market.STOCK, []),
    ]
    # The cursor holds the unfetched symbols whose first fetch was asked for already.
    asked = set(json.loads(context.cursor)) if context.cursor else set()
    runs = [
        *first_splits_fetches(stock_partitions, [s for s in unfetched if s not in asked]),
        *(
            run
            for market, symbols in added.items()
            for symbol in symbols
            for run in history_backfill(market, symbol, clock.now())
        ),
    ]
    if adds or deletes:
        context.log.info(
            f"partitions: added {_by_dimension(added)}, "
            f"removed {[d.partition_keys for d in deletes]}"
        )
    changes = f"partitions added {_by_dimension(added)}" if added else ""
    if deletes:
        removed = {d.partitions_def_name: list(d.partition_keys) for d in deletes}
        changes += ("; " if changes else "") + (
            f"partitions removed {removed}: not active in tracked_symbols (a symbol is "
            "registered with `marketdata symbols add` or the add_symbol job)"
        )
    return dg.SensorResult(
        run_requests=runs,
        cursor=json.dumps(unfetched),
        dynamic_partitions_requests=[*adds, *deletes],
        # A tick that requests runs is shown with them; one that does not, with its words.
        skip_reason=None if runs else changes or "partitions already match the registry",
    )


def _by_dimension(symbols: dict[Market, list[str]]) -> dict[str, list[str]]:
    return {market.symbol_dimension: names for market, names in symbols.items()}


BARS_ASSETS: dict[str, BarsAsset] = {spec.name: spec for spec in ALL_BARS_ASSETS}
RUN_EVENTS: tuple[
    Literal[
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.RUN_SUCCESS,
        dg.DagsterEventType.RUN_FAILURE,
    ],
    ...,
] = (
    dg.DagsterEventType.RUN_START,
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
)
EVENTS_PER_TICK = 200


class StatusNotWritten(Exception):
    """A run status event whose backfill state could not be written to the warehouse."""


def run_status_events(
    instance: dg.DagsterInstance, kinds: Sequence[dg.DagsterEventType], after: int
) -> tuple[list[dg.EventLogRecord], int]:
    """Run status events of `kinds` after the storage id `after`, in order, at most
    EVENTS_PER_TICK of each kind, and the storage id to read after next: none is skipped and
    none is read twice, however the kinds interleave."""
    events: list[dg.EventLogRecord] = []
    safe_until = None
    for kind in kinds:
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=kind, after_storage_id=after),  # type: ignore[arg-type]
            limit=EVENTS_PER_TICK,
            ascending=True,
        ).records
        events += records
        if len(records) == EVENTS_PER_TICK:  # more of this kind wait beyond its last id
            last = records[-1].storage_id
            safe_until = last if safe_until is None else min(safe_until, last)
    if safe_until is not None:
        events = [event for event in events if event.storage_id <= safe_until]
    events.sort(key=lambda event: event.storage_id)
    return events, events[-1].storage_id if events else after


def run_partitions(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dict[str, Sequence[str]]:
    """Bars asset -> the partition keys the run targets (single key or a range); {} if none."""
    selected = [key.to_user_string() for key in run.asset_selection or ()]
    if not selected:  # a whole-job run: the assets it planned say what it targets
        planned = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
        ).records
        planned_keys = [r.event_log_entry.dagster_event for r in planned]
        selected = [e.asset_key.to_user_string() for e in planned_keys if e and e.asset_key]
    assets = [a for a in dict.fromkeys(selected) if a in BARS_ASSETS]
    if not assets:
        return {}
    tags = run.tags
    if PARTITION_TAG in tags:
        return {asset: [tags[PARTITION_TAG]] for asset in assets}
    start = tags.get(RANGE_START_TAG)
    end = tags.get(RANGE_END_TAG)
    if not (start and end):
        return {}
    return {
        asset: BARS_ASSETS[asset].partitions.get_partition_keys_in_range(
            dg.PartitionKeyRange(start, end), dynamic_partitions_store=instance
        )
        for asset in assets
    }


def window_states(
    instance: dg.DagsterInstance, event: dg.EventLogEntry
) -> list[backfill_state.WindowState]:
    run = instance.get_run_by_id(event.run_id)
    if run is None:
        return []
    targets = run_partitions(instance, run)
    kind = event.dagster_event_type
    if not targets or (kind == dg.DagsterEventType.RUN_START and _new_days_only(run)):
        # A nightly refresh finds out in the run which months have nothing new; those keep
        # their state, so none is marked in progress.
        return []
    record = instance.get_run_record_by_id(run.run_id)
    started = _utc(record.start_time if record and record.start_time else event.timestamp)
    at = _utc(event.timestamp)
    loaded: dict[tuple[str, str], tuple[int | None, int | None]] = {}
    observed: dict[tuple[str, str], tuple[str | None, str]] = {}
    error = None
    if kind != dg.DagsterEventType.RUN_START:
        loaded = _loaded_windows(instance, run.run_id)
        observed = _observed_windows(instance, run.run_id)
    if kind == dg.DagsterEventType.RUN_FAILURE:
        error = _failure_message(instance, run.run_id, event)
    states = []
    for asset, keys in targets.items():
        for key in keys:
            month, symbol = month_and_symbol(BARS_ASSETS[asset].partitions, key)
            rows = loaded.get((asset, key))
            why_not_loaded = observed.get((asset, key))
            status, revised_for = "failed", None
            finished: datetime | None = at
            reason: str | None = error or "run failed"
            if kind == dg.DagsterEventType.RUN_START:
                status, finished, reason = "in_progress", None, None
            elif rows:
                status, reason = "completed", None
                revised_for = run.tags.get(REVISION_TAG)
            elif why_not_loaded:
                if why_not_loaded[0] is None:  # nothing new: the month keeps its state
                    continue
                status, reason = why_not_loaded[0], why_not_loaded[1]
            states.append(
                backfill_state.WindowState(
                    asset=asset,
                    symbol=symbol,
                    month=month,
                    status=status,
                    run_id=run.run_id,
                    started_at=started,
                    finished_at=finished,
                    rows_loaded=rows[0] if rows else None,
                    rows_rejected=rows[1] if rows else None,
                    error=reason,
                    revised_for=revised_for,
                )
            )
    return states


def _new_days_only(run: dg.DagsterRun) -> bool:
    ops = (run.run_config or {}).get("ops")
    if not isinstance(ops, dict):
        return False
    return any(
        isinstance(op, dict) and (op.get("config") or {}).get("new_days_only")
        for op in ops.values()
    )


def _loaded_windows(
    instance: dg.DagsterInstance, run_id: str
) -> dict[tuple[str, str], tuple[int | None, int | None]]:
    loaded = {}
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        if materialization is None or materialization.partition is None:
            continue
        metadata = materialization.metadata
        loaded[(materialization.asset_key.to_user_string(), materialization.partition)] = (
            # The rows the month holds: a night loads only some of its days.
            _int(metadata.get("dagster/row_count")),
            _int(metadata.get("rejected_in_month")),
        )
    return loaded


def _observed_windows(
    instance: dg.DagsterInstance, run_id: str
) -> dict[tuple[str, str], tuple[str | None, str]]:
    """(asset, partition) -> (status, why) for the months a run observed but did not load:
    `unavailable` (the provider's plan does not cover them), `failed` (the load was refused,
    or the symbol failed), or None (a nightly refresh found nothing new). The run's last word
    on a month counts."""
    found = {}
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
    for record in records.records:
        observation = record.event_log_entry.asset_observation
        if observation is None or observation.partition is None:
            continue
        key = (observation.asset_key.to_user_string(), observation.partition)
        for name, status in (
            (UNAVAILABLE, "unavailable"),
            (REFUSED, "failed"),
            (FAILED, "failed"),
            (UP_TO_DATE, None),
        ):
            words = observation.metadata.get(name)
            if words is not None:
                found[key] = (status, str(getattr(words, "value", words))[:500])
    return found


def _failure_message(instance: dg.DagsterInstance, run_id: str, event: dg.EventLogEntry) -> str:
    steps = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in steps:
        step_event = record.event_log_entry.dagster_event
        error = getattr(step_event.event_specific_data, "error", None) if step_event else None
        if error is not None:
            return error_text(error.message, error.cls_name)[:500]
    return run_failure_message(instance, run_id, event.message)[:500]


def error_text(message: str, class_name: str | None) -> str:
    """An error's first line without the module path of its class; a dg.Failure's own
    description without its class name (it is the text written for the operator)."""
    line = first_line(message, class_name or "error")
    head, separator, rest = line.partition(": ")
    if separator and head.rsplit(".", 1)[-1] == class_name:
        return rest if class_name == "Failure" else f"{class_name}: {rest}"
    return line


OUTSIDE_FAILURE = "This run has been marked as failed from outside the execution context."


def run_failure_message(instance: dg.DagsterInstance, run_id: str, message: str | None) -> str:
    """A run failure's message; for a run failed from outside (its worker process died and
    the code server noticed), the engine's word on how its process ended instead."""
    if message and message.startswith(OUTSIDE_FAILURE):
        engine = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, ascending=False, limit=10
        ).records
        for record in engine:
            said = record.event_log_entry.message
            if said and "Run execution process" in said:
                return said.removeprefix("[DagsterApiServer] ")
    return message or "run failed"


def _int(value: object) -> int | None:
    raw = getattr(value, "value", value)
    return int(raw) if isinstance(raw, int | float) else None


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes backfill_state per (asset, symbol, month) on run STARTED, SUCCESS and "
    "FAILURE of the bars runs, and rolls it up onto tracked_symbols (backfill_status, "
    "last_backfill, backfill_error). Reads the event log from a persisted cursor, so runs "
    "before its first tick or during a daemon restart are not lost; an event it cannot write "
    "(the warehouse down or read-only) fails the tick and is written by the next one.",
)
def backfill_status_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SkipReason:
    events, newest = run_status_events(
        context.instance, RUN_EVENTS, int(context.cursor) if context.cursor else 0
    )
    if not events:
        return dg.SkipReason("no run started or ended since the last tick")
    windows = symbols = of_bars_runs = skipped = 0
    with warehouse.connection() as conn:
        for record in events:
            run_id = record.event_log_entry.run_id
            try:
                states = window_states(context.instance, record.event_log_entry)
            # A run that cannot be read as a bars run (tags or partitions it no longer
            # matches) must never stop the sensor: it is skipped, and said so. Any other error
            # (the instance's storage) fails the tick and the event is read again.
            except (dg.DagsterError, ValueError, KeyError) as error:
                skipped += 1
                context.log.warning(f"skipped run {run_id}: {error!r}")
                continue
            if not states:
                continue
            try:
                changed = backfill_state.record(conn, states)
            # Never skipped: the tick fails before its cursor moves, so the next tick writes
            # this event again (the writes are idempotent, so the events before it too).
            except psycopg.Error as error:
                raise StatusNotWritten(
                    f"backfill state of run {run_id} not written, retried next tick: "
                    + first_line(str(error), type(error).__name__)
                ) from error
            windows, symbols = windows + changed[0], symbols + changed[1]
            of_bars_runs += 1
    context.update_cursor(str(newest))
    # The UI files a tick without run requests under "skipped"; its text says what it did.
    return dg.SkipReason(
        f"{len(events)} run event(s) read, {of_bars_runs} of bars runs: {windows} write(s) to "
        f"window states (a run's start and end each write) and {symbols} to symbol statuses"
        + (f", {skipped} event(s) could not be read" if skipped else "")
    )
