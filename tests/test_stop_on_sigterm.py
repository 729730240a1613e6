"""Dagster's "terminate run" sends SIGTERM to the run's process: a bars run stops within
seconds, even while the provider is slow and a read-ahead worker is mid-request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import migrations
from tests.conftest import PROJECT_DIR

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
def test_a_run_stops_within_seconds_of_sigterm(database_url: str) -> None:
    with db.connection(database_url) as conn:
        migrations.migrate(conn)
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
