"""Loading bars: exact, atomic replacement of one window (a symbol's month, or its latest days).

One transaction per window: take the month's advisory lock (two loads of the same month
serialize), delete the window's bars, binary COPY the validated rows straight into the bars
table, and replace the window's quarantined rows. A crash anywhere rolls back to the previous
state; nothing is ever duplicated. (COPY into a staging table and INSERT ... SELECT from it
gives the same guarantees and loads about a fifth slower: `scripts/bench.py` measures both.)

A load that would empty a window holding bars, or leave it less than half of them, is refused
(the transaction rolls back) unless the caller accepts it: a provider glitch that answers a
month with nothing must not wipe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl
import psycopg
from psycopg import sql

from marketdata_pipeline.domain import Timeframe, Window, normalize_symbol
from marketdata_pipeline.errors import MarketdataError
from marketdata_pipeline.warehouse import pg_binary

# First key of the two-key advisory lock on a window; the second is a hash of the window.
WINDOW_LOCK_CLASS = 0x6D64  # "md"
_AGGREGATES = {
    Timeframe.MINUTE: ("bars_hourly", "1 hour"),
    Timeframe.DAILY: ("bars_weekly", "1 week"),
}
_REJECT_COLUMNS = ("ts", "open", "high", "low", "close", "volume", "vwap", "trades", "reasons")


class ShrinkRefused(MarketdataError):
    """A load would have emptied a window, or removed more than half of its bars."""


@dataclass(frozen=True)
class LoadResult:
    rows_loaded: int
    rows_rejected: int
    rows_replaced: int  # rows the window held before
    rows_in_month: int  # rows of the window's month now (more than loaded for some days)
    rejected_in_month: int  # the month's quarantined rows now


def bar_table(timeframe: Timeframe) -> sql.Identifier:
    return sql.Identifier(timeframe.table)


def copy_bars(table: sql.Identifier) -> sql.Composed:
    """COPY of pg_binary.encode(frame, symbol) rows into a bars table."""
    columns = sql.SQL(", ").join(map(sql.Identifier, pg_binary.COPY_COLUMNS))
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table, columns)


def replace_window(
    conn: psycopg.Connection,
    window: Window,
    bars: pl.DataFrame,
    rejected: pl.DataFrame,
    run_id: str | None = None,
    *,
    accept_shrink: bool = False,
    fetched_at: datetime | None = None,
) -> LoadResult:
    """Make the window hold exactly `bars` (validated) and its quarantine exactly `rejected`.

    Raises ShrinkRefused, leaving the window as it was, when the window holds bars and `bars`
    has fewer than half as many, unless `accept_shrink`.
    """
    symbol = normalize_symbol(window.symbol)
    table = bar_table(window.timeframe)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # Inside a transaction the load would be a savepoint, committed only with it: a
        # window told loaded could still vanish.
        raise MarketdataError(
            f"{symbol} {window.timeframe} {window.label}: a window loads in its own transaction "
            "(use an autocommit session, or commit first)"
        )
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (WINDOW_LOCK_CLASS, f"{window.timeframe}|{symbol}|{window.month}"),
        )
        replaced = conn.execute(
            sql.SQL("DELETE FROM {} WHERE symbol = %s AND ts >= %s AND ts < %s").format(table),
            (symbol, window.start, window.end),
        ).rowcount
        if bars.height * 2 < replaced and not accept_shrink:
            raise ShrinkRefused(
                f"refused to replace {symbol} {window.timeframe} {window.label}: the fetch has "
                f"{bars.height:,} valid bars where {replaced:,} are loaded; they stay "
                "(re-run with accept_shrink to accept the fetch)"
            )
        if bars.height:
            with conn.cursor().copy(copy_bars(table)) as writer:
                writer.write(pg_binary.encode(bars, symbol))
        # The window's quarantine: rows in its days, and the month's rows that have no time
        # or a time outside the month (a fetch's strays; the latest fetch's are kept).
        conn.execute(
            "DELETE FROM bars_rejected WHERE timeframe = %s AND symbol = %s AND month = %s "
            "AND (ts IS NULL OR ts >= %s AND ts < %s OR ts < %s OR ts >= %s)",
            (
                window.timeframe,
                symbol,
                window.month,
                *(window.start, window.end),
                *(window.month_start, window.month_end),
            ),
        )
        if rejected.height:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO bars_rejected (timeframe, symbol, month, ts, open, high, low, "
                    "close, volume, vwap, trades, reasons, run_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (window.timeframe, symbol, window.month, *row, run_id)
                        for row in rejected.select(_REJECT_COLUMNS).iter_rows()
                    ],
                )
        # When the month was fetched whole is the adjustment it holds (splits); the days of a
        # night leave its older days as they were, so they can only make it older.
        conn.execute(
            "INSERT INTO loaded_months AS l (timeframe, symbol, month, loaded_at) "
            "VALUES (%s, %s, %s, coalesce(%s, now())) ON CONFLICT (timeframe, symbol, month) "
            "DO UPDATE SET loaded_at = "
            + (
                "excluded.loaded_at"
                if window.is_whole_month
                else "least(l.loaded_at, excluded.loaded_at)"
            ),
            (window.timeframe, symbol, window.month, fetched_at),
        )
        in_month, rejected_in_month = bars.height, rejected.height
        if not window.is_whole_month:
            [(in_month,)] = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} WHERE symbol = %s AND ts >= %s AND ts < %s"
                ).format(table),
                (symbol, window.month_start, window.month_end),
            ).fetchall()
            [(rejected_in_month,)] = conn.execute(
                "SELECT count(*) FROM bars_rejected WHERE timeframe = %s AND symbol = %s "
                "AND month = %s",
                (window.timeframe, symbol, window.month),
            ).fetchall()
    return LoadResult(bars.height, rejected.height, replaced, in_month, rejected_in_month)


def refresh_aggregate(
    conn: psycopg.Connection, timeframe: Timeframe, start: datetime, end: datetime
) -> None:
    """Bring the continuous aggregate over `timeframe`'s bars (bars_hourly over minutes,
    bars_weekly over days) up to date for the buckets of [start, end). Its policy refreshes
    only the latest days, and real-time aggregation only reads above the refreshed range, so
    a backfilled month would stay out of it. Without TimescaleDB the aggregates are views.

    A refresh recomputes every symbol's buckets of the range: once after a run's loads, not
    after each window, or a backfill of many symbols would recompute each month as often."""
    autocommit = conn.autocommit
    conn.autocommit = True  # a refresh cannot run inside a transaction
    try:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            return
        view, bucket = _AGGREGATES[timeframe]
        conn.execute(
            "CALL refresh_continuous_aggregate(%s, time_bucket(%s::interval, %s::timestamptz), "
            "time_bucket(%s::interval, %s::timestamptz - interval '1 microsecond') + %s::interval)",
            (view, bucket, start, bucket, end, bucket),
        )
    finally:
        conn.autocommit = autocommit
