"""Settings read from the environment, in one place, with the defaults of DESIGN.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.errors import ConfigError

# The provider renamed itself Massive; https://api.polygon.io still answers.
POLYGON_OFFICIAL_BASE_URL = "https://api.massive.com"
DEFAULT_HISTORY_START = date(2020, 1, 1)
_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_path(name: str) -> Path:
    """A file or folder kept at the project's top level and shipped in the wheel (`sql`,
    `dagster.yaml`): inside the package when installed, beside it in a source checkout."""
    installed = _PACKAGE_DIR / name
    return installed if installed.exists() else _PACKAGE_DIR.parent / name


def marketdata_home() -> Path:
    return Path(os.environ.get("MARKETDATA_HOME") or ".marketdata").resolve()


def database_url() -> str | None:
    """The configured warehouse URL, or None for the embedded default."""
    return os.environ.get("DATABASE_URL") or None


def polygon_base_url() -> str:
    return (os.environ.get("POLYGON_BASE_URL") or POLYGON_OFFICIAL_BASE_URL).rstrip("/")


def max_requests_per_minute() -> int | None:
    raw = os.environ.get("POLYGON_MAX_REQUESTS_PER_MINUTE")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"POLYGON_MAX_REQUESTS_PER_MINUTE must be a positive integer, got {raw!r}"
        ) from None
    if value <= 0:
        raise ConfigError(f"POLYGON_MAX_REQUESTS_PER_MINUTE must be positive, got {value}")
    return value


def history_start() -> date:
    """First month of the partitions; always the first day of a month."""
    raw = os.environ.get("MARKETDATA_HISTORY_START")
    if not raw:
        return DEFAULT_HISTORY_START
    try:
        parsed = date.fromisoformat(raw if len(raw) > 7 else f"{raw}-01")
    except ValueError:
        raise ConfigError(
            f"MARKETDATA_HISTORY_START must be a date like 2020-01 or 2020-01-01, got {raw!r}"
        ) from None
    return parsed.replace(day=1)


@dataclass(frozen=True)
class SeedSymbol:
    symbol: str
    asset_class: AssetClass


DEFAULT_SYMBOLS: tuple[SeedSymbol, ...] = (
    *(
        SeedSymbol(s, AssetClass.STOCK)
        for s in (
            *("AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX"),
            *("AMD", "INTC", "PYPL", "SQ", "ROKU", "MSTR", "SOFI"),
        )
    ),
    *(SeedSymbol(s, AssetClass.ETF) for s in ("SPY", "QQQ")),
    *(SeedSymbol(s, AssetClass.CRYPTO) for s in ("BTC", "ETH", "SOL")),
)


def simulated() -> bool:
    """True when bars come from the offline simulator (set by `marketdata ui` without a key)."""
    return os.environ.get("MARKETDATA_SIMULATED", "") == "1"
