"""Now, for every decision that depends on the time of day: one clock, which a test sets."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from marketdata_pipeline.errors import ConfigError

NOW_VARIABLE = "MARKETDATA_NOW"


def now() -> datetime:
    """MARKETDATA_NOW (an ISO 8601 time, for tests and drills) when set, else the system's
    clock; timezone-aware, in UTC."""
    raw = os.environ.get(NOW_VARIABLE)
    if not raw:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"{NOW_VARIABLE} must be an ISO 8601 time, got {raw[:40]!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
