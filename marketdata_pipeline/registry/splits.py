"""Splits of the tracked stock symbols, and which loaded months they made stale.

Adjusted bars are divided by every split after them, so a split that appears, changes or is
withdrawn changes the history the provider serves. A month fetched whole at `loaded_at` (in
`loaded_months`, written with each load) holds the adjustment of the splits in effect then;
it is stale once a split change took effect after that (and is due: a split announced for a
later day changes nothing before it). A change takes effect when a fetch first sees it, the
symbol's first fetch included: the provider may list a split days after it executed, so a
month loaded before the fetch that lists it may or may not hold it, and is fetched again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg

from marketdata_pipeline.domain import Market, Split, Timeframe
from marketdata_pipeline.errors import MarketdataError

# When a split row's current state took effect: a withdrawal when withdrawn, else its change,
# but never before its execution day starts in New York.
_EXECUTED = f"(s.execution_date::timestamp AT TIME ZONE '{Market.STOCK.zone.key}')"
_EFFECTIVE = f"greatest(coalesce(s.withdrawn_at, s.changed_at), {_EXECUTED})"
_MONTH_START = f"(l.month::timestamp AT TIME ZONE '{Market.STOCK.zone.key}')"
_MONTH_END = f"((l.month + interval '1 month')::timestamp AT TIME ZONE '{Market.STOCK.zone.key}')"
_HOLDS_BARS = (
    "SELECT FROM {table} b WHERE b.symbol = l.symbol "
    f"AND b.ts >= {_MONTH_START} AND b.ts < {_MONTH_END}"
)


ACCEPT_WITHDRAWAL = "accept_withdrawal"  # the stock_splits run config that overrides a refusal


class SplitsRefused(MarketdataError):
    """A fetch would have withdrawn every split of a symbol: a provider glitch looks so."""


@dataclass(frozen=True)
class SplitChange:
    """What a fetch changed in one symbol's splits."""

    symbol: str
    added: list[Split] = field(default_factory=list)
    changed: list[Split] = field(default_factory=list)
    withdrawn: list[date] = field(default_factory=list)
    first_fetch: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.withdrawn)

    def describe(self) -> str:
        parts = [f"{s.ratio} split on {s.execution_date} added" for s in self.added]
        parts += [f"split on {s.execution_date} changed to {s.ratio}" for s in self.changed]
        parts += [f"split on {d} withdrawn" for d in self.withdrawn]
        return "; ".join(parts) or ("first fetch: no split" if self.first_fetch else "no change")


def replace_splits(
    conn: psycopg.Connection,
    symbol: str,
    fetched: Sequence[Split],
    *,
    accept_withdrawal: bool = False,
) -> SplitChange:
    """Make `symbol`'s splits the provider's list, exactly: new ones added, changed ratios
    updated, missing ones withdrawn (kept, marked), withdrawn ones that came back restored.
    Idempotent: the same list again changes nothing. An empty list where splits are known is
    refused unless `accept_withdrawal`."""
    by_day = {split.execution_date: split for split in fetched}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('splits|' || %s))", (symbol,))
        [(fetched_before,)] = conn.execute(
            "INSERT INTO split_fetches AS f (symbol, first_fetched_at, last_fetched_at) "
            "VALUES (%s, now(), now()) ON CONFLICT (symbol) DO UPDATE SET "
            # xmax is 0 on a row this statement inserted, not on one it updated.
            "last_fetched_at = excluded.last_fetched_at RETURNING f.xmax <> 0",
            (symbol,),
        ).fetchall()
        first_fetch = not fetched_before
        rows = conn.execute(
            "SELECT execution_date, split_from, split_to, withdrawn_at IS NOT NULL "
            "FROM splits WHERE symbol = %s",
            (symbol,),
        ).fetchall()
        stored = {
            day: (ratio_from, ratio_to, withdrawn) for day, ratio_from, ratio_to, withdrawn in rows
        }
        in_effect = [day for day, (_, _, withdrawn) in stored.items() if not withdrawn]
        if in_effect and not fetched and not accept_withdrawal:
            # Withdrawing them would re-fetch the symbol's whole history, and again when
            # they come back: an empty answer is refused, as an empty month is.
            raise SplitsRefused(
                f"the provider listed no split of {symbol} where {len(in_effect)} are known "
                f"(latest {max(in_effect)}), so they are kept; if the provider withdrew them, "
                f"run stock_splits for {symbol} with the config {ACCEPT_WITHDRAWAL}: true"
            )
        change = SplitChange(symbol, first_fetch=first_fetch)
        for day, split in sorted(by_day.items()):
            before = stored.get(day)
            if before is None or before[2]:
                change.added.append(split)
            elif (before[0], before[1]) != (split.split_from, split.split_to):
                change.changed.append(split)
            else:
                continue
            conn.execute(
                "INSERT INTO splits AS s (symbol, execution_date, split_from, split_to, "
                "provider_id, changed_at) VALUES (%s, %s, %s, %s, %s, now()) "
                "ON CONFLICT (symbol, execution_date) DO UPDATE SET "
                "split_from = excluded.split_from, split_to = excluded.split_to, "
                "provider_id = excluded.provider_id, changed_at = excluded.changed_at, "
                "withdrawn_at = NULL",
                (
                    symbol,
                    day,
                    split.split_from,
                    split.split_to,
                    split.provider_id,
                ),
            )
        for day, (_, _, withdrawn) in sorted(stored.items()):
            if day not in by_day and not withdrawn:
                change.withdrawn.append(day)
                conn.execute(
                    "UPDATE splits SET withdrawn_at = now() "
                    "WHERE symbol = %s AND execution_date = %s",
                    (symbol, day),
                )
    return change


def never_fetched(conn: psycopg.Connection, symbols: Sequence[str]) -> list[str]:
    """The symbols whose splits were never fetched, in the order given."""
    fetched = {
        symbol
        for (symbol,) in conn.execute(
            "SELECT symbol FROM split_fetches WHERE symbol = ANY(%s)", (list(symbols),)
        )
    }
    return [symbol for symbol in symbols if symbol not in fetched]


def splits_of(conn: psycopg.Connection, symbol: str) -> list[Split]:
    """The symbol's splits in effect (not withdrawn), oldest first."""
    rows = conn.execute(
        "SELECT symbol, execution_date, split_from, split_to, provider_id FROM splits "
        "WHERE symbol = %s AND withdrawn_at IS NULL ORDER BY execution_date",
        (symbol,),
    ).fetchall()
    return [Split(*row) for row in rows]


@dataclass(frozen=True)
class StaleMonths:
    """A symbol's months fetched under an adjustment a split change has since replaced."""

    symbol: str
    timeframe: Timeframe
    months: list[date]
    since: datetime  # when the latest change that made them stale took effect
    why: str  # that change, as the splits table has it


def stale_months(conn: psycopg.Connection, symbols: Sequence[str]) -> list[StaleMonths]:
    """Per symbol and timeframe, the loaded months that hold bars and that a split change
    took effect after (a month without bars has nothing to adjust)."""
    rows = conn.execute(
        f"""
        SELECT l.symbol, l.timeframe, array_agg(l.month ORDER BY l.month),
               max(c.effective), (array_agg(c.why ORDER BY c.effective DESC))[1]
        FROM loaded_months l
        JOIN LATERAL (
            SELECT {_EFFECTIVE} AS effective,
                   CASE WHEN s.withdrawn_at IS NOT NULL
                        THEN 'split on ' || s.execution_date || ' withdrawn'
                        ELSE s.split_to || ':' || s.split_from || ' split on '
                             || s.execution_date END AS why
            FROM splits s
            WHERE s.symbol = l.symbol AND {_EFFECTIVE} > l.loaded_at AND {_EFFECTIVE} <= now()
              -- a split withdrawn before its day never changed any bar
              AND NOT coalesce(s.withdrawn_at < {_EXECUTED}, false)
            ORDER BY 1 DESC LIMIT 1
        ) c ON true
        WHERE l.symbol = ANY(%s)
          AND CASE l.timeframe
                WHEN 'daily' THEN EXISTS ({_HOLDS_BARS.format(table="bars_daily")})
                ELSE EXISTS ({_HOLDS_BARS.format(table="bars_minute")})
              END
        GROUP BY l.symbol, l.timeframe
        ORDER BY l.symbol, l.timeframe
        """,
        (list(symbols),),
    ).fetchall()
    return [
        StaleMonths(symbol, Timeframe(timeframe), months, since, why)
        for symbol, timeframe, months, since, why in rows
    ]
