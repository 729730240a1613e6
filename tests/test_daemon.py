"""The Dagster daemon, for real: an instance on PostgreSQL (the shipped dagster.yaml), whose
daemon heartbeats `marketdata alerts check-daemon` checks from outside, and a real
`dagster-daemon` whose run worker is killed mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from dagster._daemon.types import DaemonHeartbeat
from psycopg import sql

from marketdata_pipeline import config
from marketdata_pipeline.cli import main
from marketdata_pipeline.defs.alerting import failed_run_alerts, failed_tick_alerts
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.defs.sensors import backfill_status_sensor
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.connection import psycopg2_url, with_database
from tests.conftest import PROJECT_DIR
from tests.daemon_location import KEY
from tests.test_alerts import ALERT_VARIABLES, WebhookReceiver


@pytest.fixture
def dagster_home(
    pg_admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A Dagster home with the shipped dagster.yaml, its storage a new database."""
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copyfile(config.shipped_path("dagster.yaml"), home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_URL", psycopg2_url(with_database(pg_admin_url, name)))
    for variable in ALERT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield home
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.thread.start()
    monkeypatch.setenv("MARKETDATA_ALERT_WEBHOOK_URL", receiver.url)
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def check_daemon(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`marketdata alerts check-daemon ARGS`, as cron runs it: (exit code, what it printed)."""
    with pytest.raises(SystemExit) as exited:
        main(["alerts", "check-daemon", *args])
    out, err = capsys.readouterr()
    assert isinstance(exited.value.code, int)
    return exited.value.code, out + err


def titles(webhook: WebhookReceiver) -> list[str]:
    return [text.splitlines()[0] for text in webhook.texts()]


def test_check_daemon_alerts_once_when_the_heartbeats_stop_and_once_when_back(
    dagster_home, webhook, capsys, monkeypatch
) -> None:
    code, said = check_daemon(capsys)  # no daemon ever ran on this instance
    assert code == 1, said
    assert said.startswith("Dagster daemon down: SENSOR (no heartbeat)"), said
    assert said.rstrip().endswith("alerts: sent 1 alert (daemon_down) to webhook")
    code, said = check_daemon(capsys)
    assert code == 1 and said.rstrip().endswith("alerts: no alert due"), "once, not each minute"

    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled  # the shipped config, on this instance
        for daemon in instance.get_required_daemon_types():  # as a running daemon writes them
            instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), daemon, "test", None))
        assert "MONITORING" in instance.get_required_daemon_types()
    code, said = check_daemon(capsys)
    assert code == 0, said
    assert said.rstrip() == (
        "Dagster daemon heartbeats are fresh; "
        "alerts: sent 1 alert (daemon_down resolved) to webhook"
    )
    code, said = check_daemon(capsys)
    assert (code, said.rstrip().rsplit(": ", 1)[-1]) == (0, "no alert due")

    # Six minutes on, and no heartbeat since: down again (the limit is five minutes).
    monkeypatch.setenv("MARKETDATA_NOW", (datetime.now(UTC) + timedelta(minutes=6)).isoformat())
    code, said = check_daemon(capsys)
    assert code == 1 and "SENSOR (last heartbeat 6 min ago)" in said, said
    code, said = check_daemon(capsys, "--max-age", "600")
    assert code == 0, "within a longer limit it is fresh"

    assert titles(webhook) == [
        "Dagster daemon down",
        "Dagster daemon back",
        "Dagster daemon down",
        "Dagster daemon back",
    ]
    first = webhook.texts()[0]
    assert "No heartbeat for over 5 min: " in first and "MONITORING (no heartbeat)" in first
    assert first.splitlines()[-1] == f"{config.DEFAULT_UI_URL}/health"


def test_check_daemon_holds_its_alert_until_a_channel_is_set(
    dagster_home, capsys, monkeypatch
) -> None:
    with monkeypatch.context() as unset:
        unset.delenv("DAGSTER_HOME")
        code, said = check_daemon(capsys)
        assert (code, said) == (
            1,
            "marketdata: error: DAGSTER_HOME is not set: set it (and what its dagster.yaml "
            "reads, DAGSTER_PG_URL) as for the Dagster daemon\n",
        )
    with monkeypatch.context() as unset:
        unset.delenv("DAGSTER_PG_URL")
        code, said = check_daemon(capsys)
        assert (code, said) == (
            1,
            "marketdata: error: the Dagster instance of DAGSTER_HOME cannot be opened: "
            "DAGSTER_PG_URL is not set\n",
        )
    code, said = check_daemon(capsys)
    assert code == 1
    assert said.rstrip().endswith("1 alert (daemon_down) held until a channel is set"), said
    receiver = WebhookReceiver()
    receiver.thread.start()
    try:
        monkeypatch.setenv("MARKETDATA_ALERT_WEBHOOK_URL", receiver.url)
        code, said = check_daemon(capsys)  # another run of the cron, maybe on another host
        assert said.rstrip().endswith("sent 1 alert (daemon_down) to webhook"), said
        assert titles(receiver) == ["Dagster daemon down"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def wait_for(what: str, found: Callable[[], Any], seconds: float, daemon: subprocess.Popen) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := found():
            return value
        assert daemon.poll() is None, "the daemon stopped"
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def sensor_tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"warehouse": WarehouseResource()}
    )
    data = sensor.evaluate_tick(context)
    return data.skip_message or "", data.cursor


def started_run(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    return runs[0] if runs else None


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the engine event it writes as it starts."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    for record in records.records:
        event = record.event_log_entry.dagster_event
        if event and "Started process for run" in (record.event_log_entry.message or ""):
            pid = event.engine_event_data.metadata["pid"]
            return int(str(pid.value))  # a text value
    return None


def window_status(url: str) -> list[str]:
    with db.connection(url) as conn:
        rows = conn.execute("SELECT status FROM backfill_state").fetchall()
    return [status for (status,) in rows]


@pytest.mark.slow
def test_a_killed_run_worker_fails_its_run_and_its_window_and_alerts(
    dagster_home: Path,
    warehouse_url: str,
    sim: Simulator,
    server: SimulatorHTTPServer,
    webhook: WebhookReceiver,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    sim.inject(Faults(delay_seconds=120.0))  # the run waits on its first page until killed
    workspace = dagster_home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: tests.daemon_location\n"
        f"      location_name: daemon_test\n      working_directory: {PROJECT_DIR}\n"
    )
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("stock_symbols", ["AAPL"])
        _, run_alerts = sensor_tick(failed_run_alerts, instance, None)
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=dagster_home,
            env={**os.environ, "POLYGON_BASE_URL": server.url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the daemon, its code server and the run worker
        )
        try:
            run = wait_for("the run to start", lambda: started_run(instance), 90, daemon)
            _, status_cursor = sensor_tick(backfill_status_sensor, instance, None)
            assert window_status(warehouse_url) == ["in_progress"]
            worker = wait_for("its pid", lambda: worker_pid(instance, run.run_id), 30, daemon)
            os.kill(worker, signal.SIGKILL)
            failed = wait_for(
                "the run to fail",
                lambda: (
                    instance.get_run_by_id(run.run_id).status  # type: ignore[union-attr]
                    == dg.DagsterRunStatus.FAILURE
                ),
                60,
                daemon,
            )
            assert failed
            sensor_tick(backfill_status_sensor, instance, status_cursor)
            assert window_status(warehouse_url) == ["failed"], "no longer in progress"
            with db.connection(warehouse_url) as conn:
                [(error,)] = conn.execute("SELECT error FROM backfill_state").fetchall()
            assert "was terminated by signal 9 (SIGKILL)" in error, error

            said, _ = sensor_tick(failed_run_alerts, instance, run_alerts)
            assert said.endswith("sent 1 alert (failed_run) to webhook"), said
            wait_for(
                "a failed tick of broken_sensor",
                lambda: any(
                    state.instigator_name == "broken_sensor"
                    and instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
                    for state in instance.all_instigator_state()
                ),
                30,
                daemon,
            )
            said, _ = sensor_tick(failed_tick_alerts, instance, None)
            assert said.endswith("sent 1 alert (failed_tick) to webhook"), said
            code, said = check_daemon(capsys)
            assert code == 0, said  # the daemon heartbeats
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
    bars, tick = webhook.texts()
    assert bars.splitlines()[0] == "Bars run failed: stock_daily_bars"
    assert f"Run {run.run_id} (aapl_daily_bars, partition {KEY}) failed: " in bars
    assert "failed: Run execution process for " in bars and "signal 9 (SIGKILL)" in bars, bars
    assert tick.splitlines()[0] == "Sensor failed: broken_sensor"
    assert "RuntimeError: broken on purpose" in tick
    assert tick.splitlines()[-1].endswith("@daemon_test/sensors/broken_sensor")
    took = time.monotonic() - started
    print(f"\nkilled run worker: run failed, its window written, alerts sent in {took:.0f} s")
