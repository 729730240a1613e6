"""The symbol registry (`tracked_symbols`)."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from marketdata_pipeline.config import SeedSymbol
from marketdata_pipeline.symbols import check_asset_class, normalize


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


def active_symbols(conn: psycopg.Connection, asset_classes: Iterable[str]) -> list[str]:
    """Active symbols of the given classes, sorted."""
    rows = conn.execute(
        "SELECT symbol FROM tracked_symbols WHERE active AND asset_class = ANY(%s) ORDER BY symbol",
        (list(asset_classes),),
    ).fetchall()
    return [row[0] for row in rows]
