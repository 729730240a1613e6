"""Fetch -> validate -> load of one symbol's months: the pipeline path, without Dagster.

Contiguous months are fetched with one paginated request stream. Each bar goes to the month
its timestamp falls in, whatever order the provider sends; a month is validated once the
stream has passed it (a page holds a bar after the month's end) and loaded while the next
one is fetched, in a worker thread one month ahead, so memory holds a few months and a page
whatever the range. A bar that arrives after its month was loaded makes
that month be fetched again on its own: nothing received is lost, nothing counted twice.

Months the provider's plan does not cover are reported as unavailable, the rest load; a load
that would empty or halve a month is refused and reported, the other months go on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeVar

import polars as pl
import psycopg

from marketdata_pipeline.domain import Market, Timeframe, Window, contiguous_runs, empty_bars
from marketdata_pipeline.polygon.client import PolygonClient, PolygonPlanLimit
from marketdata_pipeline.quality.validation import Validation, validate
from marketdata_pipeline.warehouse.loading import LoadResult, ShrinkRefused, replace_window

log = logging.getLogger(__name__)

# One validated month waits while another loads: memory stays at a few months and a page.
READ_AHEAD_WINDOWS = 1
# After the consumer stops (an error, or Dagster's SIGTERM), how long to wait for the worker;
# it is a daemon thread blocked in at most one request, and the run must not hang on it.
WORKER_STOP_SECONDS = 2.0


@dataclass
class FetchedWindow:
    window: Window
    validation: Validation | None  # None when the plan does not cover the month
    request_ids: list[str] = field(default_factory=list)
    pages: int = 0
    unavailable: str | None = None  # the provider's words, when the plan does not cover it


@dataclass
class WindowOutcome(FetchedWindow):
    load: LoadResult | None = None  # None when nothing was loaded: unavailable or refused
    refused: str | None = None  # why a load was refused (it would empty or halve the month)


def ingest(
    client: PolygonClient,
    conn: psycopg.Connection,
    *,
    market: Market,
    timeframe: Timeframe,
    symbol: str,
    months: Sequence[date],
    run_id: str | None = None,
    accept_shrink: bool = False,
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
            outcome = WindowOutcome(**vars(part))
            if part.validation is not None:
                outcome.load, outcome.refused = _load(conn, part, run_id, accept_shrink)
            yield outcome


def _load(
    conn: psycopg.Connection, part: FetchedWindow, run_id: str | None, accept_shrink: bool
) -> tuple[LoadResult | None, str | None]:
    assert part.validation is not None
    window, validation = part.window, part.validation
    try:
        load = replace_window(
            conn, window, validation.valid, validation.rejected, run_id, accept_shrink=accept_shrink
        )
    except ShrinkRefused as refusal:
        reason = f"{refusal} (request ids {', '.join(part.request_ids) or '?'})"
        log.warning("%s", reason)
        return None, reason
    log.info(
        "%s %s %s: loaded %d bars, rejected %d, flagged %d (replaced %d)",
        window.symbol,
        window.timeframe,
        f"{window.month:%Y-%m}",
        load.rows_loaded,
        load.rows_rejected,
        validation.flagged.height,
        load.rows_replaced,
    )
    return load, None


def fetch_windows(
    client: PolygonClient,
    *,
    market: Market,
    timeframe: Timeframe,
    symbol: str,
    months: Sequence[date],
) -> Iterator[FetchedWindow]:
    """Each month of `months`, fetched and validated; one request stream per run of
    contiguous months. Months the plan does not cover come first, as unavailable."""
    ticker = market.provider_ticker(symbol)
    for run in contiguous_runs(months):
        windows = [Window.of_month(market, timeframe, symbol, m) for m in run]
        try:
            first = next(stream := _stream(client, ticker, market, windows))
        except PolygonPlanLimit as refusal:
            yield from _within_plan(client, ticker, market, windows, str(refusal))
            continue
        yield first
        yield from stream


def _within_plan(
    client: PolygonClient, ticker: str, market: Market, windows: list[Window], refusal: str
) -> Iterator[FetchedWindow]:
    """The months the plan covers, fetched; the older ones, which it does not, unavailable.

    A plan's history reaches back a fixed time, so the covered months are the newest ones: a
    binary search with one-day probes (a month's first day) finds the first, then they load as
    one stream. A month the plan covers only in part is unavailable whole: its first day is.
    """
    timespan = windows[0].timeframe.timespan
    low, high = 0, len(windows)
    while low < high:
        probe = (low + high) // 2
        day = windows[probe].month
        try:
            next(client.aggregate_pages(ticker, 1, timespan, day, day), None)
            high = probe
        except PolygonPlanLimit:
            low = probe + 1
    for window in windows[:low]:
        yield FetchedWindow(window, None, unavailable=refusal)
    if low < len(windows):
        yield from _stream(client, ticker, market, windows[low:])


def _stream(
    client: PolygonClient, ticker: str, market: Market, windows: list[Window]
) -> Iterator[FetchedWindow]:
    """The windows of one request stream, validated, each as soon as the stream passed it."""
    first, last = windows[0], windows[-1]
    pages = client.aggregate_pages(ticker, 1, first.timeframe.timespan, first.month, last.last_day)
    parts = [_Gathered() for _ in windows]
    ends = pl.Series([w.end for w in windows[:-1]], dtype=pl.Datetime("ms", "UTC"))
    done, late, fetched_at = 0, set(), datetime.now(UTC)
    last_request_id: str | None = None
    for page in pages:
        fetched_at, last_request_id = page.received_at or datetime.now(UTC), page.request_id
        frame = page.frame
        if frame.height:
            # Bars before the first month go to it, after the last to the last (validation
            # rejects them as outside the window); a bar without a time goes to the first.
            routed = frame.with_columns(
                _window=ends.search_sorted(frame["ts"], side="right").fill_null(0)
            )
            for (index,), part in routed.partition_by("_window", as_dict=True).items():
                if index < done:  # its month was loaded before this bar arrived
                    late.add(index)
                    continue
                parts[index].add(part.drop("_window"), page.request_id)
            # Asked in ascending order, the stream has passed every month before its latest
            # bar; a bar of such a month that still comes later is late (see below).
            latest = frame["ts"].max()
            while done < len(windows) - 1 and latest is not None and latest >= ends[done]:
                yield parts[done].validated(windows[done], market, fetched_at, page.request_id)
                done += 1
    for index in range(done, len(windows)):
        yield parts[index].validated(windows[index], market, fetched_at, last_request_id)
    for index in sorted(late):
        log.warning(
            "%s %s: bars arrived after the month was loaded; fetching it again",
            ticker,
            f"{windows[index].month:%Y-%m}",
        )
        yield from _stream(client, ticker, market, [windows[index]])


@dataclass
class _Gathered:
    """The bars of one window received so far, and the pages they came in."""

    frames: list[pl.DataFrame] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    def add(self, frame: pl.DataFrame, request_id: str) -> None:
        self.frames.append(frame)
        if request_id not in self.request_ids:
            self.request_ids.append(request_id)

    def validated(
        self, window: Window, market: Market, fetched_at: datetime, last_request_id: str | None
    ) -> FetchedWindow:
        """The window validated; a window no page held a bar of names the stream's latest
        page, the answer to quote to the provider."""
        raw = pl.concat(self.frames, how="diagonal") if self.frames else empty_bars()
        validation = validate(raw, window, market, fetched_at)
        request_ids = self.request_ids or ([last_request_id] if last_request_id else [])
        return FetchedWindow(window, validation, request_ids, len(self.request_ids))


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
        worker.join(WORKER_STOP_SECONDS)
        if worker.is_alive():
            log.warning("the read-ahead worker is still in a request; leaving it behind")
