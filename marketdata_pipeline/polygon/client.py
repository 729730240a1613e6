"""Polygon aggregates client: paged, rate-limited, retried, typed, and silent about the key.

The key travels only in the `Authorization: Bearer` header. `next_url` is followed by its
path and query against the configured base URL, so the key never goes to a host the
operator did not configure, whatever a response says.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlsplit

import httpx
import polars as pl
import tenacity

from marketdata_pipeline.domain import BAR_SCHEMA, empty_bars
from marketdata_pipeline.errors import MarketdataError
from marketdata_pipeline.polygon.rate_limit import process_rate_limiter

log = logging.getLogger(__name__)

MAX_LIMIT = 50_000  # base bars per page, the provider's maximum
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
_ENVELOPE_SCHEMA = pl.Schema(
    {
        "ticker": pl.String(),
        "status": pl.String(),
        "adjusted": pl.Boolean(),
        "request_id": pl.String(),
        "next_url": pl.String(),
        "results": pl.List(pl.Struct(_WIRE_SCHEMA)),
    }
)
_WIRE_TO_BAR = {"t": "ts", "o": "open", "h": "high", "l": "low", "c": "close", "v": "volume"}
_WIRE_TO_BAR |= {"vw": "vwap", "n": "trades"}
_OK_STATUSES = ("OK", "DELAYED")


class PolygonError(MarketdataError):
    """A Polygon request failed. Messages name the ticker, never the key."""


class PolygonAuthError(PolygonError):
    """401, 403 or NOT_AUTHORIZED: final, not retried."""


class PolygonResponseError(PolygonError):
    """A body that is not valid JSON or breaks the aggregates schema."""


class PolygonUnavailable(PolygonError):
    """429, 5xx or timeouts that outlasted the retry budget."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    """One decoded response page."""

    frame: pl.DataFrame
    request_id: str
    ticker: str
    next_url: str | None = None


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
    and building a frame); only a body it refuses is parsed again, to say what is wrong.
    `request_id` (the X-Request-Id header) names the response when the body cannot.
    """
    try:
        parsed = pl.read_json(io.BytesIO(content), schema=_ENVELOPE_SCHEMA)
    except pl.exceptions.PolarsError as error:
        raise _diagnose(content, ticker, request_id, error) from None
    envelope = parsed.drop("results").row(0, named=True) if parsed.height == 1 else {}
    where = f"for {ticker} (request id {envelope.get('request_id') or request_id or '?'})"
    if envelope.get("status") not in _OK_STATUSES:
        raise PolygonResponseError(f"Polygon returned an unexpected body {where}")
    if envelope["ticker"] != ticker:
        raise PolygonResponseError(f"Polygon answered for {envelope['ticker']!r} {where}")
    if envelope["adjusted"] is not adjusted:
        raise PolygonResponseError(f"Polygon answered adjusted={envelope['adjusted']} {where}")
    request_id = envelope["request_id"] or request_id or "?"
    if parsed["results"][0] is None:
        return Page(empty_bars(), request_id, ticker, envelope["next_url"])
    wire = parsed.select(pl.col("results").explode()).unnest("results")
    if wire["t"].null_count():
        raise PolygonResponseError(f"Polygon returned bars without a timestamp 't' {where}")
    frame = wire.rename(_WIRE_TO_BAR).with_columns(
        pl.col("ts").cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    )
    return Page(frame.select(BAR_SCHEMA.names()), request_id, ticker, envelope["next_url"])


def _diagnose(
    content: bytes, ticker: str, request_id: str | None, error: Exception
) -> PolygonResponseError:
    try:
        body = json.loads(content)
    except ValueError:
        return PolygonResponseError(
            f"Polygon returned malformed JSON for {ticker} "
            f"(request id {request_id or '?'}, {len(content)} bytes)"
        )
    if isinstance(body, dict) and body.get("request_id"):
        request_id = body["request_id"]
    detail = str(error).strip().splitlines()[0][:160]
    return PolygonResponseError(
        f"Polygon's body breaks the aggregates schema for {ticker} "
        f"(request id {request_id or '?'}): {detail}"
    )


class PolygonClient:
    """Aggregates of one Polygon account. Use as a context manager, or call close()."""

    def __init__(
        self,
        api_key: str | None,
        base_url: str,
        *,
        max_requests_per_minute: int | None = None,
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
        self._limiter = (
            process_rate_limiter(max_requests_per_minute) if max_requests_per_minute else None
        )
        self._retry = retry or RetryPolicy()

    def __repr__(self) -> str:
        return f"PolygonClient(base_url={self.base_url!r})"

    def __enter__(self) -> PolygonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

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
        next_target: str | None = path
        while next_target is not None:
            response = self._get(next_target, params, ticker)
            page = decode_page(
                response.content,
                ticker=ticker,
                adjusted=adjusted,
                request_id=response.headers.get("X-Request-Id"),
            )
            yield page
            next_target = _path_and_query(page.next_url) if page.next_url else None
            params = None  # the cursor in next_url carries them

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
        return pl.concat(frames) if frames else empty_bars()

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
        status = response.status_code
        if status == 200:
            return response
        message = _provider_message(response)
        if status in (401, 403) or "NOT_AUTHORIZED" in message:
            raise PolygonAuthError(
                f"Polygon refused the request for {ticker} ({status}): {message}"
            )
        if status == 429:
            raise _Retryable(f"429 {message}", retry_after=_retry_after(response))
        if status >= 500:
            raise _Retryable(f"{status} {message}")
        raise PolygonError(f"Polygon rejected the request for {ticker} ({status}): {message}")


def _wait_for(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential_jitter(
        multiplier=policy.initial_backoff, max=policy.max_backoff
    )

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            return min(error.retry_after, policy.max_backoff)
        return backoff(state)

    return wait


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


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
