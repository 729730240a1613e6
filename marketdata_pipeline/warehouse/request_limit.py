"""The Polygon request limit of one API key, shared by every process of a deployment.

Run workers, sensors and the CLI are separate processes, often several at once; they all
meet in the warehouse. Each request is logged in `polygon_requests` under the key's advisory
lock, and a request waits while the key's log holds its limit within the window. The window
slides on the database's clock, so processes on different hosts agree. (pyrate-limiter's
PostgreSQL bucket would do the same through a psycopg_pool dependency; this is one table.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable

import psycopg

from marketdata_pipeline.warehouse.connection import connect

log = logging.getLogger(__name__)

# First key of the advisory lock on a key's request log; the second is a hash of the key id.
REQUEST_LOCK_CLASS = 0x7271  # "rq"
# A request is logged when it is granted but counted by the provider when it arrives; one
# that travels faster than an earlier one could bring a sixth into the provider's minute.
# Keeping each request in the log a second longer leaves room for that.
MARGIN_SECONDS = 1.0


def key_id(api_key: str | None) -> str:
    """How the log names a key: a prefix of its SHA-256, never the key."""
    if not api_key:
        return "anonymous"
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class SharedRequestLimit:
    """At most `per_window` requests of one key in any `window_seconds` (the provider's
    window; requests are kept MARGIN_SECONDS longer), across processes."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        per_window: int,
        *,
        window_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._url = url
        self.key_id = key_id(api_key)
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._kept_seconds = window_seconds + MARGIN_SECONDS
        self._sleep = sleep
        # One session for the limiter's life: a connection per request would cost more than
        # the bookkeeping on a warehouse across a network.
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop_session()

    def __repr__(self) -> str:
        return f"SharedRequestLimit({self.per_window} per {self.window_seconds:g} s)"

    def acquire(self) -> None:
        """Wait until one more request fits, then log it."""
        while (wait := self._try_acquire()) > 0:
            log.info(
                "Polygon request limit of %d per %g s reached: waiting %.1f s",
                self.per_window,
                self.window_seconds,
                wait,
            )
            self._sleep(wait)

    def _try_acquire(self) -> float:
        """0 when a request was logged, else the seconds until the oldest leaves the window."""
        with self._lock:
            try:
                return self._try_acquire_on(self._session())
            except psycopg.OperationalError:
                # The session broke (a restart, a dropped connection): once more on a new one.
                self._drop_session()
                return self._try_acquire_on(self._session())

    def _session(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url)
        return self._conn

    def _drop_session(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _try_acquire_on(self, conn: psycopg.Connection) -> float:
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                (REQUEST_LOCK_CLASS, self.key_id),
            )
            conn.execute(
                "DELETE FROM polygon_requests WHERE key_id = %s "
                "AND sent_at <= clock_timestamp() - make_interval(secs => %s)",
                (self.key_id, self._kept_seconds),
            )
            [(count, oldest_leaves_in)] = conn.execute(
                "SELECT count(*), extract(epoch FROM min(sent_at) "
                "+ make_interval(secs => %s) - clock_timestamp()) "
                "FROM polygon_requests WHERE key_id = %s",
                (self._kept_seconds, self.key_id),
            ).fetchall()
            if count < self.per_window:
                conn.execute(
                    "INSERT INTO polygon_requests (key_id, sent_at) VALUES (%s, clock_timestamp())",
                    (self.key_id,),
                )
                return 0.0
            return max(float(oldest_leaves_in), 0.01)
