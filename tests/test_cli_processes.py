"""Commands that cannot start: one line, a non-zero exit within seconds, nothing left running;
and the simulator stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import PROJECT_DIR, free_port


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process would have: bound and listening for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def marked_env(tmp_path: Path) -> tuple[dict[str, str], str]:
    """An environment for the command whose every descendant can be found by a marker."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DATABASE_"))}
    env |= {"MARKETDATA_HOME": str(tmp_path / "home"), "MARKETDATA_TEST_MARKER": marker}
    return env, marker


def processes_with(marker: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("MARKETDATA_TEST_MARKER") == marker:
                found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def run_marked(args: list[str], env: dict[str, str], timeout: float = 30):
    """`marketdata ARGS` in a session of its own, killed whole if it outlives `timeout`."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "marketdata_pipeline", *args],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, out, err, time.monotonic() - started


@pytest.mark.parametrize("which", ["--port", "--api-port"])
def test_a_ui_whose_port_is_taken_says_so_in_one_line_and_starts_nothing(
    tmp_path: Path, held_port: int, which: str
) -> None:
    env, marker = marked_env(tmp_path)
    ports = {"--port": str(free_port()), "--api-port": str(free_port())} | {which: str(held_port)}
    code, out, err, took = run_marked(["ui", *(x for kv in ports.items() for x in kv)], env)
    assert code == 1, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert f"cannot listen on 127.0.0.1:{held_port}" in err and which in err
    assert took < 15
    assert processes_with(marker) == []
    assert not (tmp_path / "home" / "pgdata" / "postmaster.pid").exists(), "no server started"


@pytest.mark.parametrize("where", ["busy port", "bad host"])
def test_a_simulator_that_cannot_listen_says_so_in_one_line(
    tmp_path: Path, held_port: int, where: str
) -> None:
    env, marker = marked_env(tmp_path)
    host = "127.0.0.1" if where == "busy port" else "no-such-host.invalid"
    code, out, err, took = run_marked(["simulator", "--host", host, "--port", str(held_port)], env)
    assert code == 1, out + err
    assert err.strip().splitlines() == [err.strip()], err
    assert f"cannot listen on {host}:{held_port}" in err
    assert took < 15
    assert processes_with(marker) == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_simulator_stops_promptly_on_a_signal(tmp_path: Path, stop: signal.Signals) -> None:
    env, _ = marked_env(tmp_path)
    simulator = subprocess.Popen(
        [sys.executable, "-m", "marketdata_pipeline", "simulator", "--port", str(free_port())],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert simulator.stdout is not None
        assert "Polygon simulator" in simulator.stdout.readline()
        sent = time.monotonic()
        simulator.send_signal(stop)
        simulator.wait(timeout=10)
        assert time.monotonic() - sent < 3
        assert simulator.returncode == 0
    finally:
        if simulator.poll() is None:
            simulator.kill()
        simulator.communicate()
