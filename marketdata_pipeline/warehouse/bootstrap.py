"""First start of a warehouse: migrate, verify the schema, an admin key, the default symbols."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from nacl.public import PublicKey
from psycopg.conninfo import conninfo_to_dict

from marketdata_pipeline import config
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
    returned: in a deployment bootstrap's output is a container's log, where no key may go."""
    applied = migrations.migrate(conn)
    verify_schema(conn)
    conn.autocommit = False
    with conn.transaction():
        # Serialize concurrent bootstraps so only one of them creates the admin key.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        admin_key, sealed_id = None, None
        if api_keys.find_by_name(conn, ADMIN_KEY_NAME) is None:
            if recipient is None and config.deployed():
                raise ConfigError(
                    "MARKETDATA_DEPLOYMENT is set but MARKETDATA_KEY_RECIPIENT is not: the new "
                    "admin key would go to this container's log; set it to an operator's public "
                    "key (`marketdata keys identity`)"
                )
            key, admin_key = api_keys.create(conn, ADMIN_KEY_NAME)
            if recipient is not None:
                key_delivery.seal(conn, key.id, admin_key, recipient)
                admin_key, sealed_id = None, key.id
        added = symbols.seed(conn, DEFAULT_SYMBOLS)
    return BootstrapResult(applied, admin_key, added, sealed_id)


def ensure_instance_database(warehouse_url: str, dagster_url: str) -> str | None:
    """Create the Dagster instance's database (DAGSTER_PG_URL) when it is on the warehouse's
    server and missing, so that one bootstrap readies a deployment; returns its name. On
    another server it is the operator's to make."""
    scheme, _, rest = dagster_url.partition("://")  # SQLAlchemy's postgresql+psycopg2://
    dagster = conninfo_to_dict(f"{scheme.split('+')[0]}://{rest}" if rest else dagster_url)
    warehouse = conninfo_to_dict(warehouse_url)
    name = dagster.get("dbname")
    server = ("host", "port", "hostaddr")
    if not name or any(warehouse.get(k) != dagster.get(k) for k in server):
        return None
    embedded.ensure_database(warehouse_url, str(name))
    return str(name)
