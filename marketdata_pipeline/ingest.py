"""Fetch, validate and load one symbol's months: the pipeline path, without Dagster.

Contiguous months are fetched with one paginated request stream; bars are routed to their
month as pages arrive, and each month is validated as soon as the stream has passed it and
loaded while the next one is fetched, so memory holds a few months and a page whatever the
range.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import psycopg

from marketdata_pipeline.market_calendar import NEW_YORK
from marketdata_pipeline.polygon import PolygonClient, empty_bars
from marketdata_pipeline.read_ahead import read_ahead
from marketdata_pipeline.schemas import Validation, validate
from marketdata_pipeline.symbols import polygon_ticker
from marketdata_pipeline.warehouse import LoadResult, Window, replace_window

log = logging.getLogger(__name__)

TIMESPANS = {"daily": "day", "minute": "minute"}
# One validated month waits while another loads: memory stays at a few months and a page.
READ_AHEAD_WINDOWS = 1


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(month: date) -> date:
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def market_zone(asset_class: str) -> ZoneInfo:
    """Stocks' days (and so months) begin at midnight New York; crypto's at midnight UTC."""
    return ZoneInfo("UTC") if asset_class == "crypto" else ZoneInfo(NEW_YORK)


def window(asset_class: str, timeframe: str, symbol: str, month: date) -> Window:
    zone = market_zone(asset_class)
    start = datetime.combine(month, datetime.min.time(), zone).astimezone(UTC)
    end = datetime.combine(next_month(month), datetime.min.time(), zone).astimezone(UTC)
    return Window(TIMESPANS[timeframe], symbol, month, start, end)


def contiguous_runs(months: Sequence[date]) -> list[list[date]]:
    """[Jan, Feb, Apr] -> [[Jan, Feb], [Apr]]."""
    runs: list[list[date]] = []
    for month in sorted(set(months)):
        if runs and next_month(runs[-1][-1]) == month:
            runs[-1].append(month)
        else:
            runs.append([month])
    return runs


@dataclass
class FetchedWindow:
    window: Window
    validation: Validation
    request_ids: list[str]
    pages: int


@dataclass
class WindowOutcome(FetchedWindow):
    load: LoadResult


def ingest(
    client: PolygonClient,
    conn: psycopg.Connection,
    *,
    asset_class: str,
    timeframe: str,
    symbol: str,
    months: Sequence[date],
    run_id: str | None = None,
) -> Iterator[WindowOutcome]:
    """Fetch, validate and load each month of `months`; yields each as it is loaded.

    Fetching and validating run one window ahead in a worker thread, so the next month is
    being fetched while the database writes this one (measured by `scripts/bench.py`).
    """
    fetched = fetch_windows(
        client, asset_class=asset_class, timeframe=timeframe, symbol=symbol, months=months
    )
    with read_ahead(fetched, depth=READ_AHEAD_WINDOWS) as windows:
        for part in windows:
            valid, rejected = part.validation.valid, part.validation.rejected
            load = replace_window(conn, part.window, valid, rejected, run_id)
            log.info(
                "%s %s %s: loaded %d bars, rejected %d, flagged %d (replaced %d)",
                part.window.symbol,
                part.window.timeframe,
                f"{part.window.month:%Y-%m}",
                load.rows_loaded,
                load.rows_rejected,
                part.validation.flagged.height,
                load.rows_replaced,
            )
            yield WindowOutcome(part.window, part.validation, part.request_ids, part.pages, load)


def fetch_windows(
    client: PolygonClient, *, asset_class: str, timeframe: str, symbol: str, months: Sequence[date]
) -> Iterator[FetchedWindow]:
    """Each month of `months`, fetched and validated, in order; one request stream per run of
    contiguous months, each month yielded as soon as the stream has passed it."""
    ticker = polygon_ticker(symbol, asset_class)
    for run in contiguous_runs(months):
        windows = [window(asset_class, timeframe, symbol, m) for m in run]
        first_day, last_day = run[0], next_month(run[-1]) - timedelta(days=1)
        stream = client.aggregate_pages(ticker, 1, TIMESPANS[timeframe], first_day, last_day)
        current, buffered, request_ids, pages = 0, [], [], 0
        for page in stream:
            request_ids.append(page.request_id)
            pages += 1
            frame = page.frame
            while frame.height:
                last = current == len(windows) - 1
                inside = frame if last else frame.filter(pl.col("ts") < windows[current].end)
                buffered.append(inside)
                if inside.height == frame.height:
                    break
                frame = frame.slice(inside.height)
                yield _validated(windows[current], buffered, request_ids, pages)
                current, buffered, request_ids, pages = current + 1, [], [page.request_id], 1
        while current < len(windows):
            yield _validated(windows[current], buffered, request_ids, pages)
            current, buffered, request_ids, pages = current + 1, [], [], 0


def _validated(
    target: Window, frames: list[pl.DataFrame], request_ids: list[str], pages: int
) -> FetchedWindow:
    raw = pl.concat(frames) if frames else empty_bars()
    return FetchedWindow(target, validate(raw, target.start, target.end), list(request_ids), pages)
