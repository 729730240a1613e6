"""The read API's application: routes, the API-key gate, errors as one JSON line."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import anyio
import psycopg
from limits import RateLimitItem
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from marketdata_pipeline.api import bars, openapi
from marketdata_pipeline.api.http import (
    REQUESTS_PER_KEY,
    ApiError,
    iso,
    key_in_query,
    query_parameters,
)
from marketdata_pipeline.api.pool import BUSY_RETRY_SECONDS, PoolBusy, WarehousePool
from marketdata_pipeline.domain import AssetClass, InvalidSymbol
from marketdata_pipeline.errors import ConfigError, DatabaseUnavailable, NotFound
from marketdata_pipeline.registry import api_keys, backfill_state, symbols
from marketdata_pipeline.registry.backfill_state import WindowCounts
from marketdata_pipeline.registry.stats import stats
from marketdata_pipeline.registry.symbols import TrackedSymbol
from marketdata_pipeline.warehouse.reading import latest_bars

log = logging.getLogger(__name__)

OPENAPI_PATH = "/v1/openapi.json"
INDEX_PATH = "/v1"
PUBLIC_PATHS = (INDEX_PATH, OPENAPI_PATH)  # they tell what the document tells, to anyone
AUDIT_SHOWN = 20


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": api_keys.redact(message)}, status_code=status, headers=headers)


class _Unaudited(Exception):
    """A response could not be audited, so a 503 went out in its place."""


def _unavailable(reason: DatabaseUnavailable | PoolBusy | None) -> JSONResponse:
    """503 for a warehouse unreachable or busy, or (None) a request that could not be audited."""
    if reason is None:
        return error(503, "the request could not be audited, so it is not answered; retry")
    busy = isinstance(reason, PoolBusy)
    return error(503, str(reason), {"Retry-After": str(BUSY_RETRY_SECONDS)} if busy else None)


class KeyGate:
    """No request may carry a key in its URL. Every request but those of PUBLIC_PATHS
    needs an active X-API-Key, within
    the key's rate limit and with at most REQUESTS_PER_KEY of its requests in progress.

    Each request is audited (and counted on its key) with its status as its response starts,
    so a client's next request already sees it in its usage; a response that cannot be
    audited is not sent, a 503 is. Keys are checked and requests audited on sessions of
    their own, which slow queries cannot take. A client address refused too often gets 429
    instead of 401 for the rest of the window."""

    def __init__(self, app: ASGIApp, warehouse: WarehousePool, rate_limit: RateLimitItem) -> None:
        self.app = app
        self.warehouse = warehouse
        self.rate_limit = rate_limit
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.in_progress: Counter[int] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        in_url = None
        if key_in_query(scope["query_string"]):
            in_url = error(400, "send the API key in the X-API-Key header, not in the URL")
        if scope["path"] in PUBLIC_PATHS:
            await (in_url or self.app)(scope, receive, send)
            return
        try:
            key_id, refusal = await self._check(scope)
        except (DatabaseUnavailable, PoolBusy) as unavailable:  # nothing checked nor audited
            await _unavailable(unavailable)(scope, receive, send)
            return
        refusal = in_url or refusal  # audited against the header's key, if it is valid

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                endpoint, status = scope["path"][:500], message["status"]
                # Shielded: a client that hangs up still has its request audited.
                with anyio.CancelScope(shield=True):
                    try:
                        await self.warehouse.run(
                            api_keys.record_use, key_id, endpoint, scope["method"], status
                        )
                    except (DatabaseUnavailable, PoolBusy, psycopg.Error) as lost:
                        reason = lost if not isinstance(lost, psycopg.Error) else None
                        await _unavailable(reason)(scope, receive, send)
                        raise _Unaudited from None
            await send(message)

        accepted = key_id if refusal is None else None
        if accepted is not None:
            self.in_progress[accepted] += 1
        try:
            await (refusal or self.app)(scope, receive, send_audited)
        except _Unaudited:
            path = api_keys.redact(scope["path"])
            log.warning("%s %s refused: it could not be audited", scope["method"], path)
        finally:
            if accepted is not None:
                self.in_progress[accepted] -= 1

    async def _check(self, scope: Scope) -> tuple[int | None, Response | None]:
        """The key id to audit the request against, and the refusal if it is refused; an
        accepted key goes into the request's state."""
        presented = Headers(scope=scope).getlist("x-api-key")
        if len(presented) != 1 or not presented[0]:
            what = "one X-API-Key header" if len(presented) > 1 else "an X-API-Key header"
            return None, self._refused(scope, f"missing API key: send {what}")
        try:
            key = await self.warehouse.run(api_keys.authenticate, presented[0])
        except api_keys.KeyRejected as rejected:
            return rejected.key_id, self._refused(
                scope, "invalid API key: unknown, revoked or deleted"
            )
        scope.setdefault("state", {})["api_key"] = key
        if not self.limiter.hit(self.rate_limit, str(key.id)):
            return key.id, self._retry_later(str(key.id), "this key")
        if self.in_progress[key.id] >= REQUESTS_PER_KEY:
            return key.id, error(
                429,
                f"this key has {REQUESTS_PER_KEY} requests in progress: retry when one ends",
                {"Retry-After": str(BUSY_RETRY_SECONDS)},
            )
        return key.id, None

    def _refused(self, scope: Scope, message: str) -> Response:
        """401, or 429 for an address refused too often: a valid key from that address (all
        local clients share one) is still accepted."""
        client = f"client {scope['client'][0] if scope.get('client') else '-'}"
        if not self.limiter.hit(self.rate_limit, client):
            return self._retry_later(client, "refused API keys from this address")
        return error(401, message, {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    def _retry_later(self, counted: str, what: str) -> Response:
        reset_at, _ = self.limiter.get_window_stats(self.rate_limit, counted)
        wait = max(1, math.ceil(reset_at - time.time()))
        return error(
            429,
            f"rate limit of {self.rate_limit} for {what} reached: retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def remaining(self, key: api_keys.ApiKey) -> int:
        return self.limiter.get_window_stats(self.rate_limit, str(key.id))[1]


def _windows(counts: WindowCounts, expected: int) -> dict[str, int]:
    return {
        "windows_loaded": counts.loaded,
        "windows_beyond_plan": counts.unavailable,
        "windows_expected": expected,
    }


def create_app(
    url: str,
    rate_limit: RateLimitItem,
    *,
    stream_floor: int = bars.STREAM_FLOOR_BYTES_PER_MINUTE,
    stream_cap: float = bars.STREAM_CAP_SECONDS,
) -> ASGIApp:
    """The API over the warehouse at `url`, each key allowed `rate_limit` requests, each
    stream cut below `stream_floor` bytes a minute or after `stream_cap` seconds."""
    warehouse = WarehousePool(url, sessions=10, purpose="queries")
    streams = bars.Streams(url, floor=stream_floor, cap=stream_cap)
    keys = WarehousePool(url, sessions=4, purpose="API keys and the audit")

    async def health(request: Request) -> Response:
        query_parameters(request, ())
        latest = await warehouse.run(latest_bars)
        return JSONResponse(
            {
                "warehouse": "reachable",
                "latest_bar": {
                    asset_class: {size: iso(ts) for size, ts in per_size.items()}
                    for asset_class, per_size in latest.items()
                },
            }
        )

    async def usage(request: Request) -> Response:
        query_parameters(request, ())
        key: api_keys.ApiKey = request.state.api_key
        recent = await warehouse.run(
            lambda conn: api_keys.audit(conn, key_id=key.id, limit=AUDIT_SHOWN)
        )
        return JSONResponse(
            {
                "id": key.id,
                "name": key.name,
                "created_at": iso(key.created_at),
                "request_count": key.request_count,
                "last_used": iso(key.last_used),
                "last_used_endpoint": key.last_used_endpoint,
                "rate_limit": str(rate_limit),
                "rate_limit_remaining": gate.remaining(key),
                "recent_requests": [
                    {"endpoint": e.endpoint, "method": e.method, "status": e.status_code,
                     "at": iso(e.timestamp)}
                    for e in recent
                ],
            }
        )  # fmt: skip

    async def symbol_list(request: Request) -> Response:
        raw_class = query_parameters(request, ("asset_class",)).get("asset_class")
        try:
            asset_class = AssetClass.parse(raw_class) if raw_class else None
        except ConfigError as bad:
            raise ApiError(400, str(bad)) from None

        def read(conn: psycopg.Connection) -> tuple[list[TrackedSymbol], dict[str, WindowCounts]]:
            tracked = symbols.list_symbols(conn, asset_class=asset_class)
            return tracked, backfill_state.window_counts(conn)

        tracked, counts = await warehouse.run(read)
        expected = backfill_state.expected_windows()
        return JSONResponse(
            {
                "symbols": [
                    {"symbol": t.symbol, "asset_class": t.asset_class,
                     "backfill_status": t.backfill_status, "backfill_error": t.backfill_error,
                     "last_backfill": iso(t.last_backfill),
                     **_windows(counts.get(t.symbol, WindowCounts()), expected)}
                    for t in tracked
                ]
            }
        )  # fmt: skip

    async def symbol_stats(request: Request) -> Response:
        query_parameters(request, ())

        def read(conn: psycopg.Connection) -> tuple:
            tracked, per_timeframe = stats(conn, request.path_params["symbol"])
            counts = backfill_state.window_counts_of(conn, tracked.symbol)
            return tracked, per_timeframe, counts

        tracked, per_timeframe, counts = await warehouse.run(read)
        return JSONResponse(
            {
                "symbol": tracked.symbol,
                "asset_class": tracked.asset_class,
                "active": tracked.active,
                "backfill_status": tracked.backfill_status,
                **_windows(counts, backfill_state.expected_windows()),
                "timeframes": {
                    s.timeframe.value: {
                        "bars": s.bars,
                        "first_bar": iso(s.first_bar),
                        "last_bar": iso(s.last_bar),
                        "rejected": s.rejected,
                        "validation_rate": s.validation_rate,
                        "missing_days": None
                        if s.missing_days is None
                        else [d.isoformat() for d in s.missing_days],
                    }
                    for s in per_timeframe
                },
            }
        )

    async def bars_of_symbol(request: Request) -> Response:
        return await bars.respond(request, warehouse, streams)

    async def document(request: Request) -> Response:
        query_parameters(request, ())
        return JSONResponse(openapi.DOCUMENT)

    async def index(request: Request) -> Response:
        query_parameters(request, ())
        return JSONResponse(openapi.INDEX)

    def one_line(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(request: Request, exc: Exception) -> Response:
            return error(status, str(exc))

        return handler

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error(exc.status, exc.message, exc.headers)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DatabaseUnavailable | PoolBusy)
        return _unavailable(exc)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return error(500, "internal error: the server's log has the details")

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, f"no endpoint {request.url.path[:100]} (see {OPENAPI_PATH})")
        if exc.status_code == 405:
            message = f"{request.method} is not allowed: this API is read-only"
            return error(405, message, headers=exc.headers)
        return error(exc.status_code, exc.detail, headers=exc.headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pools = (keys.pool, warehouse.pool, streams.warehouse.pool)
        for pool in pools:
            pool.open()
        try:
            yield
        finally:
            for pool in pools:
                pool.close()

    app = Starlette(
        routes=[
            Route(INDEX_PATH, index),
            Route(OPENAPI_PATH, document),
            Route("/v1/health", health),
            Route("/v1/usage", usage),
            Route("/v1/symbols", symbol_list),
            Route("/v1/symbols/{symbol}/stats", symbol_stats),
            Route("/v1/bars/{symbol}", bars_of_symbol),
        ],
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http,
            InvalidSymbol: one_line(400),
            NotFound: one_line(404),
            DatabaseUnavailable: on_unavailable,
            PoolBusy: on_unavailable,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # its redirects name the Host the client sent
    gate = KeyGate(app, keys, rate_limit)
    return gate
