"""Thin Dagster resources over the core: configuration in, core objects out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg

from marketdata_pipeline import db, embedded


class WarehouseResource(dg.ConfigurableResource):
    """The PostgreSQL / TimescaleDB warehouse.

    The URL is read from DATABASE_URL when the resource is used, not stored in its config, so
    a password never shows in the UI's resource view; unset, the embedded server is used.
    """

    def url(self) -> str:
        return embedded.warehouse_url()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with db.connection(self.url()) as conn:
            yield conn
