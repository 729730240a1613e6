"""Asset checks that read the warehouse rather than one run: freshness of the latest bar."""

from datetime import UTC, datetime

import dagster as dg
import psycopg
from psycopg import sql

from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, BarsAsset
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.quality.calendars import last_complete_session
from marketdata_pipeline.registry.symbols import active_symbols

FRESHNESS = "freshness"


def stale_symbols(
    conn: psycopg.Connection, spec: BarsAsset, now: datetime
) -> tuple[str, dict[str, str]]:
    """The expected latest day, and each active symbol whose latest bar is older than it."""
    symbols = active_symbols(conn, spec.market)
    expected = last_complete_session(spec.market, now)
    latest: dict[str, datetime] = dict(
        conn.execute(
            sql.SQL("SELECT symbol, max(ts) FROM {} WHERE symbol = ANY(%s) GROUP BY symbol").format(
                sql.Identifier(spec.timeframe.table)
            ),
            (symbols,),
        ).fetchall()
    )
    stale = {}
    for symbol in symbols:
        last = latest.get(symbol)
        day = last.astimezone(spec.market.zone).date() if last else None
        if day is None or day < expected:
            stale[symbol] = str(day) if day else "no bars"
    return str(expected), stale


def build_freshness_check(spec: BarsAsset) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=spec.name,
        name=FRESHNESS,
        description="Warns when an active symbol's latest bar is older than the last complete "
        "session (stocks, NYSE calendar) or UTC day (crypto).",
        blocking=False,
    )
    def freshness(warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with warehouse.connection() as conn:
            expected, stale = stale_symbols(conn, spec, datetime.now(UTC))
        return dg.AssetCheckResult(
            passed=not stale,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "expected_latest_day": expected,
                "stale_symbols": len(stale),
                "stale": ", ".join(f"{s} ({d})" for s, d in sorted(stale.items())[:40]) or "none",
            },
        )

    return freshness


FRESHNESS_CHECKS: dict[BarsAsset, dg.AssetChecksDefinition] = {
    spec: build_freshness_check(spec) for spec in ALL_BARS_ASSETS
}
