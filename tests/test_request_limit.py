"""The Polygon request limit shared through the warehouse: held across processes."""

from __future__ import annotations

import subprocess
import sys
import time

from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.request_limit import MARGIN_SECONDS, SharedRequestLimit, key_id
from tests.conftest import PROJECT_DIR

WINDOW = 2.0
PER_WINDOW = 4
# A child process takes requests from the shared limit and prints when each was granted.
CHILD = """
import sys, time
from marketdata_pipeline.warehouse.request_limit import SharedRequestLimit
limit = SharedRequestLimit(sys.argv[1], "pk_shared_key", int(sys.argv[2]),
                           window_seconds=float(sys.argv[3]))
for _ in range(int(sys.argv[4])):
    limit.acquire()
    print(time.time(), flush=True)
"""


def test_processes_sharing_a_key_never_exceed_its_limit(migrated_url: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, migrated_url, str(PER_WINDOW), str(WINDOW), "4"],
            cwd=PROJECT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    stamps: list[float] = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        stamps += [float(line) for line in out.split()]
    stamps.sort()
    assert len(stamps) == 12
    # Any PER_WINDOW + 1 grants span at least a window and its margin (less a little for
    # process clocks) ...
    spans = [stamps[i + PER_WINDOW] - stamps[i] for i in range(len(stamps) - PER_WINDOW)]
    assert min(spans) >= WINDOW + MARGIN_SECONDS - 0.05
    # ... and the limit is used, not avoided: 12 grants take about 2 windows, not 12.
    assert stamps[-1] - stamps[0] < 3 * (WINDOW + MARGIN_SECONDS) + 1.0


def test_keys_have_their_own_limits_and_are_never_stored(migrated_url: str) -> None:
    first = SharedRequestLimit(migrated_url, "pk_first", 2, window_seconds=30)
    second = SharedRequestLimit(migrated_url, "pk_second", 2, window_seconds=30)
    started = time.monotonic()
    for limit in (first, first, second, second):
        limit.acquire()
    assert time.monotonic() - started < 5, "another key's requests never wait"
    with db.connection(migrated_url) as conn:
        logged = conn.execute("SELECT key_id, count(*) FROM polygon_requests GROUP BY 1")
        counts = dict(logged.fetchall())
        dump = str(conn.execute("SELECT * FROM polygon_requests").fetchall())
    assert counts == {key_id("pk_first"): 2, key_id("pk_second"): 2}
    assert "pk_first" not in dump and "pk_second" not in dump


def test_a_full_window_waits_until_its_oldest_request_leaves(migrated_url: str) -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    limit = SharedRequestLimit(migrated_url, None, 2, window_seconds=WINDOW, sleep=sleep)
    started = time.monotonic()
    for _ in range(3):
        limit.acquire()
    took = time.monotonic() - started
    assert len(waits) == 1 and 0 < waits[0] <= WINDOW + MARGIN_SECONDS
    assert WINDOW + MARGIN_SECONDS - 0.1 <= took < WINDOW + MARGIN_SECONDS + 1


def test_one_session_for_every_request_and_a_new_one_when_it_breaks(migrated_url: str) -> None:
    limit = SharedRequestLimit(migrated_url, "pk_session", 100, window_seconds=30)

    def sessions_of_the_limit() -> list[int]:
        with db.connection(migrated_url) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        return [pid for (pid,) in rows]

    for _ in range(5):
        limit.acquire()
    [pid] = sessions_of_the_limit()
    with db.connection(migrated_url) as conn:  # a restart, a dropped connection
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    limit.acquire()
    [new_pid] = sessions_of_the_limit()
    assert new_pid != pid
    limit.close()
    assert sessions_of_the_limit() == []
    with db.connection(migrated_url) as conn:
        [(logged,)] = conn.execute("SELECT count(*) FROM polygon_requests").fetchall()
    assert logged == 6
