"""The read API's limits, held in the warehouse so that every `marketdata serve` process on it
shares them: each key's rate limit, the refused keys of each client address, and the
requests in progress and streams open of each key (sql/010_api_limits_across_processes.sql).

A rate limit is a moving window of rows timed by the database's clock, taken under an
advisory lock per counted thing, as the provider's request limit is (warehouse/
request_limit.py), in one function call. A slot (a request in progress, a stream open) is a
row of its process; a process beats every HEARTBEAT_SECONDS, and the slots of one that has
not beaten for ALIVE_SECONDS (killed, frozen, cut off) no longer count. Slots are not
session-level advisory locks: those would pin a warehouse session to every request in
progress, for as long as a stream lasts, and vanish under PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Literal

import anyio
import psycopg
from limits import RateLimitItem

from marketdata_pipeline.api.pool import PoolBusy, WarehousePool
from marketdata_pipeline.errors import DatabaseUnavailable
from marketdata_pipeline.warehouse.connection import connect

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
ALIVE_SECONDS = 10.0  # five beats missed: the process is gone, its slots free
FORGOTTEN_SECONDS = 600.0  # a process silent this long is removed, with its slots

SlotKind = Literal["request", "stream"]


@dataclass(frozen=True)
class RateVerdict:
    accepted: bool
    remaining: int
    reset_in: float  # seconds until the oldest request counted leaves the window


class SharedLimits:
    """This process's view of the limits: its id among the processes, the slots it failed
    to give back (retried at each beat), and the rate limit that each bucket is allowed."""

    def __init__(self, rate_limit: RateLimitItem) -> None:
        self.rate_limit = rate_limit
        self.process_id = uuid.uuid4()
        self._unreleased: set[int] = set()
        self._stopping = threading.Event()
        self._beating: threading.Thread | None = None

    @property
    def _window_seconds(self) -> float:
        return float(self.rate_limit.get_expiry())

    # Processes that serve one warehouse with different limits each count their own: a
    # bucket is named with its limit.

    def key_bucket(self, key_id: int) -> str:
        return f"key {key_id} at {self.rate_limit.amount}/{self._window_seconds:g}s"

    def client_bucket(self, address: str) -> str:
        return f"client {address} at {self.rate_limit.amount}/{self._window_seconds:g}s"

    # Run on a session of the caller's: they share a round trip with other statements.

    def hit(self, conn: psycopg.Connection, bucket: str) -> RateVerdict:
        """Count one request in `bucket` if its window has room."""
        row = conn.execute(
            "SELECT accepted, remaining, reset_in FROM api_rate_hit(%s, %s, %s)",
            (bucket, self.rate_limit.amount, self._window_seconds),
        ).fetchone()
        assert row is not None
        return RateVerdict(*row)

    def hit_and_take(
        self, conn: psycopg.Connection, key_id: int, cap: int
    ) -> tuple[RateVerdict, int | None]:
        """One request of the key counted and, if the rate limit let it through, a request
        slot taken if the key has fewer than `cap` in progress: the verdict and the slot."""
        row = self._as_a_process(
            conn,
            "SELECT h.accepted, h.remaining, h.reset_in, "
            "CASE WHEN h.accepted THEN api_take_slot(%s, %s, 'request', %s, %s) END "
            "FROM api_rate_hit(%s, %s, %s) h",
            (
                self.process_id, key_id, cap, ALIVE_SECONDS,
                self.key_bucket(key_id), self.rate_limit.amount, self._window_seconds,
            ),
        )  # fmt: skip
        return RateVerdict(*row[:3]), row[3]

    def take(self, conn: psycopg.Connection, key_id: int, kind: SlotKind, cap: int) -> int | None:
        """A slot of `kind` for the key if it holds fewer than `cap`, else None."""
        row = self._as_a_process(
            conn,
            "SELECT api_take_slot(%s, %s, %s, %s, %s)",
            (self.process_id, key_id, kind, cap, ALIVE_SECONDS),
        )
        return row[0]

    def _as_a_process(self, conn: psycopg.Connection, query: str, params: tuple) -> tuple:
        """The row of a query that takes a slot of this process: once more after joining
        the processes again if this one was forgotten (silent too long, or the database
        restarted after a crash, which empties the unlogged tables). The query is one
        statement: the failed one counted nothing."""
        try:
            row = conn.execute(query, params).fetchone()
        except psycopg.errors.ForeignKeyViolation:
            self.register(conn)
            row = conn.execute(query, params).fetchone()
        assert row is not None
        return row

    def give_back(self, conn: psycopg.Connection, slot: int) -> None:
        conn.execute("DELETE FROM api_slots WHERE id = %s", (slot,))

    # Run on a pool's session of their own.

    async def remaining(self, pool: WarehousePool, bucket: str) -> int:
        def read(conn: psycopg.Connection) -> int:
            row = conn.execute(
                "SELECT api_rate_remaining(%s, %s)", (bucket, self.rate_limit.amount)
            ).fetchone()
            assert row is not None
            return row[0]

        return await pool.run(read)

    async def release(self, pool: WarehousePool, slot: int) -> None:
        """Give a slot back, even for a request cancelled meanwhile; a slot that cannot be
        given back now is given back at the next beat, and counts no longer than its
        process lives."""
        with anyio.CancelScope(shield=True):
            try:
                await pool.run(self.give_back, slot)
            except (DatabaseUnavailable, PoolBusy, psycopg.Error) as failed:
                log.warning("a slot is given back at the next heartbeat: %s", failed)
                self._unreleased.add(slot)

    def register(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "INSERT INTO api_processes (id) VALUES (%s) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp()",
            (self.process_id,),
        )

    def leave(self, conn: psycopg.Connection) -> None:
        """This process stops: its row goes, and every slot it held with it."""
        conn.execute("DELETE FROM api_processes WHERE id = %s", (self.process_id,))

    def beat(self, conn: psycopg.Connection) -> None:
        """This process is alive (again, if it was forgotten); the slots it could not give
        back go now; processes long silent and requests out of every window are removed."""
        unreleased = list(self._unreleased)
        with conn.transaction():
            self.register(conn)
            if unreleased:
                conn.execute("DELETE FROM api_slots WHERE id = ANY(%s)", (unreleased,))
            conn.execute(
                "DELETE FROM api_processes "
                "WHERE heartbeat_at < clock_timestamp() - make_interval(secs => %s)",
                (FORGOTTEN_SECONDS,),
            )
            conn.execute("DELETE FROM api_rate_hits WHERE expires_at <= clock_timestamp()")
        self._unreleased.difference_update(unreleased)

    def start(self, url: str) -> None:
        """Join the processes, and beat from now on in a thread of its own, on a session of
        its own: a busy moment cannot make this process look gone, and the beats take no
        worker thread from the requests (a stream's chunks, encoded on whichever is free,
        would spread their memory over more threads)."""
        self._stopping.clear()
        conn = connect(url, autocommit=True)
        try:
            self.register(conn)
        except BaseException:
            _closed(conn)
            raise
        self._beating = threading.Thread(
            target=self._keep_beating, args=(url, conn), name="heartbeat", daemon=True
        )
        self._beating.start()

    def stop(self) -> None:
        """Stop beating and leave: this process's slots are free at once, not in
        ALIVE_SECONDS."""
        self._stopping.set()
        if self._beating is not None:
            # A beat stuck on a dead connection must not hold the shutdown for ever.
            self._beating.join(timeout=HEARTBEAT_SECONDS + ALIVE_SECONDS)

    def _keep_beating(self, url: str, conn: psycopg.Connection | None) -> None:
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                conn = (
                    conn if conn is not None and not conn.closed else connect(url, autocommit=True)
                )
                self.beat(conn)
            except (DatabaseUnavailable, psycopg.Error) as missed:
                log.warning("the read API's heartbeat was missed: %s", missed)
                _closed(conn)
                conn = None
        try:
            conn = conn if conn is not None and not conn.closed else connect(url, autocommit=True)
            self.leave(conn)
        except (DatabaseUnavailable, psycopg.Error) as lost:
            log.warning("leaving, the read API could not give its slots back: %s", lost)
        _closed(conn)


def _closed(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()
