"""Now, for every decision that depends on the day: one clock, which a test can set."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_pinned: datetime | None = None


def now() -> datetime:
    """The current time, timezone-aware UTC (the pinned time while a test holds one)."""
    return _pinned or datetime.now(UTC)


@contextmanager
def pinned(moment: datetime) -> Iterator[None]:
    """Make `now()` return `moment` inside the block (this process only)."""
    global _pinned
    if moment.tzinfo is None:
        raise ValueError("the clock needs a timezone-aware datetime")
    before, _pinned = _pinned, moment.astimezone(UTC)
    try:
        yield
    finally:
        _pinned = before
