"""The read API's OpenAPI 3.1 document, served at /v1/openapi.json.

Written by hand beside the handlers it describes; the tests validate it against the OpenAPI
schema and every response they read against it.
"""

from __future__ import annotations

from typing import Any

from marketdata_pipeline.api.bars import (
    DATE_PATTERN,
    JSON_ONLY,
    JSON_PAGE_DEFAULT,
    JSON_PAGE_MAX,
    STALLED_SECONDS,
    STREAM_CAP_SECONDS,
    STREAM_FLOOR_BYTES_PER_MINUTE,
    STREAMS_PER_KEY,
    TIME_PATTERN,
    Format,
)
from marketdata_pipeline.api.http import REQUESTS_PER_KEY
from marketdata_pipeline.api.protocol import MAX_HEAD_BYTES
from marketdata_pipeline.warehouse.reading import BarSize


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


_TIME = {"type": "string", "format": "date-time"}
# What start, end and after take: a date or a time with its offset, in the server's forms.
_MOMENT = {
    "anyOf": [
        {"type": "string", "format": "date", "pattern": f"^{DATE_PATTERN.pattern}$"},
        {"type": "string", "format": "date-time", "pattern": f"^{TIME_PATTERN.pattern}$"},
    ]
}
_JSON_ONLY = f"JSON only: with another format, {' or '.join(JSON_ONLY)} is a 400."
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "429": {"$ref": "#/components/responses/TooManyRequests"},
    "431": {"$ref": "#/components/responses/HeadTooLarge"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _get(summary: str, ok: dict[str, Any], **extra: Any) -> dict[str, Any]:
    responses = {"200": ok, **_ERRORS, **extra.pop("responses", {})}
    return {"get": {"summary": summary, **extra, "responses": responses}}


_SYMBOL_PATH = {
    "name": "symbol",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9.]{0,11}$"},
    "description": "A registered symbol; crypto by its base currency (BTC).",
}
_BACKFILL_STATUS = {"enum": ["pending", "in_progress", "completed", "failed", "unavailable"]}
_WINDOWS = {
    "windows_loaded": {"type": "integer"},
    "windows_beyond_plan": {"type": "integer"},
    "windows_expected": {"type": "integer"},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "marketdata read API",
        "version": "1",
        "description": (
            "Read-only access to the warehouse's bars, symbols and statistics. Every request "
            "but this document needs an `X-API-Key` header (ask an operator: `marketdata keys "
            "create NAME`), is counted on the key and audited, and is rate-limited per key. "
            'Errors are `{"error": "one readable line"}`.'
        ),
    },
    "servers": [{"url": "/"}],
    "security": [{"ApiKey": []}],
    "paths": {
        "/v1/bars/{symbol}": _get(
            "One symbol's bars over a range",
            {
                "description": "The bars that overlap [start, end), oldest first: a JSON page, "
                "or the whole range streamed as CSV (times `2024-01-02 14:30:00+00`), Arrow "
                f"IPC (stream format) or Parquet. `ts` is the bar's start, in UTC. A key may "
                f"have {STREAMS_PER_KEY} streams open at a time; a stream whose client reads "
                f"nothing for {STALLED_SECONDS} s, reads slower than "
                f"{STREAM_FLOOR_BYTES_PER_MINUTE // 2**20} MiB a minute or is still streaming "
                f"after {STREAM_CAP_SECONDS // 60} minutes is cut (by default: `marketdata "
                "serve --stream-floor --stream-cap`).",
                "content": {
                    Format.JSON.media_type: {"schema": _ref("BarsPage")},
                    Format.CSV.media_type: {"schema": {"type": "string"}},
                    Format.ARROW.media_type: {"schema": {"type": "string", "format": "binary"}},
                    Format.PARQUET.media_type: {"schema": {"type": "string", "format": "binary"}},
                },
            },
            parameters=[
                _SYMBOL_PATH,
                {
                    "name": "timeframe",
                    "in": "query",
                    "schema": {"enum": [s.value for s in BarSize], "default": "daily"},
                    "description": "minute and daily bars as loaded; hourly and weekly "
                    "aggregated from them (weeks start Monday 00:00 UTC, and for weekly bars "
                    "a date is a UTC day).",
                },
                {
                    "name": "start",
                    "in": "query",
                    "required": True,
                    "schema": _MOMENT,
                    "description": "Start, inclusive: a date (the market day's start in its "
                    "time zone) or an RFC 3339 time with offset; before `end`.",
                },
                {
                    "name": "end",
                    "in": "query",
                    "schema": _MOMENT,
                    "description": "Exclusive end: a time with offset, or a date whose whole "
                    "market day is included. Default: now.",
                },
                {
                    "name": "format",
                    "in": "query",
                    "schema": {"enum": [f.value for f in Format], "default": "json"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": JSON_PAGE_MAX,
                        "default": JSON_PAGE_DEFAULT,
                    },
                    "description": f"Bars per JSON page. {_JSON_ONLY}",
                },
                {
                    "name": "after",
                    "in": "query",
                    "schema": _MOMENT,
                    "description": "JSON paging cursor: bars strictly after this time (the "
                    f"`next` link sets it). {_JSON_ONLY}",
                },
            ],
            responses={
                "400": _error("A bad, unknown or repeated parameter, named in the message."),
                "404": _error("The symbol is not registered."),
            },
        ),
        "/v1/symbols": _get(
            "The active symbols with their backfill status",
            _json(_object({"symbols": {"type": "array", "items": _ref("Symbol")}}), "Symbols"),
            parameters=[
                {
                    "name": "asset_class",
                    "in": "query",
                    "schema": {"enum": ["stock", "etf", "crypto"]},
                }
            ],
            responses={"400": _error("An unknown asset class, or a bad parameter.")},
        ),
        "/v1/symbols/{symbol}/stats": _get(
            "What the warehouse holds of a symbol",
            _json(_ref("SymbolStats"), "Per loaded timeframe"),
            parameters=[_SYMBOL_PATH],
            responses={
                "400": _error("Not a valid symbol, or a parameter (it takes none)."),
                "404": _error("The symbol is not registered."),
            },
        ),
        "/v1/health": _get(
            "The warehouse is reachable; the newest bar per asset class",
            _json(_ref("Health"), "Reachable"),
        ),
        "/v1/usage": _get(
            "The calling key's own usage: requests before this one; the rate limit left "
            "counts this one",
            _json(_ref("Usage"), "The key"),
        ),
        "/v1": {
            "get": {
                "summary": "The endpoints (no key needed)",
                "security": [],
                "responses": {
                    "200": _json(_ref("Index"), "Every path of this document"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "431": {"$ref": "#/components/responses/HeadTooLarge"},
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document (no key needed)",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "431": {"$ref": "#/components/responses/HeadTooLarge"},
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        "responses": {
            "BadRequest": _error(
                "An unknown, repeated or empty parameter: an endpoint takes only those it "
                "names, each once and with a value, and never the API key (on any path); or "
                "a malformed HTTP request."
            ),
            "HeadTooLarge": _error(
                f"The request line and headers are over {MAX_HEAD_BYTES // 1024} KiB."
            ),
            "Unauthorized": _error("Missing, unknown, revoked or deleted API key."),
            "TooManyRequests": {
                **_error(
                    f"The key's rate limit is reached, it has {REQUESTS_PER_KEY} requests in "
                    f"progress or {STREAMS_PER_KEY} streams open, or (instead of 401) this "
                    "address sent too many refused keys."
                ),
                "headers": _RETRY_AFTER,
            },
            "Unavailable": {
                **_error(
                    "The warehouse is unreachable, or busy: every session is in use (then "
                    "with Retry-After); or the request could not be audited."
                ),
                "headers": _RETRY_AFTER,
            },
        },
        "schemas": {
            "Error": _object({"error": {"type": "string"}}),
            "Index": _object(
                {
                    "endpoints": {
                        "type": "array",
                        "items": _object(
                            {
                                "path": {"type": "string"},
                                "summary": {"type": "string"},
                                "needs_key": {"type": "boolean"},
                            }
                        ),
                    },
                    "document": {"const": "/v1/openapi.json"},
                }
            ),
            "Bar": _object(
                {
                    "ts": _TIME,
                    **{c: {"type": "number"} for c in ("open", "high", "low", "close")},
                    "volume": {"type": "number"},
                    "vwap": _NUMBER_OR_NULL,
                    "trades": {"type": ["integer", "null"]},
                }
            ),
            "BarsPage": _object(
                {
                    "symbol": {"type": "string"},
                    "timeframe": {"enum": [s.value for s in BarSize]},
                    "start": _TIME,
                    "end": _TIME,
                    "bars": {"type": "array", "items": _ref("Bar")},
                    "next": {
                        "type": ["string", "null"],
                        "description": "The next page's path and query, relative to the "
                        "server; null on the last page.",
                    },
                }
            ),
            "Symbol": _object(
                {
                    "symbol": {"type": "string"},
                    "asset_class": {"enum": ["stock", "etf", "crypto"]},
                    "backfill_status": _BACKFILL_STATUS,
                    "backfill_error": {"type": ["string", "null"]},
                    "last_backfill": _TIME_OR_NULL,
                    **_WINDOWS,
                }
            ),
            "TimeframeStats": _object(
                {
                    "bars": {"type": "integer"},
                    "first_bar": _TIME_OR_NULL,
                    "last_bar": _TIME_OR_NULL,
                    "rejected": {"type": "integer"},
                    "validation_rate": {
                        **_NUMBER_OR_NULL,
                        "description": "Share of received bars that passed; null without any.",
                    },
                    "missing_days": {
                        "type": ["array", "null"],
                        "items": {"type": "string", "format": "date"},
                        "description": "Sessions (days for crypto) without a bar between the "
                        "first and the last; null without bars.",
                    },
                }
            ),
            "SymbolStats": _object(
                {
                    "symbol": {"type": "string"},
                    "asset_class": {"enum": ["stock", "etf", "crypto"]},
                    "active": {"type": "boolean"},
                    "backfill_status": _BACKFILL_STATUS,
                    **_WINDOWS,
                    "timeframes": _object(
                        {"minute": _ref("TimeframeStats"), "daily": _ref("TimeframeStats")}
                    ),
                }
            ),
            "Health": _object(
                {
                    "warehouse": {"const": "reachable"},
                    "latest_bar": {
                        "type": "object",
                        "description": "Per asset class, the newest minute and daily bar of "
                        "its active symbols (null when none).",
                        "additionalProperties": _object(
                            {"minute": _TIME_OR_NULL, "daily": _TIME_OR_NULL}
                        ),
                    },
                }
            ),
            "Usage": _object(
                {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "created_at": _TIME,
                    "request_count": {"type": "integer"},
                    "last_used": _TIME_OR_NULL,
                    "last_used_endpoint": {"type": ["string", "null"]},
                    "rate_limit": {"type": "string", "examples": ["600 per 1 minute"]},
                    "rate_limit_remaining": {"type": "integer"},
                    "recent_requests": {
                        "type": "array",
                        "items": _object(
                            {
                                "endpoint": {"type": "string"},
                                "method": {"type": "string"},
                                "status": {"type": "integer"},
                                "at": _TIME,
                            }
                        ),
                    },
                }
            ),
        },
    },
}

# What GET /v1 answers: the document's paths, for a client that starts at the root.
INDEX: dict[str, Any] = {
    "endpoints": [
        {
            "path": path,
            "summary": operations["get"]["summary"],
            "needs_key": operations["get"].get("security") != [],
        }
        for path, operations in DOCUMENT["paths"].items()
    ],
    "document": "/v1/openapi.json",
}
