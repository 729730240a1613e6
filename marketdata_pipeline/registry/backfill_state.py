"""Per-window backfill state, and its rollup onto `tracked_symbols`.

Writes are idempotent: recording the same run event twice leaves every row as it was, and an
older event never overwrites what a newer run wrote for the same window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from marketdata_pipeline import clock, config
from marketdata_pipeline.domain import Timeframe


@dataclass(frozen=True)
class WindowState:
    asset: str
    symbol: str
    month: date
    status: str  # in_progress | completed | failed
    run_id: str
    started_at: datetime | None
    finished_at: datetime | None = None
    rows_loaded: int | None = None
    rows_rejected: int | None = None
    error: str | None = None
    revised_for: str | None = None  # the split change a revision run re-fetched it for


# A state from run R is written unless the row already holds a later word on the window:
# a finished state of R itself (a replayed STARTED), or a state of a run started after R.
_UPSERT = """
INSERT INTO backfill_state AS s (asset, symbol, month, status, run_id, started_at,
    finished_at, rows_loaded, rows_rejected, error, revised_for, updated_at)
SELECT %(asset)s, %(symbol)s, %(month)s, %(status)s, %(run_id)s, %(started_at)s,
    %(finished_at)s, %(rows_loaded)s, %(rows_rejected)s, %(error)s, %(revised_for)s, now()
-- only a registered symbol has a state: a run of a partition typed into the UI leaves none
WHERE EXISTS (SELECT FROM tracked_symbols WHERE symbol = %(symbol)s)
ON CONFLICT (asset, symbol, month) DO UPDATE SET
    status = excluded.status, run_id = excluded.run_id, started_at = excluded.started_at,
    finished_at = excluded.finished_at, rows_loaded = excluded.rows_loaded,
    rows_rejected = excluded.rows_rejected, error = excluded.error,
    revised_for = excluded.revised_for, updated_at = now()
WHERE (s.status, s.run_id, s.started_at, s.finished_at, s.rows_loaded, s.rows_rejected, s.error,
       s.revised_for)
      IS DISTINCT FROM (excluded.status, excluded.run_id, excluded.started_at,
      excluded.finished_at, excluded.rows_loaded, excluded.rows_rejected, excluded.error,
      excluded.revised_for)
  AND NOT (s.run_id = excluded.run_id AND s.status <> 'in_progress'
           AND excluded.status = 'in_progress')
  AND NOT (s.run_id <> excluded.run_id AND s.started_at > excluded.started_at)
"""

_ROLLUP = """
UPDATE tracked_symbols t SET
    backfill_status = r.status, backfill_error = r.error, last_backfill = r.last_backfill
FROM (
    SELECT symbol,
           CASE WHEN bool_or(status = 'in_progress') THEN 'in_progress'
                WHEN bool_or(status = 'failed') THEN 'failed'
                WHEN count(*) FILTER (WHERE status IN ('completed', 'unavailable'))
                     < %(expected)s THEN 'pending'
                WHEN bool_or(status = 'completed') THEN 'completed'
                ELSE 'unavailable' END AS status,
           (array_agg(error ORDER BY finished_at DESC NULLS LAST)
                FILTER (WHERE status = 'failed'))[1] AS error,
           max(finished_at) FILTER (WHERE status = 'completed') AS last_backfill
    FROM backfill_state WHERE symbol = ANY(%(symbols)s) GROUP BY symbol
) r
WHERE t.symbol = r.symbol
  AND (t.backfill_status, t.backfill_error, t.last_backfill)
      IS DISTINCT FROM (r.status, r.error, r.last_backfill)
"""


def expected_windows(today: date | None = None) -> int:
    """The windows of a symbol's whole history: every month from MARKETDATA_HISTORY_START to
    this one (the partitions' months), for each timeframe."""
    today = today or clock.now().date()
    start = config.history_start()
    months = (today.year - start.year) * 12 + today.month - start.month + 1
    return max(months, 0) * len(Timeframe)


def record(
    conn: psycopg.Connection, states: Iterable[WindowState], expected: int | None = None
) -> tuple[int, int]:
    """Write window states and roll them up onto their symbols; returns the window rows and
    the symbol rows changed.

    A symbol is `completed` only when all `expected` windows of its history (default: its
    whole history, `expected_windows()`) are completed or unavailable (beyond the provider's
    plan), and `unavailable` when all are that; `pending` while some are still to load;
    `in_progress` or `failed` when any window is.
    """
    states = list(states)
    windows = 0
    with conn.transaction():
        for state in states:
            windows += conn.execute(_UPSERT, state.__dict__).rowcount
        symbols = conn.execute(
            _ROLLUP,
            {
                "symbols": sorted({s.symbol for s in states}),
                "expected": expected_windows() if expected is None else expected,
            },
        ).rowcount
    return windows, symbols


@dataclass(frozen=True)
class WindowCounts:
    """A symbol's month windows: loaded, and beyond the provider's plan."""

    loaded: int = 0
    unavailable: int = 0

    def of(self, expected: int) -> str:
        """`12/166`, or `12/166 (60 beyond the plan)`."""
        beyond = f" ({self.unavailable} beyond the plan)" if self.unavailable else ""
        return f"{self.loaded}/{expected}{beyond}"


def window_counts(
    conn: psycopg.Connection, symbols: Sequence[str] | None = None
) -> dict[str, WindowCounts]:
    """Each symbol's window counts: every symbol's, or those of `symbols`."""
    rows = conn.execute(
        "SELECT symbol, count(*) FILTER (WHERE status = 'completed'), "
        "count(*) FILTER (WHERE status = 'unavailable') FROM backfill_state "
        "WHERE %(all)s OR symbol = ANY(%(symbols)s) GROUP BY symbol",
        {"all": symbols is None, "symbols": list(symbols or ())},
    ).fetchall()
    return {symbol: WindowCounts(loaded, unavailable) for symbol, loaded, unavailable in rows}


def window_counts_of(conn: psycopg.Connection, symbol: str) -> WindowCounts:
    """One symbol's window counts, read from its rows alone."""
    return window_counts(conn, [symbol]).get(symbol, WindowCounts())


def windows(conn: psycopg.Connection, symbol: str) -> list[WindowState]:
    rows = conn.execute(
        "SELECT asset, symbol, month, status, run_id, started_at, finished_at, rows_loaded, "
        "rows_rejected, error, revised_for FROM backfill_state WHERE symbol = %s "
        "ORDER BY asset, month",
        (symbol,),
    ).fetchall()
    return [WindowState(*row) for row in rows]
