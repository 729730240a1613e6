"""`marketdata db ...` and `marketdata bootstrap`: migrations and the state of the warehouse."""

from __future__ import annotations

import os

import click

from marketdata_pipeline import config
from marketdata_pipeline.cli.common import print_bootstrap, warehouse
from marketdata_pipeline.errors import ConfigError
from marketdata_pipeline.registry import key_delivery
from marketdata_pipeline.warehouse import embedded, migrations
from marketdata_pipeline.warehouse.bootstrap import bootstrap, ensure_instance_database
from marketdata_pipeline.warehouse.connection import connection, describe
from marketdata_pipeline.warehouse.status import status


@click.group("db")
def db_group() -> None:
    """Migrations and the state of the warehouse."""


@db_group.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations (safe to run concurrently)."""
    with warehouse() as conn:
        applied = migrations.migrate(conn)
    for name in applied:
        click.echo(f"applied {name}")
    if not applied:
        click.echo("schema up to date: nothing to apply")


@db_group.command("status")
def db_status() -> None:
    """Applied migrations, engine (TimescaleDB or plain PostgreSQL) and row counts."""
    url = embedded.warehouse_url()
    with connection(url) as conn:
        report = status(conn)
    engine = (
        f"TimescaleDB {report.timescaledb_version}"
        if report.timescaledb_version
        else "PostgreSQL (no TimescaleDB: plain tables and views)"
    )
    click.echo(f"warehouse: {describe(url)}")
    click.echo(f"engine:    {engine}")
    click.echo("migrations:")
    width = max(
        (len(name) for name in [*(m.name for m in report.applied), *report.pending]), default=0
    )
    for m in report.applied:
        click.echo(f"  {m.version:03d}  {m.name:<{width}}  {m.applied_at:%Y-%m-%d %H:%M:%S}Z")
    for name in report.pending:
        click.echo(f"  ---  {name:<{width}}  pending")
    click.echo("rows:")
    for table, count in report.row_counts.items():
        click.echo(f"  {table:<20} {'(missing)' if count is None else f'{count:>12,}'}")


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (data is kept under MARKETDATA_HOME)."""
    if config.database_url():
        raise ConfigError("DATABASE_URL is set: there is no embedded server to stop")
    stopped = embedded.stop()
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL not running")


@click.command("bootstrap")
def bootstrap_command() -> None:
    """Migrate, verify the schema, create the admin API key and seed the default symbols."""
    url = embedded.warehouse_url()
    # In a deployment this output is a container's log: a new admin key goes sealed, never here.
    recipient = (
        key_delivery.required_recipient("by bootstrap in a deployment")
        if config.deployed()
        else key_delivery.configured_recipient()
    )
    if dagster_url := os.environ.get("DAGSTER_PG_URL"):
        click.echo(ensure_instance_database(url, dagster_url))
    with connection(url) as conn:
        print_bootstrap(bootstrap(conn, recipient))
