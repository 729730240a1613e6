"""First start of a warehouse: migrate, verify the schema, an admin key, the default symbols."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.errors import MigrationError
from marketdata_pipeline.registry import api_keys, symbols
from marketdata_pipeline.warehouse import migrations

ADMIN_KEY_NAME = "admin"
TABLES = (
    "schema_migrations",
    "tracked_symbols",
    "api_keys",
    "api_key_audit",
    "bars_daily",
    "bars_minute",
    "bars_rejected",
    "backfill_state",
    "polygon_requests",
    "splits",
    "split_fetches",
    "loaded_months",
)
VIEWS = ("bars_hourly", "bars_weekly")


@dataclass(frozen=True)
class BootstrapResult:
    migrations_applied: list[str]
    admin_key: str | None  # the raw key, only on the run that created it
    symbols_added: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.migrations_applied or self.admin_key or self.symbols_added)


def verify_schema(conn: psycopg.Connection) -> None:
    missing = [
        name
        for name in (*TABLES, *VIEWS)
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)
    ]
    if missing:
        raise MigrationError(f"schema incomplete after migrations: missing {', '.join(missing)}")


def bootstrap(conn: psycopg.Connection) -> BootstrapResult:
    applied = migrations.migrate(conn)
    verify_schema(conn)
    conn.autocommit = False
    with conn.transaction():
        # Serialize concurrent bootstraps so only one of them creates the admin key.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        admin_key = None
        if api_keys.find_by_name(conn, ADMIN_KEY_NAME) is None:
            _, admin_key = api_keys.create(conn, ADMIN_KEY_NAME)
        added = symbols.seed(conn, DEFAULT_SYMBOLS)
    return BootstrapResult(applied, admin_key, added)
