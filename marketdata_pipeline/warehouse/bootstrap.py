"""First start of a warehouse: migrate, verify the schema, an admin key, the default symbols."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from nacl.public import PublicKey
from psycopg.conninfo import conninfo_to_dict

from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.errors import ConfigError, MigrationError
from marketdata_pipeline.registry import api_keys, key_delivery, symbols
from marketdata_pipeline.warehouse import embedded, migrations

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
    "api_key_deliveries",
    "api_rate_hits",
    "api_processes",
    "api_slots",
)
VIEWS = ("bars_hourly", "bars_weekly")


@dataclass(frozen=True)
class BootstrapResult:
    migrations_applied: list[str]
    admin_key: str | None  # the raw key, only on the run that created it, unless sealed
    symbols_added: list[str]
    sealed_admin_key_id: int | None = None  # created and sealed to the key recipient

    @property
    def changed(self) -> bool:
        return bool(
            self.migrations_applied
            or self.admin_key
            or self.sealed_admin_key_id
            or self.symbols_added
        )


def verify_schema(conn: psycopg.Connection) -> None:
    missing = [
        name
        for name in (*TABLES, *VIEWS)
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)
    ]
    if missing:
        raise MigrationError(f"schema incomplete after migrations: missing {', '.join(missing)}")


def bootstrap(conn: psycopg.Connection, recipient: PublicKey | None = None) -> BootstrapResult:
    """With `recipient`, a new admin key is sealed to it (`marketdata keys reveal`) instead of
    returned (a deployment's bootstrap output is a container's log, where no key may go)."""
    applied = migrations.migrate(conn)
    verify_schema(conn)
    conn.autocommit = False
    with conn.transaction():
        # Serialize concurrent bootstraps so only one of them creates the admin key.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        admin_key, sealed_id = None, None
        if api_keys.find_by_name(conn, ADMIN_KEY_NAME) is None:
            key, admin_key = api_keys.create(conn, ADMIN_KEY_NAME)
            if recipient is not None:
                key_delivery.seal(conn, key.id, admin_key, recipient)
                admin_key, sealed_id = None, key.id
        added = symbols.seed(conn, DEFAULT_SYMBOLS)
    return BootstrapResult(applied, admin_key, added, sealed_id)


def ensure_instance_database(warehouse_url: str, dagster_url: str) -> str:
    """Create the Dagster instance's database (DAGSTER_PG_URL) when it is missing on the
    warehouse's server and for the warehouse's own role (a database made for another role
    would be one it cannot create tables in), so that one bootstrap readies a deployment;
    returns what was done, in a line."""
    scheme, _, rest = dagster_url.partition("://")  # SQLAlchemy's postgresql+psycopg2://
    try:
        dagster = conninfo_to_dict(f"{scheme.split('+')[0]}://{rest}" if rest else dagster_url)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "DAGSTER_PG_URL is not a valid PostgreSQL URL (its value may hold a password: "
            "not shown)"
        ) from None
    warehouse = conninfo_to_dict(warehouse_url)
    name = dagster.get("dbname")
    if not name:
        raise ConfigError("DAGSTER_PG_URL names no database")

    def where(params: dict) -> tuple:
        return (params.get("host") or "localhost", str(params.get("port") or 5432),
                params.get("user"))  # fmt: skip

    if where(dagster) != where(warehouse):
        return (
            f"Dagster's instance database {name} is on another server or for another role "
            "than the warehouse's: create it there as its owner if it is missing"
        )
    embedded.ensure_database(warehouse_url, str(name))
    return f"Dagster's instance database {name} is ready (DAGSTER_PG_URL)"
