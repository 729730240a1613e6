"""Dagster's distributed topology on one machine, for the topology test and
scripts/bench_topology.py: the code location as gRPC code servers of its own (replicas with
one fixed server id) behind one address as a Kubernetes Service puts them, and the webserver
and the daemon as separate processes, all on one PostgreSQL instance storage.

Every process leads a process group of its own, so that stopping it stops what it started
(a code server's run workers).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from marketdata_pipeline import config
from tests.conftest import free_port

LOCATION = "marketdata"  # the code location's name, as in the shipped workspace.yaml
REPOSITORY = "__repository__"  # what Dagster names the repository of a Definitions
SERVER_ID = "marketdata-topology"  # one id for every replica: clients see one server
BIN = Path(sys.executable).parent

LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
BACKFILL = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status creationTime startTime endTime } }
  }
}"""
BACKFILL_UNFINISHED = {"REQUESTED", "CANCELING", "FAILING"}
LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN = """
query ($id: ID!) {
  runOrError(runId: $id) { ... on Run { status } }
}"""
RUN_FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}

GraphQL = Callable[..., dict]


class ServiceProxy:
    """A round-robin TCP proxy standing for a Kubernetes Service in front of the code server's
    replicas: each new connection goes to the next replica. A replica that refuses the
    connection is skipped, as a Service drops an endpoint whose readiness probe fails.
    `connections` counts, per replica, the connections it was given."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.connections = [0] * len(backends)
        self._next = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="service-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> tuple[int, socket.socket] | None:
        for _ in self.backends:
            with self._lock:
                index = self._next
                self._next = (self._next + 1) % len(self.backends)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backends[index]), 2)
            except OSError:
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections[index] += 1
            return index, upstream
        return None

    def _serve(self, client: socket.socket) -> None:
        connected = self._connect()
        if connected is None:
            client.close()
            return
        _, upstream = connected
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._open |= {client, upstream}
        answers = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        answers.start()
        _pump(client, upstream)
        answers.join()
        with self._lock:
            self._open -= {client, upstream}
        client.close()
        upstream.close()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._closed = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until its end; then end that direction on the other side."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def dagster_home(home: Path, dagster_pg_url: str) -> dict[str, str]:
    """A Dagster home with the shipped dagster.yaml as is (what `marketdata ui` copies); the
    environment that points the instance at its storage."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config.shipped_path("dagster.yaml"), home / "dagster.yaml")
    return {"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_pg_url}


def graphql_client(endpoint: str) -> GraphQL:
    """query(text, **variables) -> data; a GraphQL error is an AssertionError."""

    def query(text: str, **variables: object) -> dict:
        reply = httpx.post(endpoint, json={"query": text, "variables": variables}, timeout=60)
        body = reply.raise_for_status().json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    return query


RUN_STARTED = re.compile(r" - ([0-9a-f-]{36}) - \d+ - RUN_START - ")


@dataclass
class Topology:
    """The running processes; `query` is the webserver's GraphQL API."""

    home: Path
    env: dict[str, str]
    proxy: ServiceProxy
    query: GraphQL
    url: str
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)
    webserver: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    _logs: list[Path] = field(default_factory=list)

    def start_replica(self, index: int) -> None:
        """Start replica `index` of the code server (again, after `kill_replica`: as a
        Deployment replaces a pod) on its port behind the proxy."""
        port = self.proxy.backends[index]
        command = [
            sys.executable, "-m", "dagster", "api", "grpc",
            "-m", "marketdata_pipeline.definitions", "--location-name", LOCATION,
            "--host", "127.0.0.1", "--port", str(port), "--fixed-server-id", SERVER_ID,
            # Run workers start as `<this python> -m dagster`, whatever is on PATH.
            "--use-python-environment-entry-point",
        ]  # fmt: skip
        replica = self._start(f"code-server-{index}", command)
        if index < len(self.replicas):
            self.replicas[index] = replica
        else:
            self.replicas.append(replica)

    def wait_for_replica(self, index: int) -> None:
        port = self.proxy.backends[index]
        _wait(f"code server on port {port}", lambda: _serving(port), self.replicas[index], self)

    def kill_replica(self, index: int) -> None:
        """The replica and its run workers die at once, as a pod whose node is lost."""
        os.killpg(self.replicas[index].pid, signal.SIGKILL)
        self.replicas[index].wait()

    def runs_of_replica(self, index: int) -> set[str]:
        """The runs whose workers replica `index` started (their output is in its log: the
        default run launcher makes each run worker a child of the code server)."""
        logs = [log for log in self._logs if log.name.startswith(f"code-server-{index}.")]
        return {m for log in logs for m in RUN_STARTED.findall(log.read_text(errors="replace"))}

    def start_daemon(self) -> None:
        self.daemon = self._start("daemon", [str(BIN / "dagster-daemon"), "run", *self._workspace])

    def logs(self) -> str:
        """The tail of every process's log, for a failure's message."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self._logs)

    @property
    def _workspace(self) -> list[str]:
        return ["-w", str(self.home / "workspace.yaml")]

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        generation = sum(1 for log in self._logs if log.name.startswith(f"{name}."))
        log = self.home / f"{name}.{generation}.log"
        self._logs.append(log)
        with log.open("wb") as output:
            return subprocess.Popen(
                command,
                cwd=self.home,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


@contextmanager
def topology(
    home: Path, env: dict[str, str], replicas: int = 2, *, with_daemon: bool = False
) -> Iterator[Topology]:
    """The code server's replicas behind a ServiceProxy, and the webserver on a workspace that
    names the proxy by host and port; yields once the webserver has loaded the code location.
    The daemon starts with the webserver (`with_daemon`, as under `dagster dev`) or when the
    caller calls `start_daemon`. Everything started is stopped on the way out, failed or not."""
    proxy = ServiceProxy([free_port() for _ in range(replicas)])
    (home / "workspace.yaml").write_text(
        "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
        f"      port: {proxy.port}\n      location_name: {LOCATION}\n"
    )
    web_port = free_port()
    url = f"http://127.0.0.1:{web_port}"
    env = {"MARKETDATA_UI_URL": url, **env}  # the alerts' links: this webserver
    running = Topology(home, env, proxy, graphql_client(f"{url}/graphql"), url)
    try:
        for index in range(replicas):
            running.start_replica(index)
        for index in range(replicas):
            running.wait_for_replica(index)
        running.webserver = running._start(
            "webserver",
            [str(BIN / "dagster-webserver"), *running._workspace,
             "-h", "127.0.0.1", "-p", str(web_port)],
        )  # fmt: skip
        if with_daemon:
            running.start_daemon()
        _wait("the webserver", lambda: _location_loaded(running.query), running.webserver, running)
        yield running
    finally:
        proxy.close()
        _stop(*(p for p in [running.daemon, running.webserver, *running.replicas] if p))


def _serving(port: int) -> bool:
    """`dagster api grpc-health-check`, as a readiness probe runs it, once the port is open
    (each check is a Python process of its own: not one every half second while loading)."""
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return False
    check = subprocess.run(
        [sys.executable, "-m", "dagster", "api", "grpc-health-check",
         "-h", "127.0.0.1", "-p", str(port)],
        capture_output=True,
    )  # fmt: skip
    return check.returncode == 0


WORKSPACE = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus versionKey updatedTimestamp
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }"""


def location_version(query: GraphQL) -> str:
    """Which load of the code location the webserver holds: it changes when the webserver
    reloads the location (as it does when the server's id changes)."""
    [entry] = query(WORKSPACE)["workspaceOrError"]["locationEntries"]
    return f"{entry['versionKey']} loaded at {entry['updatedTimestamp']}"


def _location_loaded(query: GraphQL) -> bool:
    try:
        [entry] = query(WORKSPACE)["workspaceOrError"]["locationEntries"]
    except httpx.HTTPError:
        return False
    if entry["loadStatus"] != "LOADED":
        return False
    loaded = entry["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", loaded
    return True


def _wait(
    what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], running: Topology
) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} stopped (exit {process.returncode})\n{running.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in 120 s\n{running.logs()}")
        time.sleep(0.5)


def _stop(*processes: subprocess.Popen[bytes]) -> None:
    """SIGTERM to each process's group (a code server's run workers with it), SIGKILL to
    what is left of the groups after 15 s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def launch_backfill(query: GraphQL, asset: str, partitions: list[str]) -> str:
    """A backfill of the asset's partitions, as the UI's Materialize dialog launches it."""
    params = {"assetSelection": [{"path": [asset]}], "partitionNames": partitions}
    launched = query(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def finished_backfill(query: GraphQL, backfill_id: str, seconds: float) -> tuple[str, list[dict]]:
    """The backfill's final status and its runs, once the daemon has marked it done."""
    deadline = time.monotonic() + seconds
    while True:
        state = query(BACKFILL, id=backfill_id)
        status = state["partitionBackfillOrError"]["status"]
        if status not in BACKFILL_UNFINISHED:
            return status, state["runsOrError"]["results"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"backfill {backfill_id} still {status} after {seconds:.0f} s")
        time.sleep(1)


def launch_run(query: GraphQL, job: str, run_config: dict) -> str:
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "jobName": job,
        },
        "runConfigData": run_config,
    }
    launched = query(LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def finished_run(query: GraphQL, run_id: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while (status := query(RUN, id=run_id)["runOrError"]["status"]) not in RUN_FINISHED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {status} after {seconds:.0f} s")
        time.sleep(0.5)
    return status
