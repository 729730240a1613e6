"""Numbered SQL migrations: applied once, in order, under an advisory lock, checksummed.

Files in `sql/` are named `NNN_name.sql`. A version may instead come as a pair,
`NNN_name.timescaledb.sql` and `NNN_name.postgres.sql`: the first is applied where the
`timescaledb` extension is available, the second elsewhere, so both engines end with the same
table and view names.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from marketdata_pipeline.config import shipped_path
from marketdata_pipeline.errors import MigrationError

log = logging.getLogger(__name__)

SQL_DIR = shipped_path("sql")
# Any constant works; it only has to differ from other advisory locks on the same database.
MIGRATION_LOCK_KEY = 0x6D64_6D69_6772  # "mdmigr"
_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+?)(?:\.(timescaledb|postgres))?\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


def timescaledb_available(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return row is not None


def discover(sql_dir: Path, *, timescaledb: bool) -> list[Migration]:
    """The migrations for this engine, in version order."""
    engine = "timescaledb" if timescaledb else "postgres"
    files = sorted(sql_dir.glob("*.sql"))
    if not files:
        # An install without its SQL files must not report an empty database as up to date.
        state = "is empty" if sql_dir.is_dir() else "is missing"
        raise MigrationError(f"the migrations folder {sql_dir} {state}: nothing can be applied")
    by_version: dict[int, dict[str | None, Path]] = {}
    for path in files:
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(
                f"{path.name}: migration files are named NNN_name.sql "
                "or NNN_name.timescaledb.sql / NNN_name.postgres.sql"
            )
        version, variant = int(match.group(1)), match.group(3)
        variants = by_version.setdefault(version, {})
        if variant in variants:
            raise MigrationError(f"{path.name}: version {version:03d} is defined twice")
        variants[variant] = path
    chosen = []
    for version, variants in sorted(by_version.items()):
        if None in variants and len(variants) > 1:
            raise MigrationError(f"version {version:03d} has both a plain and an engine variant")
        if None not in variants and set(variants) != {"timescaledb", "postgres"}:
            raise MigrationError(f"version {version:03d} needs both .timescaledb and .postgres")
        chosen.append(Migration(version, variants.get(None) or variants[engine]))
    return chosen


def applied(conn: psycopg.Connection) -> list[AppliedMigration]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def migrate(conn: psycopg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date).

    Concurrent callers serialize on a session advisory lock: the first applies, the others
    wait, then find nothing left to do. Each file runs in its own transaction with its ledger
    row, so a failure leaves the database at the last good version.
    """
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        migrations = discover(sql_dir, timescaledb=timescaledb_available(conn))
        conn.execute(_CREATE_LEDGER)
        done = {m.version: m for m in applied(conn)}
        _refuse_edited(migrations, done)
        names = []
        for migration in migrations:
            if migration.version in done:
                continue
            _apply(conn, migration)
            names.append(migration.name)
        return names
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def pending(conn: psycopg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    done = {m.version for m in applied(conn)}
    migrations = discover(sql_dir, timescaledb=timescaledb_available(conn))
    return [m.name for m in migrations if m.version not in done]


def _refuse_edited(migrations: list[Migration], done: dict[int, AppliedMigration]) -> None:
    by_name = {m.name: m for m in migrations}
    for version, record in sorted(done.items()):
        current = by_name.get(record.name)
        if current is None:
            raise MigrationError(
                f"migration {record.name} (version {version:03d}) was applied but its file is gone"
            )
        if current.checksum != record.checksum:
            raise MigrationError(
                f"migration {record.name} was edited after it was applied "
                f"(checksum {record.checksum[:12]} applied, {current.checksum[:12]} on disk); "
                "add a new migration instead"
            )


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    log.info("applying migration %s", migration.name)
    try:
        with conn.transaction():
            conn.execute(migration.path.read_text())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MigrationError(f"migration {migration.name} failed: {detail}") from None
