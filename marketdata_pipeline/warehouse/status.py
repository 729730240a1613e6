"""What `marketdata db status` reports: migrations, engine, row counts."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from marketdata_pipeline.warehouse import migrations
from marketdata_pipeline.warehouse.bootstrap import TABLES


@dataclass(frozen=True)
class WarehouseStatus:
    applied: list[migrations.AppliedMigration]
    pending: list[str]
    timescaledb_version: str | None
    row_counts: dict[str, int | None]  # None: table not created yet


def status(conn: psycopg.Connection) -> WarehouseStatus:
    version = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    counts: dict[str, int | None] = {}
    for table in TABLES:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
            counts[table] = None
            continue
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        ).fetchone()
        counts[table] = row[0] if row else 0
    return WarehouseStatus(
        applied=migrations.applied(conn),
        pending=migrations.pending(conn),
        timescaledb_version=version[0] if version else None,
        row_counts=counts,
    )
