"""The symbol registry (`tracked_symbols`): add, get, list, status, soft removal, stats."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import psycopg
from psycopg import sql

from marketdata_pipeline import quality
from marketdata_pipeline.config import SeedSymbol
from marketdata_pipeline.errors import AlreadyExists, ConfigError, NotFound
from marketdata_pipeline.symbols import check_asset_class, normalize
from marketdata_pipeline.warehouse import BAR_TABLES

ONE_DAY = timedelta(days=1)
STATUSES = ("pending", "in_progress", "completed", "failed")
_COLUMNS = "symbol, asset_class, active, date_added, last_backfill, backfill_status, backfill_error"


@dataclass(frozen=True)
class TrackedSymbol:
    symbol: str
    asset_class: str
    active: bool
    date_added: datetime
    last_backfill: datetime | None
    backfill_status: str
    backfill_error: str | None


def add(conn: psycopg.Connection, symbol: str, asset_class: str) -> TrackedSymbol:
    """Register a symbol; a removed one is reactivated. A symbol is unique across classes."""
    symbol, asset_class = normalize(symbol), check_asset_class(asset_class)
    with conn.transaction():
        existing = conn.execute(
            "SELECT active, asset_class FROM tracked_symbols WHERE symbol = %s FOR UPDATE",
            (symbol,),
        ).fetchone()
        if existing and existing[0]:
            raise AlreadyExists(f"symbol {symbol} is already registered (as {existing[1]})")
        if existing:
            conn.execute(
                "UPDATE tracked_symbols SET active = true, asset_class = %s, "
                "backfill_status = 'pending', backfill_error = NULL WHERE symbol = %s",
                (asset_class, symbol),
            )
        else:
            conn.execute(
                "INSERT INTO tracked_symbols (symbol, asset_class) VALUES (%s, %s)",
                (symbol, asset_class),
            )
    return get(conn, symbol)


def get(conn: psycopg.Connection, symbol: str) -> TrackedSymbol:
    symbol = normalize(symbol)
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM tracked_symbols WHERE symbol = %s", (symbol,)
    ).fetchone()
    if row is None:
        raise NotFound(f"symbol {symbol} is not registered")
    return TrackedSymbol(*row)


def list_symbols(
    conn: psycopg.Connection, *, asset_class: str | None = None, include_inactive: bool = False
) -> list[TrackedSymbol]:
    classes = [check_asset_class(asset_class)] if asset_class else ["stock", "etf", "crypto"]
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tracked_symbols WHERE asset_class = ANY(%s) "
        "AND (active OR %s) ORDER BY symbol",
        (classes, include_inactive),
    ).fetchall()
    return [TrackedSymbol(*row) for row in rows]


def active_symbols(conn: psycopg.Connection, asset_classes: Iterable[str]) -> list[str]:
    """Active symbols of the given classes, sorted."""
    rows = conn.execute(
        "SELECT symbol FROM tracked_symbols WHERE active AND asset_class = ANY(%s) ORDER BY symbol",
        (list(asset_classes),),
    ).fetchall()
    return [row[0] for row in rows]


def set_status(
    conn: psycopg.Connection,
    symbol: str,
    status: str,
    *,
    error: str | None = None,
    last_backfill: datetime | None = None,
) -> None:
    if status not in STATUSES:
        raise ConfigError(f"invalid backfill status {status!r}: expected one of {STATUSES}")
    updated = conn.execute(
        "UPDATE tracked_symbols SET backfill_status = %s, backfill_error = %s, "
        "last_backfill = coalesce(%s, last_backfill) WHERE symbol = %s",
        (status, error, last_backfill, normalize(symbol)),
    ).rowcount
    if not updated:
        raise NotFound(f"symbol {normalize(symbol)} is not registered")


def remove(conn: psycopg.Connection, symbol: str) -> TrackedSymbol:
    """Soft removal: the symbol goes inactive (its partitions go), its bars stay."""
    symbol = normalize(symbol)
    updated = conn.execute(
        "UPDATE tracked_symbols SET active = false WHERE symbol = %s AND active", (symbol,)
    ).rowcount
    if not updated:
        get(conn, symbol)  # NotFound when unknown
        raise NotFound(f"symbol {symbol} is already removed")
    return get(conn, symbol)


def seed(conn: psycopg.Connection, symbols: Iterable[SeedSymbol]) -> list[str]:
    """Register the symbols not registered yet and return them; others are left as they are."""
    added = []
    for item in symbols:
        row = conn.execute(
            "INSERT INTO tracked_symbols (symbol, asset_class) VALUES (%s, %s) "
            "ON CONFLICT (symbol) DO NOTHING RETURNING symbol",
            (normalize(item.symbol), check_asset_class(item.asset_class)),
        ).fetchone()
        if row:
            added.append(row[0])
    return added


@dataclass(frozen=True)
class TimeframeStats:
    timeframe: str
    bars: int
    first_bar: datetime | None
    last_bar: datetime | None
    rejected: int
    missing_days: list[date]  # sessions (stocks) or days (crypto) without a bar

    @property
    def validation_rate(self) -> float:
        total = self.bars + self.rejected
        return self.bars / total if total else 1.0


def stats(conn: psycopg.Connection, symbol: str) -> tuple[TrackedSymbol, list[TimeframeStats]]:
    """Per timeframe: bars, first and last bar, validation rate, days missing in between."""
    tracked = get(conn, symbol)
    market = "crypto" if tracked.asset_class == "crypto" else "stock"
    result = []
    for timeframe, table in BAR_TABLES.items():
        days_query = sql.SQL(
            "SELECT (ts AT TIME ZONE %s)::date, count(*) FROM {} WHERE symbol = %s GROUP BY 1"
        ).format(sql.Identifier(table))
        per_day = dict(conn.execute(days_query, (quality.zone(market).key, tracked.symbol)))
        span = conn.execute(
            sql.SQL("SELECT min(ts), max(ts) FROM {} WHERE symbol = %s").format(
                sql.Identifier(table)
            ),
            (tracked.symbol,),
        ).fetchone()
        rejected = conn.execute(
            "SELECT count(*) FROM bars_rejected WHERE timeframe = %s AND symbol = %s",
            (timeframe, tracked.symbol),
        ).fetchone()
        missing: list[date] = []
        if per_day:
            first_day, last_day = min(per_day), max(per_day)
            expected = quality.expected_days(market, first_day, last_day, last_day + ONE_DAY)
            missing = [d for d in expected if d not in per_day]
        result.append(
            TimeframeStats(
                timeframe,
                sum(per_day.values()),
                span[0] if span else None,
                span[1] if span else None,
                rejected[0] if rejected else 0,
                missing,
            )
        )
    return tracked, result
