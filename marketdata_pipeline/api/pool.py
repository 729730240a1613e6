"""The read API's warehouse sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from marketdata_pipeline.errors import DatabaseUnavailable, MarketdataError
from marketdata_pipeline.warehouse.connection import CONNECT_TIMEOUT_SECONDS, describe

T = TypeVar("T")
BUSY_RETRY_SECONDS = 5


class PoolBusy(MarketdataError):
    """Every session of a pool is in use, and none came free in time."""


def _in_utc(conn: psycopg.Connection) -> None:
    conn.execute("SET TIME ZONE 'UTC'")


class WarehousePool:
    """Pooled sessions in UTC and autocommit, without server-side prepared statements (as
    every session of this package: see connection.connect), checked before each use so a
    restarted warehouse costs no failed request.

    A request waits for one of the pool's slots without holding a thread, at most
    BUSY_RETRY_SECONDS (then PoolBusy), and runs in a thread of the pool's own: one pool's
    slow requests cannot take the threads or sessions of another."""

    def __init__(self, url: str, *, sessions: int, purpose: str) -> None:
        self.where = describe(url)
        self.purpose = purpose
        self.slots = anyio.Semaphore(sessions)
        self.threads = anyio.CapacityLimiter(sessions)
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=sessions,
            kwargs={
                "prepare_threshold": None,
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            },
            configure=_in_utc,
            check=ConnectionPool.check_connection,
            timeout=CONNECT_TIMEOUT_SECONDS,
            open=False,
        )

    async def take_slot(self) -> None:
        with anyio.move_on_after(BUSY_RETRY_SECONDS):
            await self.slots.acquire()
            return
        raise PoolBusy(
            f"busy: all {self.pool.max_size} warehouse sessions for {self.purpose} are in use; "
            f"retry in {BUSY_RETRY_SECONDS} s"
        )

    def acquire(self) -> psycopg.Connection:
        """A session for the holder of a slot: one is free, unless none can be opened."""
        try:
            return self.pool.getconn()
        except PoolTimeout:
            raise self._unreachable() from None

    async def give_back(self, conn: psycopg.Connection) -> None:
        """A leased session back to the pool, and its slot with it."""
        try:
            await anyio.to_thread.run_sync(self.pool.putconn, conn, limiter=self.threads)
        finally:
            self.slots.release()

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection]:
        conn = self.acquire()
        try:
            yield conn
        except psycopg.OperationalError:
            if conn.broken:
                raise self._unreachable() from None
            raise
        finally:
            self.pool.putconn(conn)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(conn, *args) in one of the pool's threads, on one of its sessions."""

        def call() -> T:
            with self._session() as conn:
                return function(conn, *args)

        await self.take_slot()
        try:
            return await anyio.to_thread.run_sync(call, limiter=self.threads)
        finally:
            self.slots.release()

    async def lease(self) -> psycopg.Connection:
        """A session kept past this call (a stream's); give it back with release()."""
        await self.take_slot()
        try:
            return await anyio.to_thread.run_sync(self.acquire, limiter=self.threads)
        except BaseException:
            self.slots.release()
            raise

    def _unreachable(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"warehouse unreachable ({self.where})")
