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
    restarted warehouse costs no failed request."""

    def __init__(self, url: str, *, sessions: int, purpose: str) -> None:
        self.url = url
        self.where = describe(url)
        self.purpose = purpose
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

    def acquire(self) -> psycopg.Connection:
        """A session, or PoolBusy when all are in use, or DatabaseUnavailable."""
        try:
            return self.pool.getconn()
        except PoolTimeout:
            pass
        try:  # none came free: because all are in use, or because none can be opened?
            psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_SECONDS).close()
        except psycopg.OperationalError:
            raise DatabaseUnavailable(f"warehouse unreachable ({self.where})") from None
        raise PoolBusy(
            f"busy: all {self.pool.max_size} warehouse sessions for {self.purpose} are in use; "
            f"retry in {BUSY_RETRY_SECONDS} s"
        )

    def release(self, conn: psycopg.Connection) -> None:
        self.pool.putconn(conn)

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        conn = self.acquire()
        try:
            yield conn
        except psycopg.OperationalError:
            if conn.broken:
                raise DatabaseUnavailable(f"warehouse unreachable ({self.where})") from None
            raise
        finally:
            self.release(conn)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(conn, *args) in a worker thread, on a pooled session."""

        def call() -> T:
            with self.session() as conn:
                return function(conn, *args)

        return await anyio.to_thread.run_sync(call)
