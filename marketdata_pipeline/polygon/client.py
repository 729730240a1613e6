"""Polygon aggregates client: paged, rate-limited, retried, typed, and silent about the key.

The key travels only in the `Authorization: Bearer` header. `next_url` is followed by its
path and query against the configured base URL, so the key never goes to a host the
operator did not configure, whatever a response says; and any text a response echoes back
is redacted before it can reach a message. Pagination is bounded: a cursor that repeats, or
more pages than the range can hold, stops the stream with the request id.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import polars as pl
import tenacity

from marketdata_pipeline.domain import BAR_SCHEMA, Market, Split, empty_bars
from marketdata_pipeline.errors import MarketdataError

log = logging.getLogger(__name__)

MAX_LIMIT = 50_000  # base bars per page, the provider's maximum
# The header the offline simulator sends with every response: its bars are synthetic.
SIMULATOR_HEADER = "X-Marketdata-Simulator"
SPLITS_LIMIT = 1000  # splits per page, the provider's maximum
MAX_SPLIT_PAGES = 20  # a ticker has a few splits: more pages than this is a runaway cursor
_WIRE_SCHEMA = {
    "t": pl.Int64(),
    "o": pl.Float64(),
    "h": pl.Float64(),
    "l": pl.Float64(),
    "c": pl.Float64(),
    "v": pl.Float64(),
    "vw": pl.Float64(),
    "n": pl.Int64(),
}
# The fast read takes `t` and `n` as floats: an Int64 read would truncate 1.5 to 1 and make an
# integer beyond int64 null, quietly; as floats both show (checked in `_integral`), and every
# integer that is exact in a float (below 2**53, every real `t` and `n`) is read exactly.
_ENVELOPE_SCHEMA = pl.Schema(
    {
        "ticker": pl.String(),
        "status": pl.String(),
        "adjusted": pl.Boolean(),
        "request_id": pl.String(),
        "next_url": pl.String(),
        "results": pl.List(pl.Struct(_WIRE_SCHEMA | {"t": pl.Float64(), "n": pl.Float64()})),
    }
)
_EXACT_INTEGER = 2**53
_WIRE_TO_BAR = {"t": "ts", "o": "open", "h": "high", "l": "low", "c": "close", "v": "volume"}
_WIRE_TO_BAR |= {"vw": "vwap", "n": "trades"}
_OK_STATUSES = ("OK", "DELAYED")
# The grouped daily endpoint: one day's bar of every ticker of a market, in one response.
_GROUPED_PATHS = {
    Market.STOCK: "/v2/aggs/grouped/locale/us/market/stocks",
    Market.CRYPTO: "/v2/aggs/grouped/locale/global/market/crypto",
}
# JSON's whitespace (RFC 8259): allowed around every token, and pretty-printed bodies have it.
_JSON_WHITESPACE = b" \t\n\r"
# String fields of an aggregates envelope: ticker, status, request_id, next_url.
_ENVELOPE_STRINGS = 4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 1.7976931348623157e308
# Base bars a day can hold per timespan, to bound the pages a range can need.
# (`limit` counts base bars: hour bars are built from minutes, day and longer from days).
_BARS_PER_DAY = {"second": 86_400, "minute": 1_440, "hour": 1_440}
_PLAN_LIMIT_WORDS = "plan doesn't include this data timeframe"
_REDACTED = "[redacted]"
_CREDENTIAL = re.compile(r"(?i)(bearer\s+|apikey=|api_key=|token=)[^\s&\"')]+")


class PolygonError(MarketdataError):
    """A Polygon request failed. Messages name the ticker, never the key."""


class PolygonAuthError(PolygonError):
    """401, 403 or NOT_AUTHORIZED: final, not retried."""


class PolygonResponseError(PolygonError):
    """A body that is not valid JSON or breaks the aggregates schema."""


class PolygonUnavailable(PolygonError):
    """429, 5xx or timeouts that outlasted the retry budget."""


class PolygonPlanLimit(PolygonError):
    """The plan does not cover the range asked (too old): final, not retried."""


class RequestLimiter(Protocol):
    """Waits until one more request fits the key's rate limit."""

    def acquire(self) -> None: ...

    def close(self) -> None: ...


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    """One decoded response page."""

    frame: pl.DataFrame  # BAR_SCHEMA, plus `defects` (list[str]) when a value was malformed
    request_id: str
    ticker: str
    next_url: str | None = None
    received_at: datetime | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    max_total_seconds: float = 120.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0


def decode_page(
    content: bytes, *, ticker: str, adjusted: bool, request_id: str | None = None
) -> Page:
    """Decode one aggregates response body into a typed frame, checking what it claims.

    Polars parses the body straight into typed columns (about twice as fast as json.loads
    and building a frame). A body it refuses, or one with a value of another type in a
    numeric field, is read again value by value: such a value is never coerced, its bar gets
    a `defects` entry naming it, and validation quarantines the bar. `request_id` (the
    X-Request-Id header) names the response when the body cannot.
    """
    parsed, fast = None, None
    if not _suspect(content):
        # A body polars refuses is read below, value by value, to name what is wrong.
        with contextlib.suppress(pl.exceptions.PolarsError):
            parsed = pl.read_json(io.BytesIO(content), schema=_ENVELOPE_SCHEMA)
    if parsed is not None and parsed.height == 1:
        fast = _fast_bars(parsed)
        if fast is None:  # a `t` or `n` that is not an integer: named below
            parsed = None
    if parsed is not None:
        envelope = parsed.drop("results").row(0, named=True) if parsed.height == 1 else {}
        results = parsed["results"][0] if parsed.height == 1 else None
    else:
        envelope, results = _json_envelope(content, ticker, request_id)
    where = f"for {ticker} (request id {envelope.get('request_id') or request_id or '?'})"
    if envelope.get("status") not in _OK_STATUSES:
        raise PolygonResponseError(f"Polygon returned an unexpected body {where}")
    if envelope.get("ticker") != ticker:
        raise PolygonResponseError(f"Polygon answered for {envelope.get('ticker')!r} {where}")
    if envelope.get("adjusted") is not adjusted:
        raise PolygonResponseError(f"Polygon answered adjusted={envelope.get('adjusted')} {where}")
    request_id = envelope.get("request_id") or request_id or "?"
    next_url = envelope.get("next_url")
    if results is None or len(results) == 0:
        return Page(empty_bars(), request_id, ticker, next_url)
    frame = _strict_bars(results) if fast is None else fast
    frame = frame.with_columns(pl.col("ts").cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"))
    columns = [*BAR_SCHEMA.names(), *(["defects"] if fast is None else [])]
    return Page(frame.select(columns), request_id, ticker, next_url)


def _suspect(content: bytes) -> bool:
    """Whether a body may hold a value polars' typed read would quietly coerce: a boolean
    (beyond `adjusted`), a string (beyond the envelope's), NaN or Infinity. Plain byte
    counts, a few ms for a 5 MB page: a false alarm only costs the slower read.

    The counts need a value right after its colon, so a body with whitespace (`"o": true`,
    pretty-printed) is counted without it. Removing it inside strings too can only add
    matches, a false alarm; compact bodies, the provider's, pay four byte searches only."""
    if any(space in content for space in (b" ", b"\n", b"\t", b"\r")):
        content = content.translate(None, _JSON_WHITESPACE)
    booleans = content.count(b'":true') + content.count(b'":false')
    return (
        booleans > 1
        or content.count(b'":"') > _ENVELOPE_STRINGS
        or b"NaN" in content
        or b"Infinity" in content
    )


def _fast_bars(parsed: pl.DataFrame) -> pl.DataFrame | None:
    """The bars of a fast read, or None when a `t` or `n` is not an integer read exactly
    (see `_ENVELOPE_SCHEMA`)."""
    bars = parsed.select(pl.col("results").explode()).unnest("results")
    exact = [
        (pl.col(name).is_null() | ((pl.col(name) % 1 == 0) & (pl.col(name).abs() < _EXACT_INTEGER)))
        .all()
        .alias(name)
        for name in ("t", "n")
    ]
    if bars.height and not all(bars.select(exact).row(0)):
        return None
    return bars.with_columns(pl.col("t", "n").cast(pl.Int64())).rename(_WIRE_TO_BAR)


def _json_envelope(
    content: bytes, ticker: str, request_id: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The envelope and the bars of a body polars could not type, read with json."""
    try:
        body = json.loads(content)
    except ValueError:
        raise PolygonResponseError(
            f"Polygon returned malformed JSON for {ticker} "
            f"(request id {request_id or '?'}, {len(content)} bytes)"
        ) from None
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not (
        results is None or (isinstance(results, list) and all(isinstance(r, dict) for r in results))
    ):
        shown = body.get("request_id") if isinstance(body, dict) else None
        raise PolygonResponseError(
            f"Polygon's body breaks the aggregates schema for {ticker} "
            f"(request id {shown or request_id or '?'}): `results` is not a list of bars"
        )
    return body, results


def _strict_bars(results: list[dict[str, Any]]) -> pl.DataFrame:
    """Typed bar columns and each bar's defects: a boolean, a string, a number out of its
    type's range or not finite becomes null with a reason, never a number."""
    columns: dict[str, list[Any]] = {name: [] for name in _WIRE_TO_BAR.values()}
    defects: list[list[str]] = []
    for bar in results:
        found: list[str] = []
        for field, dtype in _WIRE_SCHEMA.items():
            name = _WIRE_TO_BAR[field]
            columns[name].append(_strict_value(name, bar.get(field), dtype.is_integer(), found))
        defects.append(found)
    schema = {_WIRE_TO_BAR[field]: dtype for field, dtype in _WIRE_SCHEMA.items()}
    return pl.DataFrame(columns, schema=schema).with_columns(
        defects=pl.Series(defects, dtype=pl.List(pl.String()))
    )


def _strict_value(name: str, value: object, integer: bool, defects: list[str]) -> Any:
    shown = json.dumps(value)[:40]
    if value is None:
        return None
    if isinstance(value, bool):
        defects.append(f"{name} is a boolean ({shown}), not a number")
    elif not isinstance(value, int | float):
        kind = (
            "string" if isinstance(value, str) else "list" if isinstance(value, list) else "object"
        )
        defects.append(f"{name} is a {kind} ({shown}), not a number")
    elif isinstance(value, float) and not math.isfinite(value):
        defects.append(f"{name} is not finite ({shown})")
    elif integer and (not float(value).is_integer() or not _INT64_MIN <= value <= _INT64_MAX):
        defects.append(f"{name} is not an integer in range ({shown})")
    elif not integer and abs(value) > _FLOAT_MAX:
        defects.append(f"{name} is not a number in range ({shown})")
    else:
        return int(value) if integer else float(value)
    return None


class PolygonClient:
    """Aggregates of one Polygon account. Use as a context manager, or call close()."""

    def __init__(
        self,
        api_key: str | None,
        base_url: str,
        *,
        rate_limiter: RequestLimiter | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": "marketdata-pipeline"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self._secret = api_key or None
        self._limiter = rate_limiter
        self._retry = retry or RetryPolicy()
        # Set by the first response from the simulator (its header), whatever the base URL.
        self.synthetic = False

    def __repr__(self) -> str:
        return f"PolygonClient(base_url={self.base_url!r})"

    def __enter__(self) -> PolygonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._limiter:
            self._limiter.close()

    def aggregate_pages(
        self,
        ticker: str,
        multiplier: int,
        timespan: str,
        start: date,
        end: date,
        *,
        adjusted: bool = True,
    ) -> Iterator[Page]:
        """Bars of [start, end], oldest first, one page at a time, following `next_url`."""
        path = f"/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{start}/{end}"
        params: dict[str, Any] | None = {
            "adjusted": "true" if adjusted else "false",
            "sort": "asc",
            "limit": MAX_LIMIT,
        }
        max_pages = _max_pages(timespan, start, end)
        followed: set[str] = set()
        next_target: str | None = path
        while next_target is not None:
            response = self._get(next_target, params, ticker)
            page = decode_page(
                self._without_key(response.content),
                ticker=ticker,
                adjusted=adjusted,
                request_id=response.headers.get("X-Request-Id"),
            )
            yield replace(page, received_at=datetime.now(UTC))
            followed.add(next_target)
            next_target = _path_and_query(page.next_url) if page.next_url else None
            params = None  # the cursor in next_url carries them
            if next_target in followed:
                raise PolygonResponseError(
                    f"Polygon repeated a page cursor for {ticker} {start}..{end} "
                    f"(request id {page.request_id}): pagination stopped"
                )
            if next_target and len(followed) >= max_pages:
                raise PolygonResponseError(
                    f"Polygon sent more than {max_pages} pages for {ticker} {start}..{end}, "
                    f"more than the range can hold (request id {page.request_id}): "
                    "pagination stopped"
                )

    def aggregates(
        self,
        ticker: str,
        multiplier: int,
        timespan: str,
        start: date,
        end: date,
        *,
        adjusted: bool = True,
    ) -> pl.DataFrame:
        """All bars of [start, end] in one frame."""
        frames = [
            p.frame
            for p in self.aggregate_pages(
                ticker, multiplier, timespan, start, end, adjusted=adjusted
            )
        ]
        return pl.concat(frames, how="diagonal") if frames else empty_bars()

    def grouped_daily(
        self, market: Market, day: date, tickers: Collection[str], *, adjusted: bool = True
    ) -> Page:
        """The daily bars of `day` of the `tickers` among the whole market's, in one request;
        the frame has a `ticker` column. Values are read strictly, as by `decode_page`."""
        what = f"the grouped daily bars of {day}"
        envelope, results, request_id = self._json_body(
            f"{_GROUPED_PATHS[market]}/{day}", {"adjusted": str(adjusted).lower()}, what
        )
        if envelope.get("adjusted") is not adjusted:
            raise PolygonResponseError(
                f"Polygon answered adjusted={envelope.get('adjusted')} for {what} "
                f"(request id {request_id})"
            )
        # A bar whose ticker is not one asked for (or not a string) belongs to no one here.
        wanted = [b for b in results or () if isinstance(b.get("T"), str) and b["T"] in tickers]
        if not wanted:
            frame = empty_bars().with_columns(ticker=pl.lit(None, pl.String()))
            return Page(frame, request_id, what, received_at=datetime.now(UTC))
        # Grouped stock bars are stamped at the session's close (16:00 New York), range bars
        # at the day's start: every bar is moved to its day's start, as range bars have it.
        local_day = (
            pl.col("ts")
            .cast(pl.Datetime("ms"))
            .dt.replace_time_zone("UTC")
            .dt.convert_time_zone(market.zone.key)
            .dt.truncate("1d")
        )
        frame = (
            _strict_bars(wanted)
            .with_columns(
                local_day.dt.convert_time_zone("UTC"),
                ticker=pl.Series([bar["T"] for bar in wanted], dtype=pl.String()),
            )
            .select("ticker", *BAR_SCHEMA.names(), "defects")
        )
        return Page(frame, request_id, what, received_at=datetime.now(UTC))

    def splits(self, ticker: str) -> list[Split]:
        """Every split of a stock ticker the provider lists, from its splits reference, paged
        by `next_url` (bounded, as aggregates are). A record that breaks the spec (a missing
        or non-positive ratio, a bad date, another ticker) fails the fetch with its request
        id: a split taken wrong would rewrite history."""
        what = f"the splits of {ticker}"
        found: list[Split] = []
        target: str | None = "/v3/reference/splits"
        params: dict[str, Any] | None = {"ticker": ticker, "limit": SPLITS_LIMIT}
        followed: set[str] = set()
        while target is not None:
            if target in followed or len(followed) >= MAX_SPLIT_PAGES:
                raise PolygonResponseError(
                    f"Polygon's pages of {what} do not end (request {len(followed) + 1}): "
                    "pagination stopped"
                )
            followed.add(target)
            body, results, request_id = self._json_body(target, params, what)
            found += [_split(record, ticker, request_id) for record in results or ()]
            next_url = body.get("next_url")
            target = _path_and_query(next_url) if isinstance(next_url, str) else None
            params = None
        return found

    def _json_body(
        self, target: str, params: dict[str, Any] | None, what: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]] | None, str]:
        """A JSON answer with an OK status (key redacted): its envelope, its `results` and
        its request id."""
        response = self._get(target, params, what)
        header_id = response.headers.get("X-Request-Id")
        body, results = _json_envelope(self._without_key(response.content), what, header_id)
        request_id = body.get("request_id") or header_id or "?"
        if body.get("status") not in _OK_STATUSES:
            raise PolygonResponseError(
                f"Polygon returned an unexpected body for {what} (request id {request_id})"
            )
        return body, results, request_id

    def _without_key(self, content: bytes) -> bytes:
        """A body with the key redacted, before any of it (a ticker, a request id, a bad
        value) can reach a message or the warehouse."""
        secret = self._secret.encode() if self._secret else b""
        return content.replace(secret, _REDACTED.encode()) if secret else content

    def redact(self, text: str) -> str:
        """`text` without the key or anything that looks like a credential."""
        if self._secret:
            text = text.replace(self._secret, _REDACTED)
        return _CREDENTIAL.sub(lambda m: m.group(1) + _REDACTED, text)

    def _get(self, target: str, params: dict[str, Any] | None, ticker: str) -> httpx.Response:
        policy = self._retry
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            stop=(
                tenacity.stop_after_attempt(policy.max_attempts)
                | tenacity.stop_after_delay(policy.max_total_seconds)
            ),
            wait=_wait_for(policy),
            before_sleep=lambda state: log.warning(
                "Polygon request for %s failed (%s): retry %d of %d",
                ticker,
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number,
                policy.max_attempts - 1,
            ),
            reraise=True,
        )
        try:
            return retrying(self._attempt, target, params, ticker)
        except _Retryable as error:
            raise PolygonUnavailable(
                f"Polygon request for {ticker} kept failing after retries: {error}"
            ) from None

    def _attempt(self, target: str, params: dict[str, Any] | None, ticker: str) -> httpx.Response:
        if self._limiter:
            self._limiter.acquire()
        try:
            response = self._http.get(target, params=params)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
            raise _Retryable(type(error).__name__) from None
        if response.headers.get(SIMULATOR_HEADER):
            self.synthetic = True
        status = response.status_code
        if status == 200:
            return response
        message = self.redact(_provider_message(response))
        if _PLAN_LIMIT_WORDS in message.lower():
            raise PolygonPlanLimit(
                f"Polygon's plan does not cover this range for {ticker} ({status}): {message}"
            )
        if status in (401, 403) or "NOT_AUTHORIZED" in message:
            raise PolygonAuthError(
                f"Polygon refused the request for {ticker} ({status}): {message}"
            )
        if status == 429:
            retry_after = _retry_after(response)
            if retry_after is not None and retry_after > self._retry.max_total_seconds:
                raise PolygonUnavailable(
                    f"Polygon asked to wait {retry_after:.0f} s before the next request for "
                    f"{ticker}, longer than the retry budget of "
                    f"{self._retry.max_total_seconds:.0f} s: {message}"
                )
            raise _Retryable(f"429 {message}", retry_after=retry_after)
        if status >= 500:
            raise _Retryable(f"{status} {message}")
        raise PolygonError(f"Polygon rejected the request for {ticker} ({status}): {message}")


def _split(record: dict[str, Any], ticker: str, request_id: str) -> Split:
    where = f"for {ticker} (request id {request_id})"
    if record.get("ticker") != ticker:
        raise PolygonResponseError(f"Polygon listed a split of {record.get('ticker')!r} {where}")
    values = [record.get(name) for name in ("split_from", "split_to")]
    ratio = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(ratio) != 2 or not all(0 < v < math.inf for v in ratio):
        raise PolygonResponseError(f"Polygon listed a split without a positive ratio {where}")
    try:
        day = date.fromisoformat(str(record.get("execution_date")))
    except ValueError:
        raise PolygonResponseError(f"Polygon listed a split without a valid date {where}") from None
    return Split(ticker, day, ratio[0], ratio[1], str(record.get("id") or ""))


def _wait_for(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential_jitter(
        multiplier=policy.initial_backoff, max=policy.max_backoff
    )

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            # Never before the provider said: a retry inside its window is refused again.
            return max(error.retry_after, backoff(state))
        return backoff(state)

    return wait


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds, or as an HTTP date (RFC 9110); None when absent or unreadable."""
    raw = (response.headers.get("Retry-After") or "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _max_pages(timespan: str, start: date, end: date) -> int:
    """The most pages a fault-free answer for [start, end] can take, with one to spare."""
    days = (end - start).days + 1
    return days * _BARS_PER_DAY.get(timespan, 1) // MAX_LIMIT + 2


def _provider_message(response: httpx.Response) -> str:
    """The provider's own words: `error` or `message`, with its status and request id."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code} with a non-JSON body"
    if not isinstance(body, dict):
        return f"HTTP {response.status_code}"
    text = body.get("error") or body.get("message") or ""
    status = body.get("status", "")
    request_id = body.get("request_id")
    suffix = f" (request id {request_id})" if request_id else ""
    return f"{status}: {text}{suffix}".strip(": ")


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path
