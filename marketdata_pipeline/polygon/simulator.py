"""A Polygon-compatible aggregates server with synthetic bars, a clock, plans and faults.

Same paths, parameters, response fields, `limit` semantics (base bars), status codes and
error bodies as Polygon's aggregates API (`openapi-aggregates.json`), with Bearer or
`apiKey` auth. Runs in process as an httpx transport (`Simulator.transport()`) or on a real
socket (`serve`, `marketdata simulator`). Its bars are synthetic and deterministic (see
`synthetic_bars`); never mix them with real data.

As on the provider:
- Pages: `next_url` moves the range's `from` (sorted descending: its `to`) to the next
  page's first base bar and carries `limit`, `sort` and `adjusted` in its cursor. So every
  page is built on its own, from the day it starts, whatever the range's length.
- Timespans: minute and hour bars are built from minute bars, day to year from daily bars;
  an aggregate's `t` is its window's start (weeks start on Sunday, in the market's zone).
  Second aggregates are not synthesized: they are refused as an entitlement the simulated
  account lacks (403 NOT_AUTHORIZED).
- A clock (`now`, or the real UTC clock): no bar that starts after it is served; a bar that
  has started but not finished is. Dates outside 1970-2100, or outside the exchange
  calendar, are an empty OK.
- Plans: `free` allows 5 requests per minute per key (429 with Retry-After beyond) and two
  years of history (403 NOT_AUTHORIZED for an older `from`); None or `unlimited`, no limit.
- Faults on demand (`inject`): see `Faults`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import httpx
import numpy as np

from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.domain import Market
from marketdata_pipeline.polygon import synthetic_bars as synth
from marketdata_pipeline.polygon.client import MAX_LIMIT, SIMULATOR_HEADER

DEFAULT_LIMIT = 5_000
REQUEST_LOG_SIZE = 10_000  # a long-running simulator keeps only the latest requests
HELD_PAGES = 1_000  # pages whose late bars wait for the next request (Faults.late_every)
TIMESPANS = ("second", "minute", "hour", "day", "week", "month", "quarter", "year")
# The served timespans and the base bars each is built from (the provider's `limit` counts
# base bars): minute bars make minutes and hours, daily bars make days to years.
SUPPORTED_TIMESPANS = {
    "minute": "minute",
    "hour": "minute",
    "day": "day",
    "week": "day",
    "month": "day",
    "quarter": "day",
    "year": "day",
}
PLANS = ("free", "unlimited")
FREE_REQUESTS_PER_MINUTE = 5
FREE_HISTORY_YEARS = 2
ORDERS = ("asc", "desc", "shuffled")
# How 200 bodies are spaced: compact as the provider sends them, pretty-printed (`"o": true`),
# or with every kind of JSON whitespace around every token.
SPACINGS = ("compact", "pretty", "odd")
_MAX_MULTIPLIER = 10**9  # wider windows than the simulator's history change nothing
_AGGS = re.compile(
    r"^/v2/aggs/ticker/(?P<ticker>[^/]+)/range/(?P<multiplier>[^/]+)/(?P<timespan>[^/]+)"
    r"/(?P<start>[^/]+)/(?P<end>[^/]+)$"
)
_GROUPED = re.compile(
    r"^/v2/aggs/grouped/locale/(?:us/market/(?P<stocks>stocks)|global/market/(?P<crypto>crypto))"
    r"/(?P<day>[^/]+)$"
)
_SPLITS = "/v3/reference/splits"
_COUNTED_FAULTS = ("rate_limited", "server_errors", "truncated", "empty_results")

_RATE_LIMITED = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your "
    "subscription to continue. https://polygon.io/pricing"
)
_NOT_ENTITLED = (
    "You are not entitled to this data. Please upgrade your plan at https://polygon.io/pricing"
)
_OUTSIDE_PLAN_TIMEFRAME = (
    "Your plan doesn't include this data timeframe. Please upgrade your plan at "
    "https://polygon.io/pricing"
)


@dataclass(frozen=True)
class Faults:
    """Faults to inject. Counts apply to the next N requests; -1 means every request.
    `*_every` faults break every n-th bar of each page (counted within the page)."""

    rate_limited: int = 0
    retry_after: int = 1
    server_errors: int = 0
    delay_seconds: float = 0.0
    truncated: int = 0
    not_authorized: bool = False
    after_requests: int = 0  # the faults begin after this many requests (mid-pagination)
    bad_ohlc_every: int = 0  # every n-th bar has its high below its low
    repeat_timestamp_every: int = 0  # every n-th bar repeats the previous bar's timestamp
    delayed: bool = False  # 200 bodies say "status": "DELAYED"
    order: str = "asc"  # "asc" as asked, "desc" each page descending, "shuffled" in a page
    late_every: int = 0  # every n-th bar of a page arrives at the start of the next page
    repeat_cursor: bool = False  # every next_url repeats the first cursor: runaway paging
    empty_results: int = 0  # counted: a 200 OK without `results`, resultsCount 0
    wrong_types_every: int = 0  # every n-th bar has "o": true, the bar after it a huge "n"
    boolean_every: int = 0  # every n-th bar has "o": true, and nothing else is wrong
    spike_every: int = 0  # every n-th bar's volume is multiplied by 200
    echo_key: bool = False  # 502 whose error text reflects the key presented
    spacing: str = "compact"  # one of SPACINGS

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, not {self.spacing!r}")


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    pass


class _Refused(Exception):
    """A request answered with an error reply from deep inside its handling."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _error(status: int, message: str, *, kind: str = "ERROR", key: str = "error") -> Reply:
    request_id = uuid.uuid4().hex
    body = {"status": kind, "request_id": request_id, key: message}
    return Reply(status, json.dumps(body).encode(), _headers(request_id))


def _not_authorized(message: str) -> Reply:
    return _error(403, message, kind="NOT_AUTHORIZED", key="message")


def _headers(request_id: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Request-Id": request_id}


def _bool(raw: str | None, default: bool, name: str) -> bool:
    if raw is None:
        return default
    if raw.lower() not in ("true", "false"):
        raise BadRequest(f"Invalid value for '{name}': {raw!r}")
    return raw.lower() == "true"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# The simulator's history, as instants: a bound beyond these answers as if it were these.
_FIRST_MS = _ms(datetime(1969, 12, 31, tzinfo=UTC))
_LAST_MS = _ms(datetime(2101, 1, 2, tzinfo=UTC))


def _parse_bound(raw: str, zone: ZoneInfo, *, end: bool) -> int:
    """`YYYY-MM-DD` (the whole day in the market's zone) or a Unix ms timestamp."""
    if raw.isascii() and raw.isdigit():
        # Any ms beyond the simulator's history is its end (and int() refuses huge strings).
        return min(int(raw), _LAST_MS) if len(raw) <= 18 else _LAST_MS
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"Could not parse {raw!r}: expected YYYY-MM-DD or ms") from None
    day = min(max(day, synth.FIRST_DAY - timedelta(days=1)), synth.LAST_DAY)
    if end:
        day += timedelta(days=1)
    moment = datetime(day.year, day.month, day.day, tzinfo=zone)
    return _ms(moment) - (1 if end else 0)


def _years_before(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year - years)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year - years, day=28)


@dataclass(frozen=True)
class _Paging:
    """What a page request asks beyond its path: from the query, or from a `next_url` cursor
    (which, as the provider's, carries these and leaves the position to the path)."""

    adjusted: bool
    sort: str
    limit: int

    @classmethod
    def of(cls, query: dict[str, str]) -> _Paging:
        if "cursor" in query:
            return cls.from_cursor(query["cursor"])
        sort = query.get("sort", "asc")
        if sort not in ("asc", "desc"):
            raise BadRequest(f"Invalid value for 'sort': {sort!r}")
        try:
            limit = min(MAX_LIMIT, int(query.get("limit", DEFAULT_LIMIT)))
        except ValueError:
            raise BadRequest(f"Invalid value for 'limit': {query['limit']!r}") from None
        if limit < 1:
            raise BadRequest("limit must be positive")
        return cls(_bool(query.get("adjusted"), True, "adjusted"), sort, limit)

    def cursor(self) -> str:
        state = {"a": self.adjusted, "s": self.sort, "l": self.limit}
        return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, raw: str) -> _Paging:
        try:
            state = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            paging = cls(bool(state["a"]), str(state["s"]), int(state["l"]))
        except (ValueError, KeyError, TypeError):
            raise BadRequest("Invalid cursor") from None
        if paging.sort not in ("asc", "desc") or not 1 <= paging.limit <= MAX_LIMIT:
            raise BadRequest("Invalid cursor")
        return paging

    @property
    def descending(self) -> bool:
        return self.sort == "desc"


# -- timespans ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """A timespan with its multiplier: which base bars it is built from, how they fall into
    its windows, and where each window starts."""

    timespan: str
    multiplier: int
    market: Market

    @property
    def base(self) -> str:
        return SUPPORTED_TIMESPANS[self.timespan]

    @property
    def base_ms(self) -> int:
        return synth.DAY_MS if self.base == "day" else synth.MINUTE_MS

    @property
    def is_base(self) -> bool:
        """One base bar per window: the bars are served as they are."""
        return self.timespan == self.base and self.multiplier == 1

    def base_starts(self, ticker: str, first: date, last: date) -> np.ndarray:
        if self.base == "day":
            return synth.daily_starts(ticker, first, last)
        return synth.minute_starts(ticker, first, last)

    def buckets(self, starts: np.ndarray) -> np.ndarray:
        """The window (an increasing id) of each base bar."""
        multiplier = min(self.multiplier, _MAX_MULTIPLIER)
        if self.base == "minute":
            unit = synth.HOUR_MS if self.timespan == "hour" else synth.MINUTE_MS
            return starts // (unit * multiplier)
        # A daily bar starts at midnight in its zone; +12 h lands on its date in UTC.
        day = (starts + synth.DAY_MS // 2) // synth.DAY_MS
        if self.timespan == "day":
            return day // multiplier
        if self.timespan == "week":
            return (day + 4) // 7 // multiplier  # weeks from Sunday; 1970-01-04 was one
        month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
        if self.timespan == "month":
            return month // multiplier
        if self.timespan == "quarter":
            return month // (3 * multiplier)
        return month // 12 // multiplier  # year

    def window_starts(self, buckets: np.ndarray) -> np.ndarray:
        multiplier = min(self.multiplier, _MAX_MULTIPLIER)
        if self.base == "minute":
            unit = synth.HOUR_MS if self.timespan == "hour" else synth.MINUTE_MS
            return buckets * unit * multiplier
        if self.timespan == "day":
            first_day = buckets * multiplier
        elif self.timespan == "week":
            first_day = buckets * multiplier * 7 - 4
        else:
            months = {"month": 1, "quarter": 3, "year": 12}[self.timespan] * multiplier
            first_month = (buckets * months).astype("datetime64[M]")
            first_day = first_month.astype("datetime64[D]").astype(np.int64)
        return synth.local_midnights_ms(first_day, self.market)


def _aggregate(columns: dict[str, np.ndarray], span: _Span) -> dict[str, np.ndarray]:
    """One bar per window from ascending base bars (whole windows, as pages hold)."""
    if span.is_base or not len(columns["t"]):
        return columns
    bucket = span.buckets(columns["t"])
    at = np.flatnonzero(np.diff(bucket, prepend=bucket[0] - 1))
    ends = np.append(at[1:], len(bucket))
    volume = np.add.reduceat(columns["v"], at)
    weighted = np.add.reduceat(columns["vw"] * columns["v"], at)
    with np.errstate(invalid="ignore", divide="ignore"):
        vwap = np.where(volume > 0, np.round(weighted / volume, 4), columns["vw"][at])
    return {
        "v": volume,
        "vw": vwap,
        "o": columns["o"][at],
        "c": columns["c"][ends - 1],
        "h": np.maximum.reduceat(columns["h"], at),
        "l": np.minimum.reduceat(columns["l"], at),
        "t": span.window_starts(bucket[at]),
        "n": np.add.reduceat(columns["n"], at),
    }


# -- pages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    starts: np.ndarray  # the page's base bars, ascending
    next_edge: int | None  # first base bar of the next page (descending: its last)


def _gather(
    ticker: str, span: _Span, lo_ms: int, hi_ms: int, limit: int, descending: bool
) -> tuple[np.ndarray, bool]:
    """Base-bar starts in [lo_ms, hi_ms] from the page's edge, a chunk of days at a time,
    until there are more than `limit` or the range ends (then `exhausted` is True)."""
    lo_day, hi_day = synth.day_range(lo_ms, hi_ms, ticker)
    per_day = synth.bars_per_day(ticker, span.base_ms)
    chunks: list[np.ndarray] = []
    total = 0
    while lo_day <= hi_day and total <= limit:
        days = timedelta(days=max(2, math.ceil((limit + 1 - total) / per_day * 1.25)))
        if descending:
            first, last = max(lo_day, hi_day - days), hi_day
            hi_day = first - timedelta(days=1)
        else:
            first, last = lo_day, min(hi_day, lo_day + days)
            lo_day = last + timedelta(days=1)
        starts = span.base_starts(ticker, first, last)
        chunks.append(starts[(starts >= lo_ms) & (starts <= hi_ms)])
        total += len(chunks[-1])
    if descending:
        chunks.reverse()
    starts = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    return starts, lo_day > hi_day


def _select(
    ticker: str, span: _Span, lo_ms: int, hi_ms: int, limit: int, descending: bool
) -> _Selection:
    """One page's base bars: whole windows from the page's edge holding at most `limit` base
    bars (a window larger than `limit` is cut there: `limit` counts base bars)."""
    if lo_ms > hi_ms:
        return _Selection(np.empty(0, np.int64), None)
    starts, exhausted = _gather(ticker, span, lo_ms, hi_ms, limit, descending)
    if not len(starts):
        return _Selection(starts, None)
    ordered = starts[::-1] if descending else starts  # in the page's order
    bucket = span.buckets(ordered)
    # The last window gathered may go on past the gathered days, unless the range ended.
    complete = len(bucket) if exhausted else int(np.count_nonzero(bucket != bucket[-1]))
    taken = _whole_windows(bucket[:complete], limit) or min(limit, len(ordered))
    page, rest = ordered[:taken], ordered[taken:]
    if len(rest):
        next_edge: int | None = int(rest[0])
    elif exhausted:
        next_edge = None
    else:  # a window cut at `limit` exactly where the gathering stopped
        next_edge = int(page[-1]) + (-1 if descending else 1)
    return _Selection(page[::-1] if descending else page, next_edge)


def _whole_windows(bucket: np.ndarray, limit: int) -> int:
    """How many base bars the whole windows that fit in `limit` hold (0 if none fits).
    Windows are runs of equal ids."""
    if len(bucket) <= limit:
        return len(bucket)
    # The bar at `limit` is the first left out, and the rest of its window with it.
    return int(np.count_nonzero(bucket[:limit] != bucket[limit]))


# -- one aggregates request -------------------------------------------------------------------


@dataclass(frozen=True)
class _AggsRequest:
    ticker: str
    multiplier: int
    timespan: str
    raw_from: str
    raw_to: str
    start_ms: int
    end_ms: int
    paging: _Paging
    followed: bool  # asked through a `next_url` (its cursor)

    @classmethod
    def parse(cls, params: dict[str, str], query: dict[str, str]) -> _AggsRequest:
        ticker, timespan = params["ticker"], params["timespan"]
        try:
            multiplier = int(params["multiplier"])
        except ValueError:
            raise BadRequest(f"Invalid multiplier: {params['multiplier']!r}") from None
        if multiplier < 1:
            raise BadRequest("multiplier must be a positive integer")
        if timespan not in TIMESPANS:
            raise BadRequest(f"Invalid timespan: {timespan!r}")
        paging = _Paging.of(query)
        zone = Market.of_provider_ticker(ticker).zone
        start_ms = _parse_bound(params["start"], zone, end=False)
        end_ms = _parse_bound(params["end"], zone, end=True)
        raw_from, raw_to = params["start"], params["end"]
        followed = "cursor" in query
        return cls(
            ticker, multiplier, timespan, raw_from, raw_to, start_ms, end_ms, paging, followed
        )

    @property
    def span(self) -> _Span:
        return _Span(self.timespan, self.multiplier, Market.of_provider_ticker(self.ticker))

    def target(self, start: str | None = None, end: str | None = None) -> str:
        """Path and query of this request (or of its next page, from `start` or to `end`), as
        the simulator writes them in `next_url`s and keys its per-page state by them."""
        ticker = quote(self.ticker, safe=":.")
        start, end = quote(start or self.raw_from), quote(end or self.raw_to)
        path = f"/v2/aggs/ticker/{ticker}/range/{self.multiplier}/{self.timespan}/{start}/{end}"
        return f"{path}?cursor={self.paging.cursor()}"

    def next_target(self, edge: int | None) -> str | None:
        if edge is None:
            return None
        if self.paging.descending:
            return self.target(end=str(edge))
        return self.target(start=str(edge))


# -- misbehaving pages ------------------------------------------------------------------------


def _rows(columns: dict[str, np.ndarray]) -> list[dict[str, object]]:
    names = list(columns)
    values = zip(*(column.tolist() for column in columns.values()), strict=True)
    return [dict(zip(names, row, strict=True)) for row in values]


def _every(i: int, n: int) -> bool:
    """Whether the bar at index i is an n-th bar (n, 2n, ... counting from 1)."""
    return n > 0 and i % n == n - 1


def _break_bars(results: list[dict[str, object]], faults: Faults) -> None:
    for i, bar in enumerate(results):
        if _every(i, faults.bad_ohlc_every):
            bar["h"] = round(float(bar["l"]) * 0.9, 4)  # type: ignore[arg-type]
        if faults.repeat_timestamp_every and i and i % faults.repeat_timestamp_every == 0:
            bar["t"] = results[i - 1]["t"]
        if _every(i, faults.spike_every):
            bar["v"] = float(bar["v"]) * 200  # type: ignore[arg-type]
        if _every(i, faults.wrong_types_every):
            bar["o"] = True
        if _every(i, faults.boolean_every):
            bar["o"] = True
        if i and _every(i - 1, faults.wrong_types_every):
            bar["n"] = 100_000_000_000_000_000_000  # beyond int64


def _hold_back(results: list[dict[str, object]], every: int) -> tuple[list, list]:
    """(bars served now, every n-th bar held back for the next page)."""
    kept = [bar for i, bar in enumerate(results) if not _every(i, every)]
    held = [bar for i, bar in enumerate(results) if _every(i, every)]
    return kept, held


def _reorder(results: list[dict[str, object]], order: str) -> list[dict[str, object]]:
    if order == "desc":
        return sorted(results, key=lambda bar: int(bar["t"]), reverse=True)  # type: ignore[call-overload]
    if order == "shuffled" and results:
        # Seeded by the page's first bar: the same page is shuffled the same way every time.
        seed = int(results[0]["t"])  # type: ignore[call-overload]
        return [results[i] for i in np.random.default_rng(seed).permutation(len(results))]
    return results


_PAGE_FAULTS = (
    "bad_ohlc_every",
    "repeat_timestamp_every",
    "spike_every",
    "wrong_types_every",
    "boolean_every",
    "late_every",
    "repeat_cursor",
)


def _breaks_pages(faults: Faults) -> bool:
    return faults.order != "asc" or any(getattr(faults, name) for name in _PAGE_FAULTS)


# One bar as json.dumps writes it (floats by repr, as json does): twice as fast for big pages.
_RESULT = '{"v":%r,"vw":%r,"o":%r,"c":%r,"h":%r,"l":%r,"t":%d,"n":%d}'
_FIELDS = ("v", "vw", "o", "c", "h", "l", "t", "n")


def _results_json(columns: dict[str, np.ndarray]) -> str:
    rows = zip(*(columns[name].tolist() for name in _FIELDS), strict=True)
    return "[" + ",".join([_RESULT % row for row in rows]) + "]"


def _compact(body: dict[str, object]) -> str:
    return json.dumps(body, separators=(",", ":"))


def _spaced(body: bytes, spacing: str) -> bytes:
    """The same JSON, spaced as asked: valid either way, only whitespace differs."""
    if spacing == "pretty":
        return json.dumps(json.loads(body), indent=2).encode()
    if spacing == "odd":
        odd = json.dumps(json.loads(body), indent="\t", separators=(" ,\r\n ", " \n:\t"))
        return f"\r\n {odd}\n\t".encode()
    return body


def _request_id(body: bytes) -> str:
    match = re.search(rb'"request_id":"([0-9a-f]+)"', body)
    return match.group(1).decode() if match else uuid.uuid4().hex


def _presented_key(headers: dict[str, str], query: dict[str, str]) -> str | None:
    bearer = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
    return bearer.removeprefix("Bearer ").strip() if bearer else query.get("apiKey")


def _failure(faults: Faults, presented: str | None) -> Reply | None:
    """The injected fault that answers this request instead of its data, if any."""
    if faults.delay_seconds:
        time.sleep(faults.delay_seconds)
    if faults.not_authorized:
        return _not_authorized(_NOT_ENTITLED)
    if faults.rate_limited:
        return _rate_limited(faults.retry_after)
    if faults.server_errors:
        return _error(502, "Bad gateway (simulated)")
    if faults.echo_key:
        # A misconfigured gateway that reflects the credentials: the client must not log it.
        key = presented or "none"
        return _error(
            502, f"upstream rejected request with Authorization: Bearer {key} (apiKey={key})"
        )
    return None


def _rate_limited(retry_after: int) -> Reply:
    reply = _error(429, _RATE_LIMITED)
    reply.headers["Retry-After"] = str(retry_after)
    return reply


class _RequestWindow:
    """Requests admitted per key within the last minute of real (monotonic) time."""

    def __init__(self, limit: int, seconds: float = 60.0) -> None:
        self.limit = limit
        self.seconds = seconds
        self._admitted: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> float | None:
        """None when the request is admitted (and counted), else seconds until a slot frees."""
        with self._lock:
            now = time.monotonic()
            admitted = self._admitted.setdefault(key, deque())
            while admitted and admitted[0] <= now - self.seconds:
                admitted.popleft()
            if len(admitted) < self.limit:
                admitted.append(now)
                return None
            return admitted[0] + self.seconds - now


# -- the simulator ----------------------------------------------------------------------------


class Simulator:
    """State of one simulated Polygon: clock, plan, revisions, faults, request log, pages."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str = "http://polygon-simulator.invalid",
        cache_pages: int = 0,
        now: datetime | None = None,
        plan: str | None = None,
        plan_window_seconds: float = 60.0,
        listed: Iterable[str] = (),
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.now = now
        self.plan = plan
        self.revisions = synth.Revisions()
        self._faults: dict[str | None, Faults] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_pages = cache_pages
        self._held: OrderedDict[str, list[dict[str, object]]] = OrderedDict()
        # The free plan's requests per minute; tests shrink the minute to keep runs short.
        self._window = _RequestWindow(FREE_REQUESTS_PER_MINUTE, plan_window_seconds)
        self.requests: list[str] = []  # the latest paths with query, in arrival order
        # The tickers the grouped daily endpoint lists (the real one lists about 10,000): the
        # default symbols, `listed`, and every ticker asked for by range.
        self.listed: dict[str, None] = dict.fromkeys(
            [*(s.asset_class.market.provider_ticker(s.symbol) for s in DEFAULT_SYMBOLS), *listed]
        )

    # -- configuration -------------------------------------------------------------------

    @property
    def now(self) -> datetime | None:
        """The simulator's clock: no bar starting after it is served. None: the real clock."""
        return self._now

    @now.setter
    def now(self, value: datetime | None) -> None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("the simulator's clock needs a timezone-aware datetime")
        self._now = value

    @property
    def plan(self) -> str | None:
        """ "free" (5 requests a minute per key, 2 years of history), or None / "unlimited"."""
        return self._plan

    @plan.setter
    def plan(self, value: str | None) -> None:
        if value is not None and value not in PLANS:
            raise ValueError(f"unknown plan {value!r}: expected one of {', '.join(PLANS)}")
        self._plan = value

    def inject(self, faults: Faults, ticker: str | None = None) -> None:
        """Inject faults for one Polygon ticker, or for every request when ticker is None."""
        with self._lock:
            self._faults[ticker] = faults
            self._held.clear()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._held.clear()

    def split(self, ticker: str, effective: date, ratio: float) -> None:
        """A split of `ticker` executing on `effective` (4.0 for 4:1): the splits reference
        lists it, and adjusted bars before that day are divided by the ratio."""
        if not ratio > 0:
            raise ValueError(f"a split's ratio is positive, not {ratio}")
        with self._lock:
            self.revisions.split(ticker, effective, ratio)
            self._cache.clear()

    def withdraw_split(self, ticker: str, effective: date) -> None:
        """The provider withdraws a split it listed: history is as if it never happened."""
        with self._lock:
            kept = [s for s in self.revisions.splits.get(ticker, []) if s.effective != effective]
            self.revisions.splits[ticker] = kept
            self._cache.clear()

    def expected_bars(
        self,
        ticker: str,
        timespan: str,
        first: date,
        last: date,
        *,
        adjusted: bool = True,
        multiplier: int = 1,
    ) -> dict[str, np.ndarray]:
        """The bars a fault-free fetch of [first, last] returns now, for tests: nothing after
        the clock, nothing when the plan refuses the range."""
        if timespan not in SUPPORTED_TIMESPANS:
            raise ValueError(f"the simulator does not serve {timespan!r} bars")
        span = _Span(timespan, multiplier, Market.of_provider_ticker(ticker))
        start_ms = _parse_bound(first.isoformat(), span.market.zone, end=False)
        end_ms = min(_parse_bound(last.isoformat(), span.market.zone, end=True), self._now_ms())
        starts = np.empty(0, np.int64)
        if start_ms <= end_ms and not self._outside_plan(start_ms):
            starts = span.base_starts(ticker, *synth.day_range(start_ms, end_ms, ticker))
            starts = starts[(starts >= start_ms) & (starts <= end_ms)]
        columns = synth.bars(ticker, starts, span.base_ms, self.revisions, adjusted=adjusted)
        return _aggregate(columns, span)

    # -- transports ---------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        """An httpx transport that answers in process, without a socket."""

        def handler(request: httpx.Request) -> httpx.Response:
            reply = self.handle(request.url.raw_path.decode(), dict(request.headers))
            return httpx.Response(reply.status, content=reply.body, headers=reply.headers)

        return httpx.MockTransport(handler)

    # -- request handling ----------------------------------------------------------------

    def handle(self, raw_path: str, headers: dict[str, str]) -> Reply:
        """The reply to one request, every one saying that it comes from the simulator: a
        client then knows its bars are synthetic, whatever its base URL says."""
        reply = self._answer(raw_path, headers)
        reply.headers[SIMULATOR_HEADER] = "1"
        return reply

    def _answer(self, raw_path: str, headers: dict[str, str]) -> Reply:
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append(raw_path)
            del self.requests[:-REQUEST_LOG_SIZE]
        presented = _presented_key(headers, query)
        refused = self._check_auth(presented) or self._check_rate(presented)
        if refused:
            return refused
        # Path segments are matched first, then decoded: `X%3ABTCUSD` is `X:BTCUSD`.
        aggs, grouped = _AGGS.match(parts.path), _GROUPED.match(parts.path)
        params = {k: unquote(v) for k, v in (aggs.groupdict() if aggs else {}).items()}
        faults = self._take_faults(params.get("ticker") or query.get("ticker"))
        failure = _failure(faults, presented)
        if failure:
            return failure
        try:
            if aggs:
                body = self._aggregates(params, query, faults)
            elif grouped:
                body = self._grouped(grouped, query, faults)
            elif parts.path == _SPLITS:
                body = self._splits(query)
            else:
                return _error(404, f"Not found: {parts.path}")
        except BadRequest as error:
            return _error(400, str(error))
        except _Refused as refusal:
            return refusal.reply
        request_id = _request_id(body)
        body = _spaced(body, faults.spacing)
        if faults.truncated:
            body = body[: max(1, len(body) // 2)]
        return Reply(200, body, _headers(request_id))

    def _check_auth(self, presented: str | None) -> Reply | None:
        if self.api_key is None:
            return None
        if not presented:
            return _error(401, "API Key was not provided")
        if presented != self.api_key:
            return _error(401, "Unknown API Key")
        return None

    def _check_rate(self, presented: str | None) -> Reply | None:
        """The free plan's requests per minute, counted per key across all connections."""
        if self.plan != "free":
            return None
        wait = self._window.admit(presented or "anonymous")
        if wait is None:
            return None
        return _rate_limited(max(1, math.ceil(wait)))

    def _now_ms(self) -> int:
        return _ms(self._now or datetime.now(UTC))

    def _outside_plan(self, start_ms: int) -> bool:
        if self.plan != "free":
            return False
        earliest = _years_before(self._now or datetime.now(UTC), FREE_HISTORY_YEARS)
        return start_ms < _ms(earliest)

    def _check_history(self, start_ms: int) -> None:
        if self._outside_plan(start_ms):
            raise _Refused(_not_authorized(_OUTSIDE_PLAN_TIMEFRAME))

    def _take_faults(self, ticker: str | None) -> Faults:
        """The faults for this request. Counted faults fire one per request, in the order
        429, 5xx, truncated body, empty results, and are used up as they fire."""
        with self._lock:
            key = ticker if ticker in self._faults else None
            faults = self._faults.get(key)
            if faults is None:
                return Faults()
            if faults.after_requests > 0:
                self._faults[key] = replace(faults, after_requests=faults.after_requests - 1)
                return Faults()
            silent: dict[str, Any] = {name: 0 for name in _COUNTED_FAULTS}
            for name in _COUNTED_FAULTS:
                left = getattr(faults, name)
                if left:
                    if left > 0:
                        self._faults[key] = replace(faults, **{name: left - 1})
                    return replace(faults, **{**silent, name: 1})
            return replace(faults, **silent)

    # -- aggregates ----------------------------------------------------------------------

    def _aggregates(self, params: dict[str, str], query: dict[str, str], faults: Faults) -> bytes:
        request = _AggsRequest.parse(params, query)
        self.listed.setdefault(request.ticker)
        if request.timespan not in SUPPORTED_TIMESPANS:  # seconds: not in the simulated plan
            raise _Refused(_not_authorized(_NOT_ENTITLED))
        self._check_history(request.start_ms)
        now_ms = self._now_ms()
        if faults.empty_results:
            return self._render(request, "[]", 0, None, None, faults)
        # A cached page is the answer only while nothing could change it: no fault, and a
        # range that ended before the clock (splits empty the cache).
        cacheable = self._cache_pages and faults == Faults() and request.end_ms <= now_ms
        cache_key = request.target()
        if cacheable:
            with self._lock:
                if cache_key in self._cache:
                    return self._cache[cache_key]
        rendered = self._page(request, min(request.end_ms, now_ms), faults)
        if cacheable:
            with self._lock:
                self._cache[cache_key] = rendered
                while len(self._cache) > self._cache_pages:
                    self._cache.popitem(last=False)
        return rendered

    def _page(self, request: _AggsRequest, end_ms: int, faults: Faults) -> bytes:
        """One page of the range: whole windows up to `limit` base bars from its edge."""
        span, paging = request.span, request.paging
        selection = _select(
            request.ticker,
            span,
            max(request.start_ms, _FIRST_MS),
            end_ms,
            paging.limit,
            paging.descending,
        )
        columns = synth.bars(
            request.ticker, selection.starts, span.base_ms, self.revisions, adjusted=paging.adjusted
        )
        columns = _aggregate(columns, span)
        if paging.descending:
            columns = {name: column[::-1] for name, column in columns.items()}
        next_target = request.next_target(selection.next_edge)
        if not _breaks_pages(faults):
            results = _results_json(columns)
            return self._render(request, results, len(columns["t"]), selection, next_target, faults)
        rows, next_target = self._misbehave(request, _rows(columns), next_target, faults)
        results = json.dumps(rows, separators=(",", ":"))
        return self._render(request, results, len(rows), selection, next_target, faults)

    def _misbehave(
        self,
        request: _AggsRequest,
        results: list[dict[str, object]],
        next_target: str | None,
        faults: Faults,
    ) -> tuple[list[dict[str, object]], str | None]:
        """The page's results and next page as the injected faults have them."""
        _break_bars(results, faults)
        if faults.late_every:
            kept, held = _hold_back(results, faults.late_every)
            with self._lock:
                arrived = self._held.get(request.target(), []) if request.followed else []
                if next_target:
                    self._held[next_target] = held
                    while len(self._held) > HELD_PAGES:
                        self._held.popitem(last=False)
            # The last page has no next one: its late bars come at its end.
            results = arrived + kept + ([] if next_target else held)
        if faults.repeat_cursor and request.followed:
            next_target = request.target()  # the cursor it came with: it never advances
        return _reorder(results, faults.order), next_target

    def _render(
        self,
        request: _AggsRequest,
        results: str,
        count: int,
        selection: _Selection | None,
        next_target: str | None,
        faults: Faults,
    ) -> bytes:
        """The body, fields in the provider's order, `results` (JSON text) only if any."""
        head = {
            "ticker": request.ticker,
            "queryCount": len(selection.starts) if selection else 0,
            "resultsCount": count,
            "adjusted": request.paging.adjusted,
        }
        tail: dict[str, object] = {
            "status": "DELAYED" if faults.delayed else "OK",
            "request_id": uuid.uuid4().hex,
            "count": count,
        }
        if next_target:
            tail["next_url"] = f"{self.base_url}{next_target}"
        body = _compact(head)[:-1]
        if count:
            body += f',"results":{results}'
        return f"{body},{_compact(tail)[1:]}".encode()

    # -- splits reference ----------------------------------------------------------------

    def _splits(self, query: dict[str, str]) -> bytes:
        """`/v3/reference/splits`: the splits of `ticker` (or of every ticker), newest first
        by default, `limit` a page (10 by default, at most 1000), paged by `next_url`."""
        try:
            limit = int(query.get("limit", "10"))
            offset = (
                int(base64.urlsafe_b64decode(query["cursor"]).decode()) if "cursor" in query else 0
            )
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"Invalid limit or cursor: {error}") from None
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        wanted = query.get("ticker")
        with self._lock:
            listed = [
                (ticker, split)
                for ticker, splits in sorted(self.revisions.splits.items())
                if wanted in (None, ticker)
                for split in splits
            ]
        listed.sort(key=lambda item: item[1].effective, reverse=query.get("order") != "asc")
        page = listed[offset : offset + limit]
        body: dict[str, object] = {
            "results": [_split_record(ticker, split) for ticker, split in page],
            "status": "OK",
            "request_id": uuid.uuid4().hex,
        }
        if offset + limit < len(listed):
            cursor = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
            rest = {k: v for k, v in query.items() if k != "cursor"}
            body["next_url"] = f"{self.base_url}{_SPLITS}?{urlencode({**rest, 'cursor': cursor})}"
        return _compact(body).encode()

    # -- grouped daily -------------------------------------------------------------------

    def _grouped(self, match: re.Match[str], query: dict[str, str], faults: Faults) -> bytes:
        raw_day = unquote(match.group("day"))
        try:
            day = date.fromisoformat(raw_day)
        except ValueError:
            raise BadRequest(f"Invalid date: {raw_day!r}") from None
        adjusted = _bool(query.get("adjusted"), True, "adjusted")
        market = Market.CRYPTO if match.group("crypto") else Market.STOCK
        self._check_history(_parse_bound(raw_day, market.zone, end=False))
        tickers = [
            t
            for t in list(self.listed)
            if Market.of_provider_ticker(t) is market and not faults.empty_results
        ]
        # Per the provider's spec (and its recorded answers), grouped stock bars are stamped
        # at the end of their window, 16:00 New York; crypto bars at the start of their day.
        stamp_ms = 16 * 3_600_000 if market is Market.STOCK else 0
        now_ms = self._now_ms()
        results = []
        for ticker in tickers:
            starts = synth.daily_starts(ticker, day, day)
            starts = starts[starts <= now_ms]
            if len(starts):
                columns = synth.bars(
                    ticker, starts, synth.DAY_MS, self.revisions, adjusted=adjusted
                )
                bar = _rows(columns)[0]
                results.append({"T": ticker, **bar, "t": int(bar["t"]) + stamp_ms})  # type: ignore[call-overload]
        body: dict[str, object] = {
            "queryCount": len(results),
            "resultsCount": len(results),
            "adjusted": adjusted,
        }
        if results:
            body["results"] = results
        body["status"] = "DELAYED" if faults.delayed else "OK"
        body.update({"request_id": uuid.uuid4().hex, "count": len(results)})
        return _compact(body).encode()


def _split_record(ticker: str, split: synth.Split) -> dict[str, object]:
    """A split as the provider lists it: 4.0 is 1 -> 4, 0.25 (a reverse split) is 4 -> 1."""
    split_from, split_to = (1.0, split.ratio) if split.ratio >= 1 else (1 / split.ratio, 1.0)
    digest = hashlib.sha256(f"{ticker}|{split.effective}|{split.ratio}".encode()).hexdigest()
    return {
        "execution_date": split.effective.isoformat(),
        "id": f"E{digest[:63]}",
        "split_from": split_from,
        "split_to": split_to,
        "ticker": ticker,
    }


class _Handler(BaseHTTPRequestHandler):
    server: SimulatorHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        reply = self.server.simulator.handle(self.path, dict(self.headers.items()))
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        # A client that gave up (a timeout under test) has nothing left to be told.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: object) -> None:
        return  # the request log is Simulator.requests; stderr stays quiet


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, simulator: Simulator, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)
        self.simulator = simulator

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


def serve(simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> SimulatorHTTPServer:
    """Serve on a real socket in a background thread; `server.shutdown()` stops it."""
    server = SimulatorHTTPServer(simulator, host, port)
    simulator.base_url = server.url
    threading.Thread(target=server.serve_forever, name="polygon-simulator", daemon=True).start()
    return server
