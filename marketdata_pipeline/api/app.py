"""The read API's application: routes, the API-key gate, errors as one JSON line."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import psycopg
from limits import RateLimitItem
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
from marketdata_pipeline.api.shared_limits import RateVerdict, SharedLimits
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


@dataclass(frozen=True)
class _Admission:
    """What the warehouse said of a request: its key (None when none is valid), the key id
    to audit it against, and why it is refused (None when accepted, then with its slot)."""

    key: api_keys.ApiKey | None
    audited_key_id: int | None
    refusal: str | None = None  # "missing ...", "invalid ...", "rate", "busy"
    verdict: RateVerdict | None = None  # of the key's, or of the address's refused keys
    slot: int | None = None


class KeyGate:
    """No request may carry a key in its URL. Every request but those of PUBLIC_PATHS
    needs an active X-API-Key, within
    the key's rate limit and with at most REQUESTS_PER_KEY of its requests in progress.

    Each request is audited (and counted on its key) with its status as its response starts,
    so a client's next request already sees it in its usage; a response that cannot be
    audited is not sent, a 503 is. Keys are checked and requests audited on sessions of
    their own, which slow queries cannot take. A client address refused too often gets 429
    instead of 401 for the rest of the window.

    The limits are the warehouse's (shared_limits), so they hold across every process that
    serves it; the client is the address connecting, or, from a trusted proxy, the one its
    X-Forwarded-For names (uvicorn's ProxyHeadersMiddleware sets it before this gate)."""

    def __init__(self, app: ASGIApp, warehouse: WarehousePool, limits: SharedLimits) -> None:
        self.app = app
        self.warehouse = warehouse
        self.limits = limits
        self.rate_limit = limits.rate_limit

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
        client = _client(scope)
        try:
            with anyio.CancelScope(shield=True):  # a slot it took is given back below
                admission = await self.warehouse.run(self._admit, _presented(scope), client)
        except (DatabaseUnavailable, PoolBusy) as unavailable:  # nothing checked nor audited
            await _unavailable(unavailable)(scope, receive, send)
            return
        key_id, slot = admission.audited_key_id, admission.slot

        async def give_slot_back() -> None:
            nonlocal slot
            if slot is not None:
                taken, slot = slot, None
                await self.limits.release(self.warehouse, taken)

        if admission.key is not None:
            scope.setdefault("state", {})["api_key"] = admission.key
        # Audited against the header's key, if it is valid.
        refusal = in_url or self._refusal(admission)

        endpoint = scope["path"][:500]

        def audit(conn: psycopg.Connection, status: int, given_back: int | None) -> None:
            api_keys.record_use(conn, key_id, endpoint, scope["method"], status, client)
            if given_back is not None:
                self.limits.give_back(conn, given_back)

        # The response's start waits for its first body: when that is all of it, the request
        # is audited and its slot given back in one visit to the warehouse.
        starting: Message | None = None

        async def send_audited(message: Message) -> None:
            nonlocal starting, slot
            if message["type"] == "http.response.start":
                starting = message
                return
            # The slot is given back before the response ends: a client may send its next
            # request the moment it has read this one, and find the slot free.
            ends = message["type"] == "http.response.body" and not message.get("more_body")
            if starting is not None:
                start, starting = starting, None
                given_back = slot if ends else None
                # Shielded: a client that hangs up still has its request audited.
                with anyio.CancelScope(shield=True):
                    try:
                        await self.warehouse.run(audit, start["status"], given_back)
                    except (DatabaseUnavailable, PoolBusy, psycopg.Error) as lost:
                        reason = lost if not isinstance(lost, psycopg.Error) else None
                        await _unavailable(reason)(scope, receive, send)
                        raise _Unaudited from None
                if given_back is not None:
                    slot = None
                await send(start)
            elif ends:
                await give_slot_back()
            await send(message)

        try:
            await (refusal or self.app)(scope, receive, send_audited)
        except _Unaudited:
            path = api_keys.redact(scope["path"])
            log.warning("%s %s refused: it could not be audited", scope["method"], path)
        finally:
            if starting is not None:  # the application failed between a start and its body
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.warehouse.run(audit, starting["status"], None)
            await give_slot_back()

    def _admit(self, conn: psycopg.Connection, presented: list[str], client: str) -> _Admission:
        """The key checked, its request counted and a slot of the key taken, or the refusal
        counted against the client's address: on one session, in two round trips."""
        if len(presented) != 1 or not presented[0]:
            what = "one X-API-Key header" if len(presented) > 1 else "an X-API-Key header"
            return self._refused(conn, None, client, f"missing API key: send {what}")
        try:
            key = api_keys.authenticate(conn, presented[0])
        except api_keys.KeyRejected as rejected:
            why = "invalid API key: unknown, revoked or deleted"
            return self._refused(conn, rejected.key_id, client, why)
        verdict, slot = self.limits.hit_and_take(conn, key.id, REQUESTS_PER_KEY)
        if not verdict.accepted:
            return _Admission(key, key.id, "rate", verdict)
        if slot is None:
            return _Admission(key, key.id, "busy", verdict)
        return _Admission(key, key.id, None, verdict, slot)

    def _refused(
        self, conn: psycopg.Connection, key_id: int | None, client: str, why: str
    ) -> _Admission:
        return _Admission(
            None, key_id, why, self.limits.hit(conn, self.limits.client_bucket(client))
        )

    def _refusal(self, admission: _Admission) -> Response | None:
        """401, or 429 for an address refused too often: a valid key from that address (all
        local clients share one) is still accepted."""
        why, verdict = admission.refusal, admission.verdict
        if why is None:
            return None
        assert verdict is not None
        if why == "busy":
            return error(
                429,
                f"this key has {REQUESTS_PER_KEY} requests in progress: retry when one ends",
                {"Retry-After": str(BUSY_RETRY_SECONDS)},
            )
        if why == "rate":
            return self._retry_later(verdict, "this key")
        if not verdict.accepted:
            return self._retry_later(verdict, "refused API keys from this address")
        return error(401, why, {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    def _retry_later(self, verdict: RateVerdict, what: str) -> Response:
        wait = max(1, math.ceil(verdict.reset_in))
        return error(
            429,
            f"rate limit of {self.rate_limit} for {what} reached: retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    async def remaining(self, key: api_keys.ApiKey) -> int:
        return await self.limits.remaining(self.warehouse, self.limits.key_bucket(key.id))


def _presented(scope: Scope) -> list[str]:
    return Headers(scope=scope).getlist("x-api-key")


def _client(scope: Scope) -> str:
    """The client's address: the peer's, or the one a trusted proxy forwarded."""
    return str(scope["client"][0]) if scope.get("client") else "-"


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
    limits: SharedLimits | None = None,
) -> ASGIApp:
    """The API over the warehouse at `url`, each key allowed `rate_limit` requests, each
    stream cut below `stream_floor` bytes a minute or after `stream_cap` seconds. The limits
    are kept in the warehouse (`limits` is for scripts/bench_api_limits.py, which measures
    others)."""
    limits = limits or SharedLimits(rate_limit)
    warehouse = WarehousePool(url, sessions=10, purpose="queries")
    keys = WarehousePool(url, sessions=4, purpose="API keys, their limits and the audit")
    streams = bars.Streams(url, limits, keys, floor=stream_floor, cap=stream_cap)

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
                "rate_limit_remaining": await gate.remaining(key),
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
            await anyio.to_thread.run_sync(limits.start, url)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(limits.stop)
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
    gate = KeyGate(app, keys, limits)
    return gate
