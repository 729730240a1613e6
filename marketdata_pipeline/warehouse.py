"""Loading bars: exact, atomic replacement of one (symbol, month) window.

One transaction per window: take the window's advisory lock (two loads of the same window
serialize), binary COPY the validated rows into a session staging table, delete the window's
bars and insert the staged ones, and replace the window's quarantined rows. A crash anywhere
rolls back to the previous state; nothing is ever duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import polars as pl
import psycopg
from psycopg import sql

from marketdata_pipeline import pg_binary
from marketdata_pipeline.polygon import BAR_SCHEMA
from marketdata_pipeline.symbols import normalize

BAR_TABLES = {"day": "bars_daily", "minute": "bars_minute"}
# First key of the two-key advisory lock on a window; the second is a hash of the window.
WINDOW_LOCK_CLASS = 0x6D64  # "md"
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS bars_staging (
    ts timestamptz NOT NULL, open double precision, high double precision,
    low double precision, close double precision, volume double precision,
    vwap double precision, trades bigint
) ON COMMIT DELETE ROWS
"""
_REJECT_COLUMNS = ("ts", "open", "high", "low", "close", "volume", "vwap", "trades", "reasons")


@dataclass(frozen=True)
class Window:
    """The bars of one symbol in one month, as [start, end) in UTC."""

    timeframe: str  # "day" | "minute"
    symbol: str
    month: date
    start: datetime
    end: datetime


@dataclass(frozen=True)
class LoadResult:
    rows_loaded: int
    rows_rejected: int
    rows_replaced: int  # rows the window held before


def bar_table(timeframe: str) -> sql.Identifier:
    try:
        return sql.Identifier(BAR_TABLES[timeframe])
    except KeyError:
        raise ValueError(f"unknown timeframe {timeframe!r}: expected day or minute") from None


def replace_window(
    conn: psycopg.Connection,
    window: Window,
    bars: pl.DataFrame,
    rejected: pl.DataFrame,
    run_id: str | None = None,
) -> LoadResult:
    """Make the window hold exactly `bars` (validated) and its quarantine exactly `rejected`."""
    symbol = normalize(window.symbol)
    table = bar_table(window.timeframe)
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (WINDOW_LOCK_CLASS, f"{window.timeframe}|{symbol}|{window.month}"),
        )
        conn.execute(_STAGING)
        if bars.height:
            columns = sql.SQL(", ").join(map(sql.Identifier, pg_binary.COPY_COLUMNS))
            copy = sql.SQL("COPY bars_staging ({}) FROM STDIN (FORMAT BINARY)").format(columns)
            with conn.cursor().copy(copy) as writer:
                writer.write(pg_binary.encode(bars))
        replaced = conn.execute(
            sql.SQL("DELETE FROM {} WHERE symbol = %s AND ts >= %s AND ts < %s").format(table),
            (symbol, window.start, window.end),
        ).rowcount
        loaded = conn.execute(
            sql.SQL(
                "INSERT INTO {} (symbol, ts, open, high, low, close, volume, vwap, trades) "
                "SELECT %s, ts, open, high, low, close, volume, vwap, trades FROM bars_staging"
            ).format(table),
            (symbol,),
        ).rowcount
        conn.execute(
            "DELETE FROM bars_rejected WHERE timeframe = %s AND symbol = %s AND month = %s",
            (window.timeframe, symbol, window.month),
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
    return LoadResult(loaded, rejected.height, replaced)


def read_bars(
    conn: psycopg.Connection, timeframe: str, symbol: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """The stored bars of [start, end), oldest first, in the client's frame schema."""
    rows = conn.execute(
        sql.SQL(
            "SELECT ts, open, high, low, close, volume, vwap, trades FROM {} "
            "WHERE symbol = %s AND ts >= %s AND ts < %s ORDER BY ts"
        ).format(bar_table(timeframe)),
        (normalize(symbol), start, end),
    ).fetchall()
    return pl.DataFrame(rows, schema=BAR_SCHEMA, orient="row")
