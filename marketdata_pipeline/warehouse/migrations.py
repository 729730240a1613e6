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
# Statements that end, open or split the file's transaction. The runner wraps each file in one
# transaction with its ledger row: a COMMIT inside would make the part before it permanent and
# unrecorded, so a later failure could never be retried. START is only START TRANSACTION.
_TRANSACTION_CONTROL = frozenset(
    ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE")
)
# What the scan skips (comments, literals, quoted names, dollar-quoted bodies) and the words and
# semicolons it reads. An unterminated literal runs to the end: PostgreSQL refuses it anyway.
_SQL_TOKEN = re.compile(
    r"""(?P<skip>\s+|--[^\n]*
        |[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)
        |'(?:[^']|'')*(?:'|\Z)
        |"(?:[^"]|"")*(?:"|\Z))
    |(?P<comment>/\*)
    |(?P<dollar>\$(?:[^\W\d]\w*)?\$)
    |(?P<word>[^\W\d][\w$]*)
    |(?P<end>;)
    |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_BLOCK_COMMENT_MARK = re.compile(r"/\*|\*/")

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
        for migration in migrations:  # all checked before any is applied
            if migration.version not in done:
                _refuse_transaction_control(migration)
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


def _refuse_transaction_control(migration: Migration) -> None:
    found = transaction_control(migration.path.read_text())
    if found:
        word, line = found
        raise MigrationError(
            f"migration {migration.name} controls its own transaction ({word} on line {line}): "
            "the runner applies each file in one transaction with its ledger row; remove it"
        )


def transaction_control(text: str) -> tuple[str, int] | None:
    """The first statement of `text` that begins, ends or splits a transaction, as (its first
    word, its line), or None. Words inside comments, literals, quoted names and dollar-quoted
    bodies are not statements; neither are the statements of a BEGIN ATOMIC function body."""
    at_start, previous, atomic = True, "", 0
    position = 0
    while position < len(text):
        token = _SQL_TOKEN.match(text, position)
        assert token is not None  # `other` matches any character
        kind, position = token.lastgroup, token.end()
        if kind == "comment":
            position = _end_of_block_comment(text, position)
        elif kind == "dollar":
            closing = text.find(token.group(), position)
            position = len(text) if closing < 0 else closing + len(token.group())
        elif kind == "end":
            at_start = atomic == 0
            previous = ""
        elif kind == "word":
            word = token.group().upper()
            if at_start and word in _TRANSACTION_CONTROL:
                return word, text.count("\n", 0, token.start()) + 1
            if atomic and word == "CASE":
                atomic += 1
            elif atomic and word == "END":
                atomic -= 1
            elif previous == "BEGIN" and word == "ATOMIC":
                atomic = 1  # a function body whose semicolons end its own statements
            at_start, previous = False, word
        elif kind == "other":
            at_start = False
    return None


def _end_of_block_comment(text: str, position: int) -> int:
    """Where the /* comment opened before `position` ends (they nest in PostgreSQL)."""
    depth = 1
    while depth:
        found = _BLOCK_COMMENT_MARK.search(text, position)
        if found is None:
            return len(text)
        depth += 1 if found.group() == "/*" else -1
        position = found.end()
    return position


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
