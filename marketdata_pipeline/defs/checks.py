"""The freshness check: reads the warehouse, not a run, so it runs on its own schedule (and
at the end of a bars run that selects it)."""

from datetime import datetime

import dagster as dg
import psycopg
from psycopg import sql

from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.quality.calendars import last_complete_session
from marketdata_pipeline.registry.symbols import active_symbols

FRESHNESS = "freshness"
FRESHNESS_DESCRIPTION = (
    "Warns when an active symbol's latest bar is older than the last complete session "
    "(stocks, NYSE calendar) or UTC day (crypto). Reads the warehouse: runs on its own "
    "schedule, an hour after the nightly refresh starts, and on demand."
)


def stale_symbols(
    conn: psycopg.Connection, market: Market, timeframe: Timeframe, now: datetime
) -> tuple[str, dict[str, str]]:
    """The expected latest day, and each active symbol whose latest bar is older than it."""
    symbols = active_symbols(conn, market)
    expected = last_complete_session(market, now)
    latest: dict[str, datetime] = dict(
        conn.execute(
            sql.SQL("SELECT symbol, max(ts) FROM {} WHERE symbol = ANY(%s) GROUP BY symbol").format(
                sql.Identifier(timeframe.table)
            ),
            (symbols,),
        ).fetchall()
    )
    stale = {}
    for symbol in symbols:
        last = latest.get(symbol)
        day = last.astimezone(market.zone).date() if last else None
        if day is None or day < expected:
            stale[symbol] = str(day) if day else "no bars"
    return str(expected), stale


def freshness_result(
    conn: psycopg.Connection, key: dg.AssetKey, market: Market, timeframe: Timeframe, now: datetime
) -> dg.AssetCheckResult:
    expected, stale = stale_symbols(conn, market, timeframe, now)
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=FRESHNESS,
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "expected_latest_day": expected,
            "stale_symbols": len(stale),
            "stale": _listed([f"{s} ({d})" for s, d in sorted(stale.items())]),
        },
    )


def _listed(items: list[str], shown: int = 40) -> str:
    """The first `shown` items, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more or "none"
