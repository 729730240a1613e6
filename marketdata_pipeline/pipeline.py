"""Fetch -> validate -> load of windows (a symbol's months, or the new days of a night): the
pipeline path, without Dagster.

A symbol's contiguous windows are fetched with one paginated request stream. Each bar goes
to the window its timestamp falls in, whatever order the provider sends; a window is
validated once the stream has passed it (a page holds a bar after its end) and loaded while
the next one is fetched, in a worker thread one window ahead, so memory holds a few months
and a page whatever the range. A bar that arrives after its window was loaded makes that
window be fetched again on its own: nothing received is lost, nothing counted twice.

Months the provider's plan does not cover are reported as unavailable, the rest load; a load
that would empty or halve a window is refused and reported, the other windows go on.

A night loads each symbol's days since its latest stored bar (`new_days`); daily bars of many
symbols then come from the grouped daily endpoint, one request per session for all of them
(`ingest_grouped`), when that is fewer requests than a stream per symbol.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TypeVar

import polars as pl
import psycopg
from psycopg import sql

from marketdata_pipeline import clock, config
from marketdata_pipeline.domain import (
    Market,
    Timeframe,
    Window,
    contiguous_runs,
    empty_bars,
    last_day_of_month,
)
from marketdata_pipeline.errors import MarketdataError
from marketdata_pipeline.polygon.client import PolygonClient, PolygonPlanLimit
from marketdata_pipeline.quality.calendars import sessions
from marketdata_pipeline.quality.validation import Validation, validate, validate_symbols
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
    fetched_at: datetime | None = None  # when the provider answered: the adjustment it holds


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
    """Fetch, validate and load each month of `months`; yields each as it is loaded."""
    windows = [Window.of_month(market, timeframe, symbol, month) for month in months]
    return ingest_windows(client, conn, windows, run_id=run_id, accept_shrink=accept_shrink)


def ingest_windows(
    client: PolygonClient,
    conn: psycopg.Connection,
    windows: Sequence[Window],
    *,
    run_id: str | None = None,
    accept_shrink: bool = False,
) -> Generator[WindowOutcome, None, None]:
    """Fetch, validate and load each of one symbol's `windows`; yields each as it is loaded.
    Closing the generator early stops the read-ahead worker; nothing more is loaded.

    Fetching and validating run one window ahead in a worker thread, so the next month is
    being fetched while the database writes this one (measured by `scripts/bench.py`).
    """
    with read_ahead(fetch_windows(client, windows), depth=READ_AHEAD_WINDOWS) as fetched:
        for part in fetched:
            outcome = WindowOutcome(**vars(part))
            if part.validation is not None:
                refuse_synthetic(conn, client)
                outcome.load, outcome.refused = _load(conn, part, run_id, accept_shrink)
            yield outcome


class SyntheticRefused(MarketdataError):
    """Synthetic bars (the simulator's) bound for a database other than the demo's."""


def refuse_synthetic(conn: psycopg.Connection, client: PolygonClient) -> None:
    """Refuse to load bars from the simulator (the client saw its header) into any database
    but the offline demo's, unless the operator allowed it: a POLYGON_BASE_URL pointed at a
    simulator must not put synthetic bars among real ones."""
    database = conn.info.dbname
    if client.synthetic and database != config.DEMO_DATABASE and not config.synthetic_allowed():
        raise SyntheticRefused(
            f"refused: the provider at {client.base_url} is the Polygon simulator (synthetic "
            f"bars), which loads only into the demo database {config.DEMO_DATABASE}, not "
            f"{database}; set MARKETDATA_ALLOW_SYNTHETIC=1 to load them anyway"
        )


def _load(
    conn: psycopg.Connection, part: FetchedWindow, run_id: str | None, accept_shrink: bool
) -> tuple[LoadResult | None, str | None]:
    assert part.validation is not None
    window, validation = part.window, part.validation
    try:
        load = replace_window(
            conn,
            window,
            validation.valid,
            validation.rejected,
            run_id,
            accept_shrink=accept_shrink,
            fetched_at=part.fetched_at,
        )
    except ShrinkRefused as refusal:
        reason = f"{refusal} (request ids {', '.join(part.request_ids) or '?'})"
        log.warning("%s", reason)
        return None, reason
    log.info(
        "%s %s %s: loaded %d bars, rejected %d, flagged %d (replaced %d)",
        window.symbol,
        window.timeframe,
        window.label,
        load.rows_loaded,
        load.rows_rejected,
        validation.flagged.height,
        load.rows_replaced,
    )
    return load, None


def fetch_windows(client: PolygonClient, windows: Sequence[Window]) -> Iterator[FetchedWindow]:
    """Each of one symbol's `windows`, fetched and validated; one request stream per run of
    windows that follow each other. Months the plan does not cover come first, as
    unavailable."""
    for run in contiguous_runs(windows):
        ticker = run[0].market.provider_ticker(run[0].symbol)
        try:
            first = next(stream := _stream(client, ticker, run))
        except PolygonPlanLimit as refusal:
            yield from _within_plan(client, ticker, run, str(refusal))
            continue
        yield first
        yield from stream


def new_days(
    conn: psycopg.Connection,
    market: Market,
    timeframe: Timeframe,
    months_by_symbol: Mapping[str, Sequence[date]],
    through: date,
) -> dict[str, list[Window]]:
    """The windows a nightly refresh loads: each symbol's days of its `months` from the day
    of its latest stored bar through `through`, split at month ends; whole months for a
    symbol with no bar in them. The latest stored day is fetched again: it may have been
    loaded before its session ended. A symbol with no such days has no windows."""
    first_month = min(month for months in months_by_symbol.values() for month in months)
    latest: dict[str, datetime] = dict(
        conn.execute(
            sql.SQL(
                "SELECT symbol, max(ts) FROM {} WHERE symbol = ANY(%s) AND ts >= %s GROUP BY symbol"
            ).format(sql.Identifier(timeframe.table)),
            (list(months_by_symbol), market.midnight(first_month)),
        ).fetchall()
    )
    plan = {}
    for symbol, months in months_by_symbol.items():
        since = latest[symbol].astimezone(market.zone).date() if symbol in latest else None
        windows = [
            Window(market, timeframe, symbol, first, last)
            for month in sorted(months)
            if (first := max(month, since or month))
            <= (last := min(last_day_of_month(month), through))
        ]
        if windows:
            plan[symbol] = windows
    return plan


def grouped_saves_requests(windows: Sequence[Window]) -> bool:
    """Whether the grouped daily endpoint (one request per session, all symbols) takes fewer
    requests than one stream per symbol's run of windows."""
    if not windows or windows[0].timeframe is not Timeframe.DAILY:
        return False
    streams = sum(len(contiguous_runs(group)) for group in _by_symbol(windows).values())
    return len(_grouped_days(windows)) < streams


def _grouped_days(windows: Sequence[Window]) -> list[date]:
    market = windows[0].market
    return sorted({d for w in windows for d in sessions(market, w.first_day, w.last_day)})


def ingest_grouped(
    client: PolygonClient,
    conn: psycopg.Connection,
    windows: Sequence[Window],
    *,
    run_id: str | None = None,
    accept_shrink: bool = False,
) -> Generator[WindowOutcome, None, None]:
    """Daily windows of many symbols of one market from the grouped daily endpoint: one
    request per session of their days, then each window validated and loaded exactly as if it
    had been fetched on its own."""
    market = windows[0].market
    symbol_of = {market.provider_ticker(w.symbol): w.symbol for w in windows}
    # Each bar goes to the window of the day it was asked for (a wrong time is then rejected
    # as outside it); the sessions asked are every symbol's, so a symbol takes only the days
    # its own windows need.
    window_of = {
        (w.symbol, day): w for w in windows for day in sessions(market, w.first_day, w.last_day)
    }
    received: dict[Window, list[pl.DataFrame]] = collections.defaultdict(list)
    request_ids: dict[date, str] = {}
    fetched_at = clock.now()
    for day in _grouped_days(windows):
        page = client.grouped_daily(market, day, symbol_of)
        request_ids[day], fetched_at = page.request_id, page.received_at or fetched_at
        for (ticker,), bars in page.frame.partition_by("ticker", as_dict=True).items():
            symbol = symbol_of[str(ticker)]
            if window := window_of.get((symbol, day)):
                received[window].append(bars.drop("ticker").with_columns(symbol=pl.lit(symbol)))
    same_days: dict[tuple[date, date], list[Window]] = collections.defaultdict(list)
    for window in windows:
        same_days[(window.first_day, window.last_day)].append(window)
    for (first_day, last_day), group in same_days.items():
        ids = [request_ids[d] for d in request_ids if first_day <= d <= last_day]
        frame = pl.concat(
            [empty_bars().with_columns(symbol=pl.lit(None, pl.String()))]
            + [bars for w in group for bars in received[w]],
            how="diagonal",
        )
        validations = validate_symbols(frame, group, fetched_at)
        for window in group:
            part = FetchedWindow(
                window, validations[window.symbol], ids, pages=len(ids), fetched_at=fetched_at
            )
            outcome = WindowOutcome(**vars(part))
            refuse_synthetic(conn, client)
            outcome.load, outcome.refused = _load(conn, part, run_id, accept_shrink)
            yield outcome


def _by_symbol(windows: Sequence[Window]) -> dict[str, list[Window]]:
    by_symbol: dict[str, list[Window]] = collections.defaultdict(list)
    for window in sorted(windows, key=lambda w: (w.symbol, w.first_day)):
        by_symbol[window.symbol].append(window)
    return by_symbol


def _within_plan(
    client: PolygonClient, ticker: str, windows: list[Window], refusal: str
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
        day = windows[probe].first_day
        try:
            next(client.aggregate_pages(ticker, 1, timespan, day, day), None)
            high = probe
        except PolygonPlanLimit:
            low = probe + 1
    for window in windows[:low]:
        yield FetchedWindow(window, None, unavailable=refusal)
    if low < len(windows):
        yield from _stream(client, ticker, windows[low:])


def _stream(client: PolygonClient, ticker: str, windows: list[Window]) -> Iterator[FetchedWindow]:
    """The windows of one request stream, validated, each as soon as the stream passed it."""
    first, last = windows[0], windows[-1]
    pages = client.aggregate_pages(
        ticker, 1, first.timeframe.timespan, first.first_day, last.last_day
    )
    parts = [_Gathered() for _ in windows]
    ends = pl.Series([w.end for w in windows[:-1]], dtype=pl.Datetime("ms", "UTC"))
    done, late, fetched_at = 0, set(), clock.now()
    last_request_id: str | None = None
    for page in pages:
        fetched_at, last_request_id = page.received_at or clock.now(), page.request_id
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
                yield parts[done].validated(windows[done], fetched_at, page.request_id)
                done += 1
    for index in range(done, len(windows)):
        yield parts[index].validated(windows[index], fetched_at, last_request_id)
    for index in sorted(late):
        log.warning(
            "%s %s: bars arrived after the window was loaded; fetching it again",
            ticker,
            windows[index].label,
        )
        yield from _stream(client, ticker, [windows[index]])


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
        self, window: Window, fetched_at: datetime, last_request_id: str | None
    ) -> FetchedWindow:
        """The window validated; a window no page held a bar of names the stream's latest
        page, the answer to quote to the provider."""
        raw = pl.concat(self.frames, how="diagonal") if self.frames else empty_bars()
        validation = validate(raw, window, fetched_at)
        request_ids = self.request_ids or ([last_request_id] if last_request_id else [])
        return FetchedWindow(
            window, validation, request_ids, len(self.request_ids), fetched_at=fetched_at
        )


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
