"""`marketdata stats SYMBOL`: what the warehouse holds of a symbol."""

from __future__ import annotations

from datetime import date

import click

from marketdata_pipeline.cli.common import table, warehouse, when
from marketdata_pipeline.registry import backfill_state
from marketdata_pipeline.registry.stats import stats


@click.command("stats")
@click.argument("symbol")
def stats_command(symbol: str) -> None:
    """Bars per timeframe, first and last bar, validation rate and calendar gaps of SYMBOL."""
    with warehouse() as conn:
        tracked, per_timeframe = stats(conn, symbol)
        counts = backfill_state.window_counts_of(conn, tracked.symbol)
    click.echo(
        f"{tracked.symbol} ({tracked.asset_class}), backfill {tracked.backfill_status} "
        f"({counts.of(backfill_state.expected_windows())} month windows loaded)"
    )
    table(
        ["TIMEFRAME", "BARS", "FIRST", "LAST", "VALIDATION", "MISSING DAYS"],
        [
            [s.timeframe, f"{s.bars:,}", when(s.first_bar), when(s.last_bar),
             "-" if s.validation_rate is None else f"{s.validation_rate:.2%}",
             _missing(s.missing_days)]
            for s in per_timeframe
        ],
    )  # fmt: skip


def _missing(days: list[date] | None) -> str:
    if days is None:
        return "-"
    if not days:
        return "0"
    shown = ", ".join(map(str, days[:5])) + (", ..." if len(days) > 5 else "")
    return f"{len(days)} ({shown})"
