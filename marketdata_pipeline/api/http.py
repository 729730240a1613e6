"""What every endpoint of the read API shares: its refusals, its parameters, its times."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.datastructures import QueryParams
from starlette.requests import Request

from marketdata_pipeline.registry.api_keys import redact

REQUESTS_PER_KEY = 8  # in progress at once: one key cannot take every session
_KEY_NAMES = ("api_key", "apikey", "key", "x-api-key")


class ApiError(Exception):
    """A request the API refuses: its status and one readable line."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def key_in_query(query_string: bytes) -> bool:
    """Whether a URL carries an API key, by a parameter's name or a value's shape: a key in
    a URL ends up in histories, proxies' logs and Referer headers."""
    for name, value in QueryParams(query_string).multi_items():
        if name.lower() in _KEY_NAMES or any(redact(part) != part for part in (name, value)):
            return True
    return False


def query_parameters(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each given once and with a value, none unknown: a misspelt
    or empty one would silently fall back to its default."""
    items = request.query_params.multi_items()
    for name, value in items:
        if name not in allowed:
            expected = f"expected {', '.join(allowed)}" if allowed else "this endpoint takes none"
            raise ApiError(400, f"unknown parameter {redact(name)[:40]!r}: {expected}")
        if sum(1 for other, _ in items if other == name) > 1:
            raise ApiError(400, f"parameter {name} is given more than once")
        if not value:
            raise ApiError(400, f"parameter {name} is empty: give it a value or leave it out")
    return dict(items)


def iso(moment: datetime | None) -> str | None:
    """A time as the API writes it: RFC 3339 in UTC, to the second."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
