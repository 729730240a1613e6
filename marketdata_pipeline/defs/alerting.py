"""Sensors that alert the operator (marketdata_pipeline.alerts sends): a failed run of any
job, a failed sensor or schedule tick, a failed ERROR check, an asset gone stale, an
unreachable warehouse; each once. Each sensor holds the alerts that no channel took yet in its
cursor (in the Dagster instance, so any daemon of the deployment sees them) and sends them on
its next ticks, once a channel is configured or the failed channel answers again."""

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import dagster as dg
from dagster._core.scheduler.instigation import (  # the instance's tick records
    InstigatorState,
    InstigatorTick,
    InstigatorType,
    TickStatus,
)

from marketdata_pipeline import alerts, clock, config
from marketdata_pipeline.alerts import Alert, AlertKind
from marketdata_pipeline.config import AlertSettings
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS
from marketdata_pipeline.defs.checks import FRESHNESS
from marketdata_pipeline.defs.partitions import PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.defs.sensors import error_text, run_failure_message, run_status_events
from marketdata_pipeline.errors import first_line

BARS_ASSET_KEYS = frozenset(dg.AssetKey(spec.name) for spec in ALL_BARS_ASSETS)
FINISHED_RUN_EVENTS: tuple[
    Literal[
        dg.DagsterEventType.RUN_SUCCESS,
        dg.DagsterEventType.RUN_FAILURE,
        dg.DagsterEventType.RUN_CANCELED,
    ],
    ...,
] = (
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
    dg.DagsterEventType.RUN_CANCELED,
)
METADATA_SHOWN = 6
VALUE_SHOWN = 200  # characters of a metadata value in an alert (cut between items or words)
TEXT_SHOWN = 2000  # characters of an error in an alert
TICKS_READ = 25  # newest ticks read per sensor or schedule each time


def run_link(ui_url: str, run_id: str) -> str:
    return f"{ui_url}/runs/{run_id}"


def asset_link(ui_url: str, asset_key: dg.AssetKey, check_name: str | None = None) -> str:
    link = f"{ui_url}/assets/{'/'.join(quote(part, safe='') for part in asset_key.path)}"
    return f"{link}?view=checks&checkDetail={quote(check_name, safe='')}" if check_name else link


def bars_assets_of(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The bars assets a run was to materialize: its asset selection and the materializations
    it planned (a whole-job run, or one from `materialize`, may select none explicitly). A
    check-only run, like the freshness jobs', has neither."""
    planned = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
    ).records
    events = [record.event_log_entry.dagster_event for record in planned]
    keys = {event.asset_key for event in events if event and event.asset_key}
    keys |= set(run.asset_selection or ())
    return sorted(key.to_user_string() for key in keys & BARS_ASSET_KEYS)


def _partitions(run: dg.DagsterRun) -> str:
    tags = run.tags
    if PARTITION_TAG in tags:
        return f", partition {tags['dagster/partition']}"
    start = tags.get(RANGE_START_TAG)
    end = tags.get(RANGE_END_TAG)
    return f", partitions {start} to {end}" if start and end else ""


def _log_failures(log: logging.Logger, report: alerts.Report) -> None:
    for failure in report.failures():
        log.error(f"alert not delivered: {failure}")


def _state(context: dg.SensorEvaluationContext) -> dict[str, Any] | None:
    return json.loads(context.cursor) if context.cursor else None


def _deliver(
    context: dg.SensorEvaluationContext,
    state: dict[str, Any],
    due: list[Alert],
    settings: AlertSettings,
) -> alerts.Report:
    """Send what the sensor held and what fell due now; keep in its cursor what no channel or
    not every channel took (state["pending"])."""
    now = clock.now()
    pending = [*alerts.held(state.get("pending")), *(alerts.Pending(a, now) for a in due)]
    report, still = alerts.deliver(pending, settings)
    _log_failures(context.log, report)
    context.update_cursor(json.dumps({**state, "pending": alerts.to_hold(still)}))
    return report


def _run_failure_reason(instance: dg.DagsterInstance, run_id: str, message: str | None) -> str:
    steps = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in steps:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        if error is not None:
            return error_text(error.message, error.cls_name)
    return first_line(run_failure_message(instance, run_id, message), "the run failed")


def failed_run_alert(
    instance: dg.DagsterInstance, event: dg.EventLogEntry, ui_url: str
) -> Alert | None:
    run = instance.get_run_by_id(event.run_id)
    if run is None:  # deleted since
        return None
    assets = bars_assets_of(instance, run)
    reason = _run_failure_reason(instance, run.run_id, event.message)
    return Alert(
        AlertKind.FAILED_RUN,
        title=f"Bars run failed: {', '.join(assets)}" if assets else f"Run failed: {run.job_name}",
        text=alerts.shorten(
            f"Run {run.run_id} ({run.job_name}{_partitions(run)}) failed: {reason}", TEXT_SHOWN
        ),
        link=run_link(ui_url, run.run_id),
    )


@dg.sensor(
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts the operator (webhook and/or email, see README: Alerts) once for each "
    "failed run of any job (bars refreshes and backfills, stock_splits, the admin and "
    "freshness jobs; a run failed by run monitoring too), with the failure and a link to the "
    "run. Alerts no channel took are held and sent on its next ticks.",
)
def failed_run_alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    # A plain sensor over the instance's run failures rather than a run_failure_sensor: that
    # one is evaluated only when a run fails, so held alerts would wait for the next failure.
    state = _state(context)
    if state is None:  # alerts cover what happens from now on, not the history
        latest = _latest_run_event(context.instance, (dg.DagsterEventType.RUN_FAILURE,))
        context.update_cursor(json.dumps({"after": latest, "pending": []}))
        return dg.SkipReason("started: runs failing from now on are alerted")
    events, state["after"] = run_status_events(
        context.instance, (dg.DagsterEventType.RUN_FAILURE,), state["after"]
    )
    settings = config.alert_settings()
    due = [
        alert
        for record in events
        if (alert := failed_run_alert(context.instance, record.event_log_entry, settings.ui_url))
    ]
    report = _deliver(context, state, due, settings)
    if not report.alerts:
        return dg.SkipReason("no run failed since the last tick")
    return dg.SkipReason(f"{len(events)} run(s) failed since the last tick: {report.summary()}")


def _latest_run_event(
    instance: dg.DagsterInstance, kinds: tuple[dg.DagsterEventType, ...] = FINISHED_RUN_EVENTS
) -> int:
    latest = 0
    for kind in kinds:
        records = instance.fetch_run_status_changes(kind, limit=1, ascending=False).records
        if records:
            latest = max(latest, records[0].storage_id)
    return latest


def _metadata_text(evaluation: dg.AssetCheckEvaluation) -> str:
    shown = [
        f"{name}: {alerts.shorten(str(getattr(value, 'value', value)), VALUE_SHOWN)}"
        for name, value in list(evaluation.metadata.items())[:METADATA_SHOWN]
    ]
    return "\n".join(shown)


def _check_alert(
    ui_url: str, run_id: str, evaluation: dg.AssetCheckEvaluation, kind: AlertKind
) -> Alert:
    asset = evaluation.asset_key.to_user_string()
    where = f"run {run_id}" + (
        f", partition {evaluation.partition}" if evaluation.partition else ""
    )
    if kind is AlertKind.STALE_ASSET:
        title = f"Asset stale: {asset}"
        said = (
            f"The {evaluation.check_name} check of {asset} failed ({where}). "
            "No further alert until it passes again."
        )
    else:
        title = f"Check failed: {asset} {evaluation.check_name} (ERROR)"
        said = f"The {evaluation.check_name} check of {asset} failed ({where})."
    details = "\n".join(
        part for part in (said, evaluation.description, _metadata_text(evaluation)) if part
    )
    return Alert(
        kind, title, details, asset_link(ui_url, evaluation.asset_key, evaluation.check_name)
    )


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts the operator (webhook and/or email) once for each failed ERROR check of "
    "a bars asset, and once when a bars asset becomes stale (its freshness check fails), not "
    "again until that check has passed. Reads the check results of runs as they finish.",
)
def check_alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    if not context.cursor:  # alerts cover what happens from now on, not the history
        context.update_cursor(
            json.dumps({"after": _latest_run_event(context.instance), "stale": []})
        )
        return dg.SkipReason("started: check results of runs finishing from now on are alerted")
    state = json.loads(context.cursor)
    stale: set[str] = set(state["stale"])
    events, newest = run_status_events(context.instance, FINISHED_RUN_EVENTS, state["after"])
    run_ids = [event.event_log_entry.run_id for event in events]
    settings = config.alert_settings()
    found: list[tuple[float, str, dg.AssetCheckEvaluation]] = []
    for run_id in run_ids:
        records = context.instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
        for record in records:
            evaluation = record.event_log_entry.asset_check_evaluation
            if evaluation is not None and evaluation.asset_key in BARS_ASSET_KEYS:
                found.append((record.event_log_entry.timestamp, run_id, evaluation))
    due: list[Alert] = []
    for _, run_id, evaluation in sorted(found, key=lambda item: item[0]):
        asset = evaluation.asset_key.to_user_string()
        if evaluation.check_name == FRESHNESS:
            if evaluation.passed:
                stale.discard(asset)
            elif asset not in stale:
                stale.add(asset)
                due.append(_check_alert(settings.ui_url, run_id, evaluation, AlertKind.STALE_ASSET))
        elif not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            due.append(_check_alert(settings.ui_url, run_id, evaluation, AlertKind.FAILED_CHECK))
    state.update(after=newest, stale=sorted(stale))
    report = _deliver(context, state, due, settings)
    if not run_ids and not report.alerts:
        return dg.SkipReason("no run finished since the last tick")
    return dg.SkipReason(
        f"{len(run_ids)} finished run(s), {len(found)} check result(s) read: {report.summary()}"
    )


def _sensor_link(context: dg.SensorEvaluationContext, ui_url: str) -> str:
    """The sensor's page (its tick history) when the sensor knows where it runs."""
    location, repository = context.code_location_origin, context.repository_name
    if location is None or repository is None:
        return f"{ui_url}/overview/automation"
    return f"{ui_url}/locations/{repository}@{location.location_name}/sensors/{context.sensor_name}"


def _database_passwords() -> list[str]:
    """DATABASE_URL's password as written and decoded, to hide from the sensor's words."""
    url = config.database_url()
    password = urlsplit(url).password if url and "://" in url else None
    return [password, unquote(password)] if password else []


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Connects to the warehouse every minute; alerts the operator (webhook and/or "
    "email) once when it becomes unreachable, and once when it is reachable again.",
)
def warehouse_alerts(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SkipReason:
    state = _state(context) or {}
    down_since = state.get("unreachable_since")
    now = clock.now()
    try:
        with warehouse.connection() as conn:
            conn.execute("SELECT 1")
        problem = None
    # Whatever stops the connection (server down, bad credentials, a bad DATABASE_URL, the
    # embedded server not starting) means the pipeline cannot reach its warehouse.
    except Exception as error:
        problem = alerts.redact(first_line(str(error), type(error).__name__), _database_passwords())
    settings = config.alert_settings()
    link = _sensor_link(context, settings.ui_url)
    due: list[Alert] = []
    if problem is not None and down_since is None:
        due.append(
            Alert(
                AlertKind.WAREHOUSE_UNREACHABLE,
                title="Warehouse unreachable",
                text=f"{problem}\nBars runs, checks and sensors fail until it is back.",
                link=link,
            )
        )
        state["unreachable_since"] = now.isoformat(timespec="seconds")
    elif problem is None and down_since is not None:
        due.append(
            Alert(
                AlertKind.WAREHOUSE_UNREACHABLE,
                title="Warehouse reachable again",
                text=f"The warehouse answers again (unreachable since {down_since}).",
                link=link,
                resolved=True,
            )
        )
        state.pop("unreachable_since")
    report = _deliver(context, state, due, settings)
    if due:
        said = f"{due[0].title}: {report.summary()}"
    elif problem is not None:
        said = f"warehouse still unreachable (alerted {down_since}): {problem}"
    else:
        said = "warehouse reachable"
    held = f"; held alerts: {report.summary()}" if report.alerts and not due else ""
    return dg.SkipReason(said + held)


def _tick_reason(error: Any) -> str:
    """The error of a failed tick: the user code's own (the cause Dagster wraps it in)."""
    if error is None:
        return "no error recorded"
    inner = error.cause or error
    return error_text(inner.message, inner.cls_name)


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts the operator (webhook and/or email) once when a sensor or schedule of "
    "the instance fails a tick, with its error and a link to its ticks; not again until it "
    "has ticked without error. Alerts no channel took are held and sent on its next ticks.",
)
def failed_tick_alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    state = _state(context) or {"seen": {}, "failing": [], "pending": []}
    seen: dict[str, int] = state["seen"]
    failing: set[str] = set(state["failing"])
    settings = config.alert_settings()
    due: list[Alert] = []
    read = 0
    for instigator in context.instance.all_instigator_state():
        selector = instigator.selector_id
        ticks = context.instance.get_ticks(
            instigator.instigator_origin_id, selector, limit=TICKS_READ
        )
        # Newest first. A tick still running is read once it has ended; one left STARTED
        # before a later tick (a daemon that died mid-tick) never ends.
        finished = [tick for tick in ticks if tick.status != TickStatus.STARTED]
        new = [tick for tick in reversed(finished) if tick.tick_id > seen.get(selector, 0)]
        if selector not in seen:  # first seen (this sensor's first tick, a new sensor): now on
            new = new[-1:]
        for tick in new:
            read += 1
            if tick.status != TickStatus.FAILURE:
                failing.discard(selector)
            elif selector not in failing:
                failing.add(selector)
                due.append(_tick_alert(instigator, tick, settings.ui_url))
        if finished:
            seen[selector] = max(seen.get(selector, 0), finished[0].tick_id)
    state.update(seen=seen, failing=sorted(failing))
    report = _deliver(context, state, due, settings)
    return dg.SkipReason(f"{read} tick(s) read: {report.summary()}")


def _tick_alert(instigator: InstigatorState, tick: InstigatorTick, ui_url: str) -> Alert:
    name = instigator.instigator_name
    is_schedule = instigator.instigator_type == InstigatorType.SCHEDULE
    kind = "schedule" if is_schedule else "sensor"
    repository = instigator.origin.repository_origin
    location = repository.code_location_origin.location_name
    link = f"{ui_url}/locations/{repository.repository_name}@{location}/{kind}s/{name}"
    at = datetime.fromtimestamp(tick.timestamp, UTC)
    return Alert(
        AlertKind.FAILED_TICK,
        title=f"{kind.capitalize()} failed: {name}",
        text=alerts.shorten(
            f"The {kind} {name} failed its tick of {at:%Y-%m-%d %H:%M:%S} UTC: "
            f"{_tick_reason(tick.error)}",
            TEXT_SHOWN,
        )
        + "\nNo further alert until it ticks without error.",
        link=link,
    )


alert_sensors = [failed_run_alerts, failed_tick_alerts, check_alerts, warehouse_alerts]
