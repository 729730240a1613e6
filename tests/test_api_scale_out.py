"""The read API on several processes: three `marketdata serve` processes on one warehouse hold
one key's rate limit, its requests in progress and streams open, and the refused-key throttle
together; a killed process's slots come free; X-Forwarded-For is believed from trusted
proxies only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from marketdata_pipeline.api.shared_limits import ALIVE_SECONDS, HEARTBEAT_SECONDS, SharedLimits
from marketdata_pipeline.config import api_rate_limit
from marketdata_pipeline.registry import api_keys
from marketdata_pipeline.warehouse.connection import connection
from tests.conftest import PROJECT_DIR
from tests.test_read_api import Server, api_server

PAGE = "/v1/bars/AAPL?timeframe=minute&start=2024-01-02&end=2024-01-03"
STREAM = f"{PAGE}&format=csv"


@contextmanager
def cluster(url: str, tmp_path: Path, *args: str, count: int = 3) -> Iterator[list[Server]]:
    tmp_path.mkdir(exist_ok=True)
    with contextlib.ExitStack() as running:
        yield [
            running.enter_context(api_server(url, tmp_path / f"serve-{i}.log", *args))
            for i in range(count)
        ]


def _key(url: str, name: str) -> str:
    with connection(url) as conn:
        return api_keys.create(conn, name)[1]


def _waiting_on_bars(url: str) -> int:
    with connection(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'bars_minute'::regclass AND NOT granted"
        ).fetchone()
    assert row is not None
    return row[0]


def _processes(url: str) -> int:
    with connection(url) as conn:
        row = conn.execute("SELECT count(*) FROM api_processes").fetchone()
    assert row is not None
    return row[0]


def _until(condition: object, seconds: float, what: str) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < seconds, f"not within {seconds} s: {what}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_three_processes_allow_one_key_its_limit_and_no_more(
    warehouse_url: str, tmp_path: Path
) -> None:
    """Nine requests of one key at once, three on each process, against 6 a minute: six
    pass, wherever they land; then each process refuses the key with Retry-After. Refused
    keys from one address are counted together too."""
    raw = _key(warehouse_url, "spread")
    with cluster(warehouse_url, tmp_path, "--rate-limit", "6/minute") as servers:
        racing = threading.Barrier(9)

        def ask(i: int) -> int:
            with servers[i % 3].client(raw) as client:
                racing.wait()
                return client.get("/v1/symbols").status_code

        with ThreadPoolExecutor(9) as pool:
            raced = list(pool.map(ask, range(9)))
        after = []
        for server in servers:
            with server.client(raw) as client:
                after.append(client.get("/v1/symbols"))
        # Refused keys: six 401s spread over the processes, then 429 on each.
        bad = {"X-API-Key": "mdw_nope"}
        refused = [httpx.get(f"{servers[i % 3].url}/v1/health", headers=bad) for i in range(6)]
        throttled = [httpx.get(f"{s.url}/v1/health", headers=bad) for s in servers]
        other = _key(warehouse_url, "other")
        with servers[2].client(other) as client:
            usage = client.get("/v1/usage").json()
    assert sorted(raced) == [200] * 6 + [429] * 3, raced
    for response in after:
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.json()["error"].startswith(
            "rate limit of 6 per 1 minute for this key reached: retry in "
        )
    assert [r.status_code for r in refused] == [401] * 6
    for response in throttled:
        assert response.status_code == 429
        assert "for refused API keys from this address" in response.json()["error"]
    assert usage["rate_limit_remaining"] == 5, "another key has a window of its own"
    with connection(warehouse_url) as conn:
        [record] = [k for k in api_keys.list_keys(conn) if k.name == "spread"]
        trail = api_keys.audit(conn, key_id=record.id)
    # Every request is audited and counted, the refused ones too, with its client.
    assert sorted(e.status_code for e in trail) == [200] * 6 + [429] * 6
    assert record.request_count == 12
    assert {e.client_address for e in trail} == {"127.0.0.1"}


def test_requests_in_progress_and_streams_open_are_capped_across_processes_and_a_killed_process_frees_its_own(  # noqa: E501
    warehouse_url: str, tmp_path: Path
) -> None:
    """With the minute bars locked, one key's 8 pages wait inside two processes (4 each) and
    another key's 2 streams (1 each): the third process refuses a ninth page and a third
    stream. Killed with SIGKILL, the first process cannot give its slots back: they count
    until it has missed its heartbeats, then the third process accepts both."""
    pages_key, streams_key = _key(warehouse_url, "pages"), _key(warehouse_url, "streams")
    with (
        cluster(warehouse_url, tmp_path) as (first, second, third),
        connection(warehouse_url) as lock,
        ThreadPoolExecutor(16) as pool,
    ):

        def get(server: Server, raw: str, path: str) -> int | str:
            try:
                with server.client(raw) as client:
                    return client.get(path).status_code
            except httpx.TransportError as lost:  # the killed process's
                return type(lost).__name__

        lock.execute("LOCK TABLE bars_minute IN ACCESS EXCLUSIVE MODE")
        held = [pool.submit(get, server, pages_key, PAGE) for server in (first, second) * 4]
        held += [pool.submit(get, server, streams_key, STREAM) for server in (first, second)]
        _until(lambda: _waiting_on_bars(warehouse_url) == 10, 30, "10 requests at the lock")
        with third.client(pages_key) as client:
            ninth = client.get("/v1/symbols")
        with third.client(streams_key) as client:
            third_stream = client.get(STREAM)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        killed = time.monotonic()
        with third.client(pages_key) as client:
            freed = _until(
                lambda: client.get("/v1/symbols").status_code == 200,
                ALIVE_SECONDS + HEARTBEAT_SECONDS + 10,
                "the killed process's request slots came free",
            )
        # The third stream now gets its slot: it reaches the lock instead of a 429. (The
        # killed process's sessions still wait there: a backend waiting on a lock does not
        # notice that its client is gone.)
        waiting = _waiting_on_bars(warehouse_url)
        held.append(pool.submit(get, third, streams_key, STREAM))
        _until(
            lambda: held[-1].done() or _waiting_on_bars(warehouse_url) > waiting,
            10,
            "the third stream answered or at the lock",
        )
        assert not held[-1].done(), f"the third stream was answered {held[-1].result()}"
        waited = time.monotonic() - killed
        lock.rollback()
        outcomes = [future.result(timeout=30) for future in held]
    assert ninth.status_code == 429 and ninth.headers["Retry-After"] == "5"
    assert "this key has 8 requests in progress" in ninth.json()["error"]
    assert third_stream.status_code == 429 and third_stream.headers["Retry-After"] == "5"
    assert "this key has 2 streams open already" in third_stream.json()["error"]
    print(f"a killed process's slots came free {freed:.1f} s after the kill ({waited:.1f} s)")
    assert freed > 1, "slots of a process just killed still count"
    # The second process's held requests and the new stream finished; the first's died.
    assert outcomes[1::2][:4] == [200] * 4 and outcomes[-2:] == [200, 200], outcomes
    assert all(isinstance(o, str) for o in outcomes[0:8:2]), outcomes


def test_a_stopped_process_gives_its_slots_back_at_once(warehouse_url: str, tmp_path: Path) -> None:
    """And a process forgotten (as when the warehouse restarted after a crash, which empties
    the unlogged tables of the limits) joins again at its next request."""
    raw = _key(warehouse_url, "stopping")
    with cluster(warehouse_url, tmp_path, count=2) as (first, _second):
        with first.client(raw) as client:
            assert client.get("/v1/symbols").status_code == 200
            with connection(warehouse_url) as conn:
                conn.execute("TRUNCATE api_processes, api_slots, api_rate_hits")
            assert client.get("/v1/symbols").status_code == 200
            assert client.get(STREAM).status_code == 200
        _until(lambda: _processes(warehouse_url) == 2, 10, "the second process beat again")
        first.process.terminate()
        first.process.wait(timeout=15)
        left = _processes(warehouse_url)
    assert left == 1, "a process stopped gracefully leaves no row, nor slots, behind"


def test_x_forwarded_for_is_believed_from_trusted_proxies_only(
    warehouse_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a trusted proxy (here the test, on loopback), two clients' refused keys are
    counted apart, by the right-most address of X-Forwarded-For that is not a proxy's: a
    client cannot dodge its count with addresses of its own put in front. From a peer not
    trusted, the header changes nothing."""
    bad = "mdw_nope"

    def refuse(server: Server, forwarded: str) -> httpx.Response:
        headers = {"X-API-Key": bad, "X-Forwarded-For": forwarded}
        return httpx.get(f"{server.url}/v1/health", headers=headers)

    monkeypatch.setenv("MARKETDATA_API_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    with cluster(warehouse_url, tmp_path, "--rate-limit", "3/minute", count=1) as [proxied]:
        first = [refuse(proxied, "203.0.113.1").status_code for _ in range(3)]
        # Addresses in front of the client's are the client's own claims.
        dodging = refuse(proxied, "198.51.100.7, 203.0.113.1")
        # Addresses after it are proxies of the trusted networks: passed over.
        through_two = refuse(proxied, "203.0.113.1, 10.1.2.3")
        second = [refuse(proxied, "203.0.113.2").status_code for _ in range(3)]
    monkeypatch.delenv("MARKETDATA_API_TRUSTED_PROXIES")
    untrusted = ("--rate-limit", "3/minute", "--trusted-proxy", "10.0.0.0/8")
    with cluster(warehouse_url, tmp_path / "untrusted", *untrusted, count=1) as [direct]:
        rotating = [refuse(direct, f"203.0.113.{i}").status_code for i in range(10, 14)]
    assert first == [401] * 3
    assert dodging.status_code == 429 and through_two.status_code == 429
    assert "for refused API keys from this address" in dodging.json()["error"]
    assert second == [401] * 3, "another client behind the proxy is counted apart"
    assert rotating == [401, 401, 401, 429], "from an untrusted peer the header is ignored"
    with connection(warehouse_url) as conn:
        clients = [e.client_address for e in api_keys.audit(conn, limit=100)]
    assert clients.count("203.0.113.1") == 5 and clients.count("203.0.113.2") == 3
    assert clients.count("127.0.0.1") == 4


@pytest.mark.parametrize(
    ("args", "environment", "expected"),
    [
        (["--trusted-proxy", "10.0.0.300/8"], {}, "--trusted-proxy '10.0.0.300/8' is not"),
        (["--trusted-proxy", "10.0.0.1/8"], {}, "--trusted-proxy '10.0.0.1/8' is not"),
        ([], {"MARKETDATA_API_TRUSTED_PROXIES": "10.0.0.0/8,proxy.local"},
         "MARKETDATA_API_TRUSTED_PROXIES 'proxy.local' is not"),
    ],
)  # fmt: skip
def test_a_bad_trusted_proxy_exits_with_one_line(
    args: list[str], environment: dict[str, str], expected: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "marketdata_pipeline", "serve", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env={**os.environ, **environment},
        timeout=60,
    )
    assert done.returncode != 0, done.stderr
    assert done.stderr.startswith(f"marketdata: error: {expected}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_process_whose_own_beat_is_late_still_counts_its_own_slots(warehouse_url: str) -> None:
    """Its heartbeat's session refused (the server full) while its pool still works: the
    slots it holds must keep counting against the key's cap."""
    limits = SharedLimits(api_rate_limit("600/minute"))
    with connection(warehouse_url, autocommit=True) as conn:
        key, _ = api_keys.create(conn, "late beat")
        limits.register(conn)
        conn.execute(
            "UPDATE api_processes SET heartbeat_at = now() - interval '1 hour' WHERE id = %s",
            (limits.process_id,),
        )
        taken = [limits.take(conn, key.id, "stream", 2) for _ in range(3)]
    assert taken[0] is not None and taken[1] is not None
    assert taken[2] is None, "a third stream past the cap of 2"
