"""`marketdata alerts ...`: alerts raised from outside the Dagster daemon."""

from __future__ import annotations

import click


@click.group("alerts")
def alerts_group() -> None:
    """Alerts that cannot come from the Dagster daemon itself."""


@alerts_group.command("check-daemon")
@click.option(
    "--max-age",
    default=300,
    show_default=True,
    type=click.IntRange(30),
    help="Seconds without a heartbeat after which the daemon counts as down.",
)
@click.pass_context
def check_daemon_command(ctx: click.Context, max_age: int) -> None:
    """Alert once when the Dagster daemon's heartbeats are older than MAX_AGE (or missing),
    and once when they are fresh again; send alerts earlier checks held. Run it from cron
    every minute or few, with DAGSTER_HOME (and DAGSTER_PG_URL) set as for the daemon, and
    the alert settings (README: Alerts). Exits 1 while the daemon is down."""
    # Dagster is imported here, so the other commands start without it.
    from marketdata_pipeline.defs.daemon_health import check_daemon_of_this_home

    check = check_daemon_of_this_home(max_age)
    click.echo(check.line())
    if check.stale:
        ctx.exit(1)
