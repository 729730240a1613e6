"""Dagster's distributed topology, for real on one machine: the code location as a gRPC code
server with two replicas behind one address (tests/topology.py's ServiceProxy standing for the
Kubernetes Service), the webserver and the daemon as separate processes, all on one
PostgreSQL instance storage (the shipped dagster.yaml), the workspace naming the code server
by host and port. Started once for the module:

- a backfill launched through the webserver's GraphQL API succeeds: the daemon makes its
  runs, launches them through the code server (a replica's child process runs each), and
  the bars are in the warehouse;
- with one replica killed, admin jobs launched through GraphQL still run: on the other
  replica, then on the killed one's replacement alone (each replica on its own serves);
- the daemon's sensor ticks are in the shared instance storage, and did their work.

    pytest tests/test_topology.py -q

The tests run in this order, on the one topology.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg
import pytest
from dagster._core.storage.tags import GRPC_INFO_TAG
from psycopg import sql

from marketdata_pipeline.defs.sensors import register_symbol_partitions
from marketdata_pipeline.domain import AssetClass, next_month
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.polygon.simulator import Simulator, serve
from marketdata_pipeline.registry import api_keys, key_delivery, symbols
from marketdata_pipeline.warehouse import migrations
from marketdata_pipeline.warehouse.connection import connection, psycopg2_url, with_database
from tests.conftest import run_cli
from tests.test_alerts import ALERT_VARIABLES
from tests.topology import (
    BACKFILL,
    LOCATION,
    REPOSITORY,
    RUN_FINISHED,
    GraphQL,
    Topology,
    dagster_home,
    finished_backfill,
    finished_run,
    launch_backfill,
    launch_run,
    location_version,
    topology,
)

SYMBOLS = ["AAPL", "MSFT"]  # the registry, in order: adjacent partitions
# The partitions start two months before this one: the backfill's months are complete, and a
# symbol added is given a short history. The clock (the simulator's and the runs') stands on
# the second day of this month, so that the backfill's bars are the same at any hour.
FIRST_MONTH = (datetime.now(UTC).date().replace(day=1) - timedelta(days=40)).replace(day=1)
MONTHS = [FIRST_MONTH, next_month(FIRST_MONTH)]
NOW = datetime.combine(next_month(MONTHS[-1]) + timedelta(days=1), datetime.min.time(), UTC)
ASSET = "stock_minute_bars"
pytestmark = pytest.mark.slow


@dataclass
class Running:
    topology: Topology
    warehouse_url: str
    simulator_url: str
    backfill_id: str
    location_version: str  # the webserver's load of the location, at the start


@contextmanager
def new_database(admin_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def running(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp("topology")
    identity = key_delivery.create_identity(work / "operator-identity")
    simulator = serve(Simulator(now=NOW))
    with (
        new_database(pg_admin_url, "t_topo") as warehouse_url,
        new_database(pg_admin_url, "dagster_topo") as instance_url,
        pytest.MonkeyPatch.context() as patch,
    ):
        with connection(warehouse_url) as conn:
            migrations.migrate(conn)
            for symbol in SYMBOLS:
                symbols.add(conn, symbol, AssetClass.STOCK)
        leave_out = ("POLYGON_", "DAGSTER_", "MARKETDATA_", *ALERT_VARIABLES)
        env = {k: v for k, v in os.environ.items() if not k.startswith(leave_out)}
        env |= dagster_home(work / "dagster", psycopg2_url(instance_url))
        env |= {
            "DATABASE_URL": warehouse_url,
            "POLYGON_BASE_URL": simulator.url,
            "MARKETDATA_SIMULATED": "1",
            "MARKETDATA_ALLOW_SYNTHETIC": "1",
            "MARKETDATA_HISTORY_START": f"{FIRST_MONTH:%Y-%m}",
            "MARKETDATA_NOW": NOW.isoformat(),
            "MARKETDATA_HOME": str(work),
            # As the image and the chart set them: no embedded fallback anywhere, and raw
            # keys made by runs sealed to the operator's public key.
            "MARKETDATA_DEPLOYMENT": "1",
            "MARKETDATA_KEY_RECIPIENT": key_delivery.public_text(identity.recipient),
        }
        for name, value in env.items():
            patch.setenv(name, value)
        # As `marketdata ui` does before the UI opens: the registry's partitions, so that the
        # registry sensor's first tick backfills no history of the symbols already there.
        with dg.DagsterInstance.get() as instance, connection(warehouse_url) as conn:
            register_symbol_partitions(instance, conn)
        try:
            with topology(work / "dagster", env) as started:
                keys = [f"{month}|{symbol}" for symbol in SYMBOLS for month in MONTHS]
                backfill_id = launch_backfill(started.query, ASSET, keys)
                # Started after the launch: the backfill daemon looks every 30 s, and its
                # first look is at its start, so the backfill is not left waiting for it.
                started.start_daemon()
                version = location_version(started.query)
                yield Running(started, warehouse_url, simulator.url, backfill_id, version)
        finally:
            simulator.shutdown()
            simulator.server_close()


def test_a_backfill_launched_through_graphql_runs_through_the_code_server(
    running: Running,
) -> None:
    query = running.topology.query
    runs = finished_runs(query, running.backfill_id, len(MONTHS), 120)
    assert [run["status"] for run in runs] == ["SUCCESS"] * len(MONTHS), running.topology.logs()
    # The default run launcher asked the code server for each run, at the Service's address
    # (a tag the webserver hides: read from the shared instance storage), and one replica's
    # child process ran it.
    with dg.DagsterInstance.get() as instance:
        for run in runs:
            dagster_run = instance.get_run_by_id(run["runId"])
            assert dagster_run is not None
            grpc = json.loads(dagster_run.tags[GRPC_INFO_TAG])
            assert grpc == {"host": "127.0.0.1", "port": running.topology.proxy.port}
    ran = [running.topology.runs_of_replica(index) for index in (0, 1)]
    assert all((run["runId"] in ran[0]) != (run["runId"] in ran[1]) for run in runs), ran

    first, end = MONTHS[0], next_month(MONTHS[-1])
    with PolygonClient(None, running.simulator_url) as client:
        served = {
            symbol: client.aggregates(symbol, 1, "minute", first, end - timedelta(days=1)).height
            for symbol in SYMBOLS
        }
    with connection(running.warehouse_url) as conn:
        stored = dict(
            conn.execute(
                "SELECT symbol, count(*) FROM bars_minute GROUP BY symbol ORDER BY symbol"
            ).fetchall()
        )
    assert stored == served
    assert min(stored.values()) > 1000  # minute bars of two months, not an empty page


def finished_runs(query: GraphQL, backfill_id: str, count: int, seconds: float) -> list[dict]:
    """The backfill's runs, once `count` of them have ended (the backfill itself is marked
    done by the daemon's next look, up to 30 s later: the last test checks that)."""
    deadline = time.monotonic() + seconds
    while True:
        runs = query(BACKFILL, id=backfill_id)["runsOrError"]["results"]
        if len(runs) >= count and all(run["status"] in RUN_FINISHED for run in runs):
            return runs
        if time.monotonic() > deadline:
            raise TimeoutError(f"backfill {backfill_id}: runs {runs} after {seconds:.0f} s")
        time.sleep(1)


IN_PROGRESS = """
{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) {
    ... on Runs { results { runId } } } }"""


def wait_until_idle(running: Running) -> None:
    """No run in progress: a replica killed below takes no run worker with it (what becomes
    of those is another test's, tests/test_daemon.py)."""
    deadline = time.monotonic() + 90
    while running.topology.query(IN_PROGRESS)["runsOrError"]["results"]:
        assert time.monotonic() < deadline, "runs still in progress after 90 s"
        time.sleep(0.5)


def admin_run(running: Running, job: str, config: dict) -> str:
    """An admin job launched through GraphQL as from the launchpad; its run id, once done."""
    run_id = launch_run(running.topology.query, job, {"ops": config})
    status = finished_run(running.topology.query, run_id, 90)
    assert status == "SUCCESS", running.topology.logs()
    return run_id


def test_a_key_made_by_a_run_is_revealed_once_elsewhere_and_revoked_with_a_replica_dead(
    running: Running,
) -> None:
    """The raw key a `create_api_key` run makes reaches the operator through the warehouse,
    sealed (a run container's disk is gone with it); `keys reveal` on another machine (here:
    another process, with only DATABASE_URL and the identity) shows it once."""
    topology, proxy = running.topology, running.topology.proxy
    made = admin_run(running, "create_api_key", {"issue_api_key": {"config": {"name": "topo"}}})
    with connection(running.warehouse_url) as conn:
        key = api_keys.find_by_name(conn, "topo")
    assert key is not None
    operator = {
        "DATABASE_URL": running.warehouse_url,
        "MARKETDATA_KEY_IDENTITY": str(running.topology.home.parent / "operator-identity"),
    }
    shown = run_cli("keys", "reveal", str(key.id), env=operator)
    assert shown.returncode == 0, shown.stderr
    raw = shown.stdout.split()[-1]
    with connection(running.warehouse_url) as conn:
        assert api_keys.authenticate(conn, raw).id == key.id
    again = run_cli("keys", "reveal", str(key.id), env=operator)
    assert f"API key {key.id} has no sealed raw key: revealed already" in again.stderr, "once"
    assert raw not in topology.logs() and raw not in json.dumps(run_events(made))

    wait_until_idle(running)
    topology.kill_replica(1)
    before = list(proxy.connections)
    run_id = admin_run(running, "revoke_key", {"revoke_api_key": {"config": {"key_id": key.id}}})
    with connection(running.warehouse_url) as conn:
        assert not api_keys.get(conn, key.id).active
    assert run_id in topology.runs_of_replica(0), "the live replica ran it"
    assert proxy.connections[1] == before[1], "nothing reached the dead one"


def run_events(run_id: str) -> list[str]:
    """Every event of the run, as the instance storage keeps it."""
    with dg.DagsterInstance.get() as instance:
        return [str(record) for record in instance.all_logs(run_id)]


def test_a_replaced_replica_alone_serves_an_admin_job_that_adds_a_symbol(
    running: Running,
) -> None:
    """Replica 1 comes back (as a Deployment replaces a pod: the same server id behind the
    same Service) and replica 0 dies: the location goes on, on the new one alone."""
    topology = running.topology
    topology.start_replica(1)
    topology.wait_for_replica(1)
    wait_until_idle(running)
    topology.kill_replica(0)
    config = {"symbol": "nvda", "asset_class": "STOCK"}
    run_id = admin_run(running, "add_symbol", {"register_symbol": {"config": config}})
    with connection(running.warehouse_url) as conn:
        registered = conn.execute(
            "SELECT asset_class, active FROM tracked_symbols WHERE symbol = 'NVDA'"
        ).fetchall()
    assert registered == [("stock", True)]
    assert run_id in topology.runs_of_replica(1)
    # One server id for every replica: the webserver, which asks for it every second through
    # the Service, never took the other replicas, nor the new one, for a new deployment.
    assert location_version(topology.query) == running.location_version


SENSOR_TICKS = """
query ($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { sensorState { status ticks(limit: 20) { status runIds skipReason } } }
  }
}"""


def sensor_ticks(running: Running, name: str) -> tuple[str, list[dict]]:
    """The sensor's status and ticks, oldest first."""
    selector = {
        "repositoryLocationName": LOCATION,
        "repositoryName": REPOSITORY,
        "sensorName": name,
    }
    state = running.topology.query(SENSOR_TICKS, selector=selector)["sensorOrError"]
    return state["sensorState"]["status"], state["sensorState"]["ticks"][::-1]


def window_states(url: str) -> list[tuple[str, date, str]]:
    with connection(url) as conn:
        return conn.execute(
            "SELECT symbol, month, status FROM backfill_state "
            "WHERE asset = %s AND symbol = ANY(%s) ORDER BY symbol, month",
            (ASSET, SYMBOLS),
        ).fetchall()


def test_the_daemon_finishes_the_backfill_and_ticks_the_sensors_into_the_shared_instance(
    running: Running,
) -> None:
    """Last: the daemon's later looks (every 30 s) happened meanwhile. The webserver reads
    what the daemon wrote into the one instance storage."""
    query = running.topology.query
    status, runs = finished_backfill(query, running.backfill_id, 60)
    assert status == "COMPLETED_SUCCESS", running.topology.logs()
    assert len(runs) == len(MONTHS)

    status, ticks = sensor_ticks(running, "symbol_registry_sensor")
    assert status == "RUNNING" and ticks, ticks
    # Its first tick asked for the splits of the symbols never fetched: one run, which ran.
    first_request = next(tick for tick in ticks if tick["runIds"])
    assert first_request["status"] == "SUCCESS", ticks
    [run_id] = first_request["runIds"]
    assert finished_run(query, run_id, 60) == "SUCCESS"

    # backfill_status_sensor writes the backfill's windows on its tick after the runs' end,
    # and says so in its skip reason (it requests no runs).
    want = [(symbol, month, "completed") for symbol in SYMBOLS for month in MONTHS]
    deadline = time.monotonic() + 45
    while window_states(running.warehouse_url) != want and time.monotonic() < deadline:
        time.sleep(1)
    assert window_states(running.warehouse_url) == want
    status, ticks = sensor_ticks(running, "backfill_status_sensor")
    said = [tick["skipReason"] or "" for tick in ticks]
    assert status == "RUNNING" and any(" of bars runs: " in text for text in said), ticks
