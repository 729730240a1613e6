"""Dagster's "terminate run" sends SIGTERM to the run's process: a bars run stops within
seconds, even while the provider is slow and a read-ahead worker is mid-request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import PROJECT_DIR, free_port

# The run worker of `dagster api execute_run` maps SIGTERM to SIGINT's handler before it
# runs the job; this child does the same, then materializes two years of one symbol against a
# provider that takes 20 s to answer a page, so the read-ahead worker is mid-request.
CHILD = """
import sys
import dagster as dg
from dagster._utils.interrupts import setup_interrupt_handlers
from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.polygon.simulator import Faults, Simulator, serve

setup_interrupt_handlers()
sim = Simulator()
sim.inject(Faults(delay_seconds=20.0))
server = serve(sim)
asset = next(a for a in bars_assets if a.key.path[-1] == "crypto_minute_bars")
with dg.instance_for_test() as instance:
    instance.add_dynamic_partitions("crypto_symbols", ["BTC"])
    print("started", flush=True)
    result = dg.materialize(
        [asset],
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": "2022-01-01|BTC",
            "dagster/asset_partition_range_end": "2023-12-01|BTC",
        },
        resources={
            "warehouse": WarehouseResource(),
            "polygon": PolygonResource(base_url=server.url, simulated=True),
        },
        raise_on_error=False,
    )
    print("finished", result.success, flush=True)
"""


@pytest.mark.slow
def test_a_run_stops_within_seconds_of_sigterm(warehouse_url: str) -> None:
    database_url = warehouse_url
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "started"
    time.sleep(5)  # the run has started and waits for its first page
    assert child.poll() is None, "the run is still going when it is told to stop"
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    stopped_after = time.monotonic() - sent
    print(f"stopped {stopped_after:.1f} s after SIGTERM")
    assert stopped_after < 8, err[-2000:]
    assert "finished True" not in out, "it stopped, it did not run to the end"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_ui_stopped_by_a_signal_stops_dagster_the_api_and_its_server(tmp_path, stop) -> None:
    """A service manager's stop (SIGTERM, or SIGINT, to the `marketdata ui` process alone)
    shuts the UI down as Ctrl-C does: dagster dev and the read API end, the embedded
    PostgreSQL it started stops."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DATABASE_"))}
    env |= {"MARKETDATA_HOME": str(home), "DAGSTER_HOME": ""}
    api_port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketdata_pipeline",
            "ui",
            "--port",
            str(free_port()),
            "--api-port",
            str(api_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its processes are the session's: none may be left
    )
    try:
        assert ui.stdout is not None
        said = []
        for line in ui.stdout:
            said.append(line)
            if line.startswith("Dagster UI:"):
                break
        assert any(line.startswith("Dagster UI:") for line in said), "".join(said)
        time.sleep(5)  # dagster dev starts its webserver and daemon
        assert (home / "pgdata" / "postmaster.pid").exists()
        # The read API beside it answers the admin key that bootstrap printed.
        admin_key = next(
            line.rsplit(": ", 1)[1].strip() for line in said if "admin API key" in line
        )
        health = httpx.get(
            f"http://127.0.0.1:{api_port}/v1/health", headers={"X-API-Key": admin_key}, timeout=10
        )
        assert health.status_code == 200 and health.json()["warehouse"] == "reachable"
        ui.send_signal(stop)
        rest, _ = ui.communicate(timeout=90)
        assert ui.returncode == 0, "".join(said) + rest
        assert "embedded PostgreSQL stopped" in rest
        assert not (home / "pgdata" / "postmaster.pid").exists()
        assert not (home / "ui.json").exists()
        time.sleep(1)
        leftover = subprocess.run(
            ["pgrep", "-a", "-s", str(ui.pid)], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        alive = [line for line in leftover if "<defunct>" not in line]  # exited, not yet reaped
        assert not alive, f"processes left: {alive}"
    finally:
        if ui.poll() is None:  # failed while it ran: leave nothing of its session behind
            os.killpg(ui.pid, signal.SIGKILL)
