"""`marketdata`: the operator's command line. Errors print one line and exit non-zero."""

from __future__ import annotations

import logging
import sys

import click
import psycopg

from marketdata_pipeline.cli.alerts import alerts_group
from marketdata_pipeline.cli.db import bootstrap_command, db_group
from marketdata_pipeline.cli.keys import keys_group
from marketdata_pipeline.cli.serve import serve_command
from marketdata_pipeline.cli.simulator import simulator_command
from marketdata_pipeline.cli.stats import stats_command
from marketdata_pipeline.cli.symbols import symbols_group
from marketdata_pipeline.cli.ui import ui_command
from marketdata_pipeline.domain import InvalidSymbol
from marketdata_pipeline.errors import MarketdataError, first_line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def cli(verbose: bool) -> None:
    """Operate the market-data warehouse and its Dagster code location."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for command in (
    db_group,
    bootstrap_command,
    symbols_group,
    keys_group,
    stats_command,
    simulator_command,
    serve_command,
    ui_command,
    alerts_group,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="marketdata", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else error.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "marketdata"
        click.echo(f"marketdata: {error.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as error:
        click.echo(f"marketdata: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.Abort:
        click.echo("marketdata: aborted", err=True)
        sys.exit(130)
    except InvalidSymbol as error:  # a symbol argument: a bad argument, like click's own
        click.echo(f"marketdata: error: {error}", err=True)
        sys.exit(2)
    except MarketdataError as error:
        click.echo(f"marketdata: error: {error}", err=True)
        sys.exit(1)
    except psycopg.errors.UndefinedTable as error:
        reason = first_line(str(error), type(error).__name__)
        click.echo(
            f"marketdata: error: the warehouse is not set up ({reason}): run "
            "`marketdata bootstrap`",
            err=True,
        )
        sys.exit(1)
    except psycopg.Error as error:
        reason = first_line(str(error), type(error).__name__)
        click.echo(f"marketdata: database error: {reason}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
