"""Sensors that alert the operator (marketdata_pipeline.alerts sends): a failed bars run, a
failed ERROR check, an asset gone stale, an unreachable warehouse; each once."""

import json
import logging
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import dagster as dg

from marketdata_pipeline import alerts, config
from marketdata_pipeline.alerts import Alert, AlertKind
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS
from marketdata_pipeline.defs.checks import FRESHNESS
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.defs.sensors import run_status_events
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
    if "dagster/partition" in tags:
        return f", partition {tags['dagster/partition']}"
    start = tags.get("dagster/asset_partition_range_start")
    end = tags.get("dagster/asset_partition_range_end")
    return f", partitions {start} to {end}" if start and end else ""


def _error_text(message: str, class_name: str | None) -> str:
    """An error's first line without the module path of its class; a dg.Failure's own
    description without its class name (it is the text written for the operator)."""
    line = first_line(message, class_name or "error")
    head, separator, rest = line.partition(": ")
    if separator and head.rsplit(".", 1)[-1] == class_name:
        return rest if class_name == "Failure" else f"{class_name}: {rest}"
    return line


def _log_failures(log: logging.Logger, report: alerts.Report) -> None:
    for failure in report.failures():
        log.error(f"alert not delivered: {failure}")


@dg.run_failure_sensor(
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts the operator (webhook and/or email, see README: Alerts) once for each "
    "failed run that materializes a bars asset (refresh jobs and backfills), with the "
    "failure and a link to the run. Other runs' failures are noted in the tick, not alerted.",
)
def failed_bars_run_alerts(context: dg.RunFailureSensorContext) -> dg.SkipReason:
    run = context.dagster_run
    # Dagster hands this sensor one failed run per tick when it answers with a SkipReason;
    # the answer is the tick's record in the UI.
    assets = bars_assets_of(context.instance, run)
    if not assets:
        return dg.SkipReason(f"run {run.run_id} ({run.job_name}) is not a bars run: no alert")
    settings = config.alert_settings()
    steps = context.get_step_failure_events()
    error = steps[0].step_failure_data.error if steps else None
    reason = (
        _error_text(error.message, error.cls_name)
        if error
        else first_line(context.failure_event.message, "the run failed")
    )
    alert = Alert(
        AlertKind.FAILED_RUN,
        title=f"Bars run failed: {', '.join(assets)}",
        text=f"Run {run.run_id} ({run.job_name}{_partitions(run)}) failed: {reason}",
        link=run_link(settings.ui_url, run.run_id),
    )
    report = alerts.send([alert], settings)
    _log_failures(context.log, report)
    return dg.SkipReason(f"run {run.run_id} failed: {report.summary()}")


def _latest_finished_run_event(instance: dg.DagsterInstance) -> int:
    latest = 0
    for kind in FINISHED_RUN_EVENTS:
        records = instance.fetch_run_status_changes(kind, limit=1, ascending=False).records
        if records:
            latest = max(latest, records[0].storage_id)
    return latest


def _metadata_text(evaluation: dg.AssetCheckEvaluation) -> str:
    shown = [
        f"{name}: {str(getattr(value, 'value', value))[:200]}"
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
            json.dumps({"after": _latest_finished_run_event(context.instance), "stale": []})
        )
        return dg.SkipReason("started: check results of runs finishing from now on are alerted")
    state = json.loads(context.cursor)
    stale: set[str] = set(state["stale"])
    events, newest = run_status_events(context.instance, FINISHED_RUN_EVENTS, state["after"])
    run_ids = [event.event_log_entry.run_id for event in events]
    if not run_ids:
        return dg.SkipReason("no run finished since the last tick")
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
    report = alerts.send(due, settings)
    _log_failures(context.log, report)
    context.update_cursor(json.dumps({"after": newest, "stale": sorted(stale)}))
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
    down_since = json.loads(context.cursor).get("unreachable_since") if context.cursor else None
    now = datetime.now(UTC)
    try:
        with warehouse.connection() as conn:
            conn.execute("SELECT 1")
        problem = None
    # Whatever stops the connection (server down, bad credentials, a bad DATABASE_URL, the
    # embedded server not starting) means the pipeline cannot reach its warehouse.
    except Exception as error:
        problem = alerts.redact(first_line(str(error), type(error).__name__), _database_passwords())
    if problem is None and down_since is None:
        context.update_cursor(json.dumps({}))
        return dg.SkipReason("warehouse reachable")
    if problem is not None and down_since is not None:
        return dg.SkipReason(f"warehouse still unreachable (alerted {down_since}): {problem}")
    settings = config.alert_settings()
    link = _sensor_link(context, settings.ui_url)
    if problem is not None:
        alert = Alert(
            AlertKind.WAREHOUSE_UNREACHABLE,
            title="Warehouse unreachable",
            text=f"{problem}\nBars runs, checks and sensors fail until it is back.",
            link=link,
        )
        context.update_cursor(json.dumps({"unreachable_since": now.isoformat(timespec="seconds")}))
    else:
        alert = Alert(
            AlertKind.WAREHOUSE_UNREACHABLE,
            title="Warehouse reachable again",
            text=f"The warehouse answers again (unreachable since {down_since}).",
            link=link,
            resolved=True,
        )
        context.update_cursor(json.dumps({}))
    report = alerts.send([alert], settings)
    _log_failures(context.log, report)
    return dg.SkipReason(f"{alert.title}: {report.summary()}")


alert_sensors = [failed_bars_run_alerts, check_alerts, warehouse_alerts]
