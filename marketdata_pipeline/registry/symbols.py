"""The symbol registry (`tracked_symbols`): add, get, list, status, soft removal, seed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from marketdata_pipeline.config import SeedSymbol
from marketdata_pipeline.domain import AssetClass, Market, normalize_symbol
from marketdata_pipeline.errors import AlreadyExists, NotFound

_COLUMNS = "symbol, asset_class, active, date_added, last_backfill, backfill_status, backfill_error"


@dataclass(frozen=True)
class TrackedSymbol:
    symbol: str
    asset_class: AssetClass
    active: bool
    date_added: datetime
    last_backfill: datetime | None
    backfill_status: str
    backfill_error: str | None


def add(conn: psycopg.Connection, symbol: str, asset_class: AssetClass) -> TrackedSymbol:
    """Register a symbol; a removed one is reactivated. A symbol is unique across classes."""
    symbol = normalize_symbol(symbol)
    with conn.transaction():
        # Insert first: SELECT ... FOR UPDATE locks no row when there is none, so two
        # concurrent adds of a new symbol would both insert and one would hit the unique key.
        # ON CONFLICT makes the second wait for the first and then find its row below.
        inserted = conn.execute(
            "INSERT INTO tracked_symbols (symbol, asset_class) VALUES (%s, %s) "
            "ON CONFLICT (symbol) DO NOTHING RETURNING symbol",
            (symbol, asset_class),
        ).fetchone()
        if inserted is None:
            existing = conn.execute(
                "SELECT active, asset_class FROM tracked_symbols WHERE symbol = %s FOR UPDATE",
                (symbol,),
            ).fetchone()
            assert existing is not None, "rows of tracked_symbols are never deleted"
            if existing[0]:
                raise AlreadyExists(f"symbol {symbol} is already registered (as {existing[1]})")
            conn.execute(
                "UPDATE tracked_symbols SET active = true, asset_class = %s, "
                "backfill_status = 'pending', backfill_error = NULL WHERE symbol = %s",
                (asset_class, symbol),
            )
    return get(conn, symbol)


def get(conn: psycopg.Connection, symbol: str) -> TrackedSymbol:
    symbol = normalize_symbol(symbol)
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM tracked_symbols WHERE symbol = %s", (symbol,)
    ).fetchone()
    if row is None:
        raise NotFound(f"symbol {symbol} is not registered")
    return _tracked(row)


def list_symbols(
    conn: psycopg.Connection,
    *,
    asset_class: AssetClass | None = None,
    include_inactive: bool = False,
) -> list[TrackedSymbol]:
    classes = [asset_class] if asset_class else list(AssetClass)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tracked_symbols WHERE asset_class = ANY(%s) "
        "AND (active OR %s) ORDER BY symbol",
        (classes, include_inactive),
    ).fetchall()
    return [_tracked(row) for row in rows]


def active_symbols(conn: psycopg.Connection, market: Market) -> list[str]:
    """Active symbols of a market's asset classes, sorted."""
    rows = conn.execute(
        "SELECT symbol FROM tracked_symbols WHERE active AND asset_class = ANY(%s) ORDER BY symbol",
        (list(market.asset_classes),),
    ).fetchall()
    return [row[0] for row in rows]


def remove(conn: psycopg.Connection, symbol: str) -> TrackedSymbol:
    """Soft removal: the symbol goes inactive (its partitions go), its bars stay."""
    symbol = normalize_symbol(symbol)
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
            (normalize_symbol(item.symbol), item.asset_class),
        ).fetchone()
        if row:
            added.append(row[0])
    return added


def _tracked(row: tuple) -> TrackedSymbol:
    symbol, asset_class, *rest = row
    return TrackedSymbol(symbol, AssetClass(asset_class), *rest)
