"""Fetch -> validate -> load of one symbol's months: the pipeline path, without Dagster.

Contiguous months are fetched with one paginated request stream; bars are routed to their
month as pages arrive, and each month is validated as soon as the stream has passed it and
loaded while the next one is fetched (in a worker thread, one month ahead), so memory holds a
few months and a page whatever the range.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

import polars as pl
import psycopg

from marketdata_pipeline.domain import Market, Timeframe, Window, contiguous_runs, empty_bars
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.quality.validation import Validation, validate
from marketdata_pipeline.warehouse.loading import LoadResult, replace_window

log = logging.getLogger(__name__)

# One validated month waits while another loads: memory stays at a few months and a page.
READ_AHEAD_WINDOWS = 1


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
    market: Market,
    timeframe: Timeframe,
    symbol: str,
    months: Sequence[date],
    run_id: str | None = None,
) -> Generator[WindowOutcome, None, None]:
    """Fetch, validate and load each month of `months`; yields each as it is loaded.
    Closing the generator early stops the read-ahead worker; nothing more is loaded.

    Fetching and validating run one window ahead in a worker thread, so the next month is
    being fetched while the database writes this one (measured by `scripts/bench.py`).
    """
    fetched = fetch_windows(
        client, market=market, timeframe=timeframe, symbol=symbol, months=months
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
    client: PolygonClient,
    *,
    market: Market,
    timeframe: Timeframe,
    symbol: str,
    months: Sequence[date],
) -> Iterator[FetchedWindow]:
    """Each month of `months`, fetched and validated, in order; one request stream per run of
    contiguous months, each month yielded as soon as the stream has passed it."""
    ticker = market.provider_ticker(symbol)
    for run in contiguous_runs(months):
        windows = [Window.of_month(market, timeframe, symbol, m) for m in run]
        first_day, last_day = run[0], windows[-1].last_day
        stream = client.aggregate_pages(ticker, 1, timeframe.timespan, first_day, last_day)
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


T = TypeVar("T")
_END = object()


@contextmanager
def read_ahead(items: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """Iterate `items` in a worker thread, at most `depth` items ahead of the consumer.

    The worker's exception is raised in the consumer after the items before it; leaving the
    block early stops the worker and closes `items`.
    """
    slots: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(slot: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(slot, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # re-raised in the consumer's thread
            put((_END, error))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    def consume() -> Iterator[T]:
        while True:
            item, error = slots.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item  # type: ignore[misc]

    worker = threading.Thread(target=work, name="read-ahead", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()
