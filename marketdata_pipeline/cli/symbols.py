"""`marketdata symbols ...`: the symbol registry (tracked_symbols)."""

from __future__ import annotations

import click

from marketdata_pipeline.cli.common import table, warehouse, when
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.registry import backfill_state, symbols
from marketdata_pipeline.registry.backfill_state import WindowCounts

ASSET_CLASS = click.Choice([c.value for c in AssetClass])


@click.group("symbols")
def symbols_group() -> None:
    """The symbol registry (tracked_symbols)."""


@symbols_group.command("add")
@click.argument("symbol")
@click.option("--class", "asset_class", default="stock", show_default=True, type=ASSET_CLASS)
def symbols_add(symbol: str, asset_class: str) -> None:
    """Register SYMBOL (a removed one is reactivated)."""
    with warehouse() as conn:
        added = symbols.add(conn, symbol, AssetClass(asset_class))
    click.echo(f"registered {added.symbol} ({added.asset_class})")


@symbols_group.command("list")
@click.option("--class", "asset_class", type=ASSET_CLASS)
@click.option("--all", "include_inactive", is_flag=True, help="Include removed symbols.")
def symbols_list(asset_class: str | None, include_inactive: bool) -> None:
    """Active symbols (by class with --class)."""
    with warehouse() as conn:
        rows = symbols.list_symbols(
            conn,
            asset_class=AssetClass(asset_class) if asset_class else None,
            include_inactive=include_inactive,
        )
        counts = backfill_state.window_counts(conn)
    expected = backfill_state.expected_windows()
    table(
        ["SYMBOL", "CLASS", "ACTIVE", "BACKFILL", "WINDOWS", "LAST BACKFILL", "ERROR"],
        [
            [r.symbol, r.asset_class, "yes" if r.active else "no", r.backfill_status,
             counts.get(r.symbol, WindowCounts()).of(expected), when(r.last_backfill),
             r.backfill_error or ""]
            for r in rows
        ],
    )  # fmt: skip


@symbols_group.command("show")
@click.argument("symbol")
def symbols_show(symbol: str) -> None:
    """One symbol and its backfill state per month."""
    with warehouse() as conn:
        tracked = symbols.get(conn, symbol)
        windows = backfill_state.windows(conn, tracked.symbol)
        counts = backfill_state.window_counts_of(conn, tracked.symbol)
    click.echo(
        f"{tracked.symbol} ({tracked.asset_class}), {'active' if tracked.active else 'removed'}, "
        f"added {when(tracked.date_added)}, backfill {tracked.backfill_status} "
        f"({counts.of(backfill_state.expected_windows())} month windows loaded)"
        + (f": {tracked.backfill_error}" if tracked.backfill_error else "")
    )
    table(
        ["ASSET", "MONTH", "STATUS", "LOADED", "REJECTED", "FINISHED", "RUN", "REVISED FOR"],
        [
            [w.asset, f"{w.month:%Y-%m}", w.status, w.rows_loaded, w.rows_rejected,
             when(w.finished_at), w.run_id[:8], w.revised_for or ""]
            for w in windows
        ],
    )  # fmt: skip


@symbols_group.command("remove")
@click.argument("symbol")
def symbols_remove(symbol: str) -> None:
    """Remove SYMBOL: it goes inactive, its bars are kept."""
    with warehouse() as conn:
        removed = symbols.remove(conn, symbol)
    click.echo(f"removed {removed.symbol} (inactive; its bars are kept)")
