"""The read API's warehouse sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from marketdata_pipeline.errors import DatabaseUnavailable
from marketdata_pipeline.warehouse.connection import CONNECT_TIMEOUT_SECONDS, describe

T = TypeVar("T")


def _in_utc(conn: psycopg.Connection) -> None:
    conn.execute("SET TIME ZONE 'UTC'")


class WarehousePool:
    """Pooled sessions in UTC and autocommit, without server-side prepared statements (as
    every session of this package: see connection.connect), checked before each use so a
    restarted warehouse costs no failed request."""

    def __init__(self, url: str, *, max_sessions: int = 10) -> None:
        self.where = describe(url)
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_sessions,
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

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        try:
            conn = self.pool.getconn()
        except PoolTimeout:
            raise self._unreachable() from None
        try:
            yield conn
        except psycopg.OperationalError:
            if conn.broken:
                raise self._unreachable() from None
            raise
        finally:
            self.pool.putconn(conn)

    def _unreachable(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"warehouse unreachable ({self.where})")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(conn, *args) in a worker thread, on a pooled session."""

        def call() -> T:
            with self.session() as conn:
                return function(conn, *args)

        return await anyio.to_thread.run_sync(call)
