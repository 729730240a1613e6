"""What the command groups share: the warehouse connection and plain-text output."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime

import click
import psycopg

from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.bootstrap import BootstrapResult
from marketdata_pipeline.warehouse.connection import connection


def warehouse() -> AbstractContextManager[psycopg.Connection]:
    """A session on the configured warehouse (DATABASE_URL, or the embedded server)."""
    return connection(embedded.warehouse_url())


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}Z" if moment else "-"


def print_bootstrap(result: BootstrapResult) -> None:
    if not result.changed:
        click.echo("already bootstrapped: schema up to date, admin key exists, symbols seeded")
        return
    for name in result.migrations_applied:
        click.echo(f"applied {name}")
    if result.symbols_added:
        click.echo(f"seeded {len(result.symbols_added)} symbols: {' '.join(result.symbols_added)}")
    if result.admin_key:
        click.echo(f"admin API key (shown once, store it now): {result.admin_key}")
    if result.sealed_admin_key_id:
        click.echo(
            f"admin API key {result.sealed_admin_key_id} created, sealed to "
            f"MARKETDATA_KEY_RECIPIENT: `marketdata keys reveal {result.sealed_admin_key_id}` "
            "shows it once"
        )
