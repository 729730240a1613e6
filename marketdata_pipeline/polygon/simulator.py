"""A Polygon-compatible aggregates server with synthetic bars and fault injection.

Same paths, parameters, response fields, `limit` semantics (base bars), `next_url` cursor
pagination, status codes and error bodies as Polygon's aggregates API
(`openapi-aggregates.json`), with Bearer or `apiKey` auth. Runs in process as an httpx
transport (`Simulator.transport()`) or on a real socket (`serve`, `marketdata simulator`).
Its bars are synthetic and deterministic (see `synthetic_bars`); never mix them with real data.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import httpx
import numpy as np

from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.domain import Market
from marketdata_pipeline.polygon import synthetic_bars as synth
from marketdata_pipeline.polygon.client import MAX_LIMIT

DEFAULT_LIMIT = 5_000
REQUEST_LOG_SIZE = 10_000  # a long-running simulator keeps only the latest requests
TIMESPANS = ("second", "minute", "hour", "day", "week", "month", "quarter", "year")
SUPPORTED_TIMESPANS = {"minute": synth.MINUTE_MS, "hour": 3_600_000, "day": synth.DAY_MS}
_AGGS = re.compile(
    r"^/v2/aggs/ticker/(?P<ticker>[^/]+)/range/(?P<multiplier>[^/]+)/(?P<timespan>[^/]+)"
    r"/(?P<start>[^/]+)/(?P<end>[^/]+)$"
)
_GROUPED = re.compile(
    r"^/v2/aggs/grouped/locale/(?:us/market/(?P<stocks>stocks)|global/market/(?P<crypto>crypto))"
    r"/(?P<day>[^/]+)$"
)
_COUNTED_FAULTS = ("rate_limited", "server_errors", "truncated")


@dataclass(frozen=True)
class Faults:
    """Faults to inject. Counts apply to the next N requests; -1 means every request."""

    rate_limited: int = 0
    retry_after: int = 1
    server_errors: int = 0
    delay_seconds: float = 0.0
    truncated: int = 0
    not_authorized: bool = False
    after_requests: int = 0  # the faults begin after this many requests (mid-pagination)
    bad_ohlc_every: int = 0  # every n-th bar has its high below its low
    repeat_timestamp_every: int = 0  # every n-th bar repeats the previous bar's timestamp


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    pass


def _error(status: int, message: str, *, kind: str = "ERROR", key: str = "error") -> Reply:
    request_id = uuid.uuid4().hex
    body = {"status": kind, "request_id": request_id, key: message}
    return Reply(status, json.dumps(body).encode(), _headers(request_id))


def _headers(request_id: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Request-Id": request_id}


def _parse_bound(raw: str, zone: ZoneInfo, *, end: bool) -> int:
    """`YYYY-MM-DD` (the whole day in the market's zone) or a Unix ms timestamp."""
    if raw.isdigit():
        return int(raw)
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"Could not parse {raw!r}: expected YYYY-MM-DD or ms") from None
    if end:
        day += timedelta(days=1)
    moment = datetime(day.year, day.month, day.day, tzinfo=zone)
    return int(moment.timestamp() * 1000) - (1 if end else 0)


def _bool(raw: str | None, default: bool, name: str) -> bool:
    if raw is None:
        return default
    if raw.lower() not in ("true", "false"):
        raise BadRequest(f"Invalid value for '{name}': {raw!r}")
    return raw.lower() == "true"


@dataclass(frozen=True)
class _Paging:
    """What a page request asks: from the query's parameters, or from a `next_url` cursor."""

    adjusted: bool
    sort: str
    limit: int
    offset: int = 0

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
        state = {"a": self.adjusted, "s": self.sort, "l": self.limit, "o": self.offset}
        return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")

    @classmethod
    def from_cursor(cls, raw: str) -> _Paging:
        try:
            state = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            return cls(bool(state["a"]), str(state["s"]), int(state["l"]), int(state["o"]))
        except (ValueError, KeyError, TypeError):
            raise BadRequest("Invalid cursor") from None


class Simulator:
    """State of one simulated Polygon: revisions, faults, request log, page cache."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str = "http://polygon-simulator.invalid",
        cache_pages: int = 0,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.revisions = synth.Revisions()
        self._faults: dict[str | None, Faults] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_pages = cache_pages
        self._last_range: tuple[tuple, tuple] | None = None
        self.requests: list[str] = []  # the latest paths with query, in arrival order

    # -- configuration -------------------------------------------------------------------

    def inject(self, faults: Faults, ticker: str | None = None) -> None:
        """Inject faults for one Polygon ticker, or for every request when ticker is None."""
        with self._lock:
            self._faults[ticker] = faults

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def split(self, ticker: str, effective: date, ratio: float) -> None:
        """Revise history: adjusted bars of `ticker` before `effective` are divided by ratio."""
        with self._lock:
            self.revisions.split(ticker, effective, ratio)
            self._cache.clear()
            self._last_range = None

    def expected_bars(
        self, ticker: str, timespan: str, first: date, last: date, *, adjusted: bool = True
    ) -> dict[str, np.ndarray]:
        """The bars a fault-free fetch of [first, last] returns (multiplier 1), for tests."""
        starts = self._base_starts(ticker, timespan, first, last)
        return synth.bars(
            ticker, starts, SUPPORTED_TIMESPANS[timespan], self.revisions, adjusted=adjusted
        )

    # -- transports ---------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        """An httpx transport that answers in process, without a socket."""

        def handler(request: httpx.Request) -> httpx.Response:
            reply = self.handle(request.url.raw_path.decode(), dict(request.headers))
            return httpx.Response(reply.status, content=reply.body, headers=reply.headers)

        return httpx.MockTransport(handler)

    # -- request handling ----------------------------------------------------------------

    def handle(self, raw_path: str, headers: dict[str, str]) -> Reply:
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append(raw_path)
            del self.requests[:-REQUEST_LOG_SIZE]
        auth = self._check_auth(headers, query)
        if auth:
            return auth
        aggs, grouped = _AGGS.match(parts.path), _GROUPED.match(parts.path)
        ticker = aggs.group("ticker") if aggs else None
        faults = self._take_faults(ticker)
        if faults.delay_seconds:
            time.sleep(faults.delay_seconds)
        if faults.not_authorized:
            return _error(
                403,
                "You are not entitled to this data. Please upgrade your plan at "
                "https://polygon.io/pricing",
                kind="NOT_AUTHORIZED",
                key="message",
            )
        if faults.rate_limited:
            reply = _error(
                429,
                "You've exceeded the maximum requests per minute, please wait or upgrade your "
                "subscription to continue. https://polygon.io/pricing",
            )
            reply.headers["Retry-After"] = str(faults.retry_after)
            return reply
        if faults.server_errors:
            return _error(502, "Bad gateway (simulated)")
        try:
            if aggs:
                body = self._aggregates(aggs.groupdict(), query, faults)
            elif grouped:
                body = self._grouped(grouped, query)
            else:
                return _error(404, f"Not found: {parts.path}")
        except BadRequest as error:
            return _error(400, str(error))
        request_id = _request_id(body)
        if faults.truncated:
            body = body[: max(1, len(body) // 2)]
        return Reply(200, body, _headers(request_id))

    def _check_auth(self, headers: dict[str, str], query: dict[str, str]) -> Reply | None:
        if self.api_key is None:
            return None
        bearer = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        presented = bearer.removeprefix("Bearer ").strip() if bearer else query.get("apiKey")
        if not presented:
            return _error(401, "API Key was not provided")
        if presented != self.api_key:
            return _error(401, "Unknown API Key")
        return None

    def _take_faults(self, ticker: str | None) -> Faults:
        """The faults for this request. Counted faults fire one per request, in the order
        429, 5xx, truncated body, and are used up as they fire."""
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

    def _base_starts(self, ticker: str, timespan: str, first: date, last: date) -> np.ndarray:
        if timespan == "day":
            return synth.daily_starts(ticker, first, last)
        return synth.minute_starts(ticker, first, last)

    def _range(
        self, ticker: str, timespan: str, multiplier: int, start: str, end: str, adjusted: bool
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Base bars of a request's whole range, with their buckets. Kept for the last range
        asked, so following `next_url` pages does not rebuild the range for every page."""
        key = (ticker, timespan, multiplier, start, end, adjusted)
        with self._lock:
            if self._last_range and self._last_range[0] == key:
                return self._last_range[1]
        zone = Market.of_provider_ticker(ticker).zone
        start_ms = _parse_bound(start, zone, end=False)
        end_ms = _parse_bound(end, zone, end=True)
        first, last = synth.day_range(start_ms, max(start_ms, end_ms), ticker)
        starts = self._base_starts(ticker, timespan, first, last)
        starts = starts[(starts >= start_ms) & (starts <= end_ms)]
        base_ms = synth.DAY_MS if timespan == "day" else synth.MINUTE_MS
        columns = synth.bars(ticker, starts, base_ms, self.revisions, adjusted=adjusted)
        bucket = _bucket_ids(starts, timespan, multiplier)
        _, first_index, counts = np.unique(bucket, return_index=True, return_counts=True)
        built = (columns, bucket, first_index, counts)
        with self._lock:
            self._last_range = (key, built)
        return built

    def _aggregates(self, params: dict[str, str], query: dict[str, str], faults: Faults) -> bytes:
        ticker, timespan = params["ticker"], params["timespan"]
        try:
            multiplier = int(params["multiplier"])
        except ValueError:
            raise BadRequest(f"Invalid multiplier: {params['multiplier']!r}") from None
        if multiplier < 1:
            raise BadRequest("multiplier must be a positive integer")
        if timespan not in TIMESPANS:
            raise BadRequest(f"Invalid timespan: {timespan!r}")
        if timespan not in SUPPORTED_TIMESPANS:
            raise BadRequest(f"timespan {timespan!r} is not served by the simulator")
        paging = _Paging.of(query)
        path = f"/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}"
        path += f"/{params['start']}/{params['end']}"
        cacheable = self._cache_pages and faults == Faults()
        cache_key = f"{path}|{paging}"
        if cacheable and cache_key in self._cache:
            return self._cache[cache_key]
        built = self._range(
            ticker, timespan, multiplier, params["start"], params["end"], paging.adjusted
        )
        rendered = self._page(ticker, path, paging, built, faults)
        if cacheable:
            with self._lock:
                self._cache[cache_key] = rendered
                while len(self._cache) > self._cache_pages:
                    self._cache.popitem(last=False)
        return rendered

    def _page(
        self,
        ticker: str,
        path: str,
        paging: _Paging,
        built: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray],
        faults: Faults,
    ) -> bytes:
        """One page of the range: whole buckets up to `limit` base bars from `offset`."""
        columns, bucket, first_index, counts = built
        if paging.sort == "desc":
            first_index, counts = first_index[::-1], counts[::-1]
        offset = paging.offset
        page_counts = np.cumsum(counts[offset:])
        taken = (
            max(1, int(np.searchsorted(page_counts, paging.limit, side="right")))
            if len(page_counts)
            else 0
        )
        base_count = int(page_counts[taken - 1]) if taken else 0
        results = _aggregate(columns, bucket, first_index[offset : offset + taken])
        _break_bars(results, faults)

        body: dict[str, object] = {
            "ticker": ticker,
            "queryCount": base_count,
            "resultsCount": len(results),
            "adjusted": paging.adjusted,
        }
        if results:
            body["results"] = results
        body.update({"status": "OK", "request_id": uuid.uuid4().hex, "count": len(results)})
        if offset + taken < len(counts):
            cursor = replace(paging, offset=offset + taken).cursor()
            body["next_url"] = f"{self.base_url}{path}?cursor={cursor}"
        return json.dumps(body, separators=(",", ":")).encode()

    def _grouped(self, match: re.Match[str], query: dict[str, str]) -> bytes:
        try:
            day = date.fromisoformat(match.group("day"))
        except ValueError:
            raise BadRequest(f"Invalid date: {match.group('day')!r}") from None
        adjusted = _bool(query.get("adjusted"), True, "adjusted")
        market = Market.CRYPTO if match.group("crypto") else Market.STOCK
        tickers = [
            market.provider_ticker(s.symbol)
            for s in DEFAULT_SYMBOLS
            if s.asset_class.market is market
        ]
        results = []
        for ticker in tickers:
            starts = synth.daily_starts(ticker, day, day)
            if len(starts):
                columns = synth.bars(
                    ticker, starts, synth.DAY_MS, self.revisions, adjusted=adjusted
                )
                results.append({"T": ticker, **_rows(columns)[0]})
        body: dict[str, object] = {
            "queryCount": len(results),
            "resultsCount": len(results),
            "adjusted": adjusted,
        }
        if results:
            body["results"] = results
        body.update({"status": "OK", "request_id": uuid.uuid4().hex, "count": len(results)})
        return json.dumps(body, separators=(",", ":")).encode()


def _bucket_ids(starts: np.ndarray, timespan: str, multiplier: int) -> np.ndarray:
    if timespan == "day":
        # A daily bar starts at midnight in its market's zone; +12h lands on its UTC date.
        return (starts + synth.DAY_MS // 2) // synth.DAY_MS // multiplier
    return starts // (SUPPORTED_TIMESPANS[timespan] * multiplier)


def _aggregate(
    columns: dict[str, np.ndarray], bucket: np.ndarray, bucket_starts: np.ndarray
) -> list[dict[str, object]]:
    """One bar per bucket, for the buckets starting at `bucket_starts` (base-bar indexes)."""
    if not len(bucket_starts):
        return []
    descending = bucket_starts[0] > bucket_starts[-1]
    starts = np.sort(bucket_starts)
    last = int(starts[-1])
    end = last + int(np.searchsorted(bucket[last:], bucket[last], side="right"))
    ends = np.append(starts[1:], end)
    at = starts - starts[0]
    window = slice(int(starts[0]), end)
    volume = np.add.reduceat(columns["v"][window], at)
    weighted = np.add.reduceat(columns["vw"][window] * columns["v"][window], at)
    with np.errstate(invalid="ignore", divide="ignore"):
        vwap = np.where(volume > 0, np.round(weighted / volume, 4), columns["vw"][starts])
    rows = _rows(
        {
            "v": volume,
            "vw": vwap,
            "o": columns["o"][starts],
            "c": columns["c"][ends - 1],
            "h": np.maximum.reduceat(columns["h"][window], at),
            "l": np.minimum.reduceat(columns["l"][window], at),
            "t": columns["t"][starts],
            "n": np.add.reduceat(columns["n"][window], at),
        }
    )
    return rows[::-1] if descending else rows


def _rows(columns: dict[str, np.ndarray]) -> list[dict[str, object]]:
    names = list(columns)
    values = zip(*(column.tolist() for column in columns.values()), strict=True)
    return [dict(zip(names, row, strict=True)) for row in values]


def _break_bars(results: list[dict[str, object]], faults: Faults) -> None:
    for i, bar in enumerate(results):
        if faults.bad_ohlc_every and i % faults.bad_ohlc_every == faults.bad_ohlc_every - 1:
            bar["h"] = round(float(bar["l"]) * 0.9, 4)  # type: ignore[arg-type]
        if faults.repeat_timestamp_every and i and i % faults.repeat_timestamp_every == 0:
            bar["t"] = results[i - 1]["t"]


def _request_id(body: bytes) -> str:
    match = re.search(rb'"request_id":"([0-9a-f]+)"', body)
    return match.group(1).decode() if match else uuid.uuid4().hex


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
