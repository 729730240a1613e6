"""The vocabulary of the pipeline: markets and asset classes, timeframes, symbols, the bar
schema, and the windows (days of one symbol's month) that are fetched and loaded as a unit.

Whatever differs between stocks and crypto, or between daily and minute bars, is a property
here, so no other module asks "is this crypto?".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

import polars as pl

from marketdata_pipeline.errors import ConfigError


class Market(StrEnum):
    """Where a symbol trades; it fixes the time zone, the calendar and the provider ticker."""

    STOCK = "stock"  # US stocks and ETFs: NYSE sessions, New York time, extended hours
    CRYPTO = "crypto"  # pairs against USD: every day, UTC

    @property
    def zone(self) -> ZoneInfo:
        """Days (and so months) of this market begin at midnight in this zone."""
        return ZoneInfo("America/New_York" if self is Market.STOCK else "UTC")

    def midnight(self, day: date) -> datetime:
        """When `day` begins in this market, in UTC."""
        return datetime.combine(day, time(0), self.zone).astimezone(UTC)

    @property
    def exchange_calendar(self) -> str | None:
        """The exchange-calendars name of its sessions; None when it trades every day."""
        return "XNYS" if self is Market.STOCK else None

    @property
    def asset_classes(self) -> tuple[AssetClass, ...]:
        return tuple(c for c in AssetClass if c.market is self)

    @property
    def symbol_dimension(self) -> str:
        """The dynamic partitions of its symbols: `stock_symbols` or `crypto_symbols`."""
        return f"{self.value}_symbols"

    def provider_ticker(self, symbol: str) -> str:
        """Polygon's ticker for a registry symbol: crypto `BTC` is fetched as `X:BTCUSD`."""
        symbol = normalize_symbol(symbol)
        return f"X:{symbol}{CRYPTO_QUOTE_CURRENCY}" if self is Market.CRYPTO else symbol

    @classmethod
    def of_provider_ticker(cls, ticker: str) -> Market:
        return cls.CRYPTO if ticker.startswith("X:") else cls.STOCK


CRYPTO_QUOTE_CURRENCY = "USD"


class AssetClass(StrEnum):
    """A registry symbol's class (`tracked_symbols.asset_class`). ETFs trade as stocks."""

    STOCK = "stock"
    ETF = "etf"
    CRYPTO = "crypto"

    @property
    def market(self) -> Market:
        return Market.CRYPTO if self is AssetClass.CRYPTO else Market.STOCK

    @classmethod
    def parse(cls, raw: str) -> AssetClass:
        try:
            return cls(raw.strip().lower())
        except ValueError:
            expected = ", ".join(cls)
            raise ConfigError(f"invalid asset class {raw!r}: expected one of {expected}") from None


class Timeframe(StrEnum):
    """A bar size this pipeline keeps: the `daily` of `stock_daily_bars`, `bars_daily` and
    `bars_rejected.timeframe` alike."""

    DAILY = "daily"
    MINUTE = "minute"

    @property
    def table(self) -> str:
        return f"bars_{self.value}"

    @property
    def timespan(self) -> str:
        """The provider's word for it in aggregates URLs."""
        return "day" if self is Timeframe.DAILY else "minute"


# Upper-case ticker: a letter, then letters, digits or a class dot (BRK.B), 12 at most.
SYMBOL_PATTERN = re.compile(r"^[A-Z][A-Z0-9.]{0,11}$")


class InvalidSymbol(ConfigError):
    pass


def normalize_symbol(symbol: str) -> str:
    """The registry form of a symbol (upper case), or InvalidSymbol naming it."""
    stripped = symbol.strip()
    candidate = stripped.upper()
    # ASCII before upper-casing: str.upper() turns the German sharp s into 'SS', the 'fi'
    # ligature into 'FI' and the dotless i (U+0131) into 'I': another ticker than the one typed.
    if not stripped.isascii() or not SYMBOL_PATTERN.fullmatch(candidate):
        shown = symbol if len(symbol) <= 40 else symbol[:40] + "..."
        raise InvalidSymbol(
            f"invalid symbol {shown!r}: expected 1-12 letters, digits or '.', "
            "starting with a letter"
        )
    return candidate


# The bar data contract: what the provider client returns, validation checks and loading writes.
BAR_SCHEMA = pl.Schema(
    {
        "ts": pl.Datetime("ms", "UTC"),  # window start
        "open": pl.Float64(),
        "high": pl.Float64(),
        "low": pl.Float64(),
        "close": pl.Float64(),
        "volume": pl.Float64(),  # double: crypto volume is fractional
        "vwap": pl.Float64(),  # optional on the provider
        "trades": pl.Int64(),  # optional on the provider
    }
)


def empty_bars() -> pl.DataFrame:
    return BAR_SCHEMA.to_frame()


def next_month(month: date) -> date:
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def last_day_of_month(month: date) -> date:
    return next_month(month) - timedelta(days=1)


def contiguous_runs(windows: Iterable[Window]) -> list[list[Window]]:
    """Windows that follow each other day after day, as runs: [Jan, Feb, Apr] -> [[Jan, Feb],
    [Apr]] (one request stream each)."""
    runs: list[list[Window]] = []
    for window in sorted(windows, key=lambda w: w.first_day):
        if runs and runs[-1][-1].last_day + timedelta(days=1) == window.first_day:
            runs[-1].append(window)
        else:
            runs.append([window])
    return runs


def consecutive_months(months: Iterable[date]) -> list[list[date]]:
    """Months as runs of consecutive months: [Jan, Feb, Apr] -> [[Jan, Feb], [Apr]]."""
    runs: list[list[date]] = []
    for month in sorted(months):
        if runs and next_month(runs[-1][-1]) == month:
            runs[-1].append(month)
        else:
            runs.append([month])
    return runs


@dataclass(frozen=True)
class Window:
    """The bars of one symbol over whole days of one month of its market: the month (what a
    partition loads) or its latest days (what a nightly refresh loads). Loaded as a unit."""

    market: Market
    timeframe: Timeframe
    symbol: str
    first_day: date
    last_day: date

    def __post_init__(self) -> None:
        if not (self.first_day <= self.last_day and _month(self.first_day) == self.month):
            raise ValueError(
                f"a window is whole days of one month: {self.first_day}..{self.last_day}"
            )

    @classmethod
    def of_month(cls, market: Market, timeframe: Timeframe, symbol: str, month: date) -> Window:
        return cls(market, timeframe, symbol, month, last_day_of_month(month))

    @property
    def month(self) -> date:
        return _month(self.last_day)

    @property
    def is_whole_month(self) -> bool:
        return self.first_day.day == 1 and self.last_day == last_day_of_month(self.month)

    @property
    def start(self) -> datetime:
        """[start, end) in UTC: from midnight of the first day to midnight after the last,
        in the market's zone."""
        return self.market.midnight(self.first_day)

    @property
    def end(self) -> datetime:
        return self.market.midnight(self.last_day + timedelta(days=1))

    @property
    def month_start(self) -> datetime:
        return self.market.midnight(self.month)

    @property
    def month_end(self) -> datetime:
        return self.market.midnight(next_month(self.month))

    @property
    def label(self) -> str:
        """`2024-03` for a whole month, `2024-03-18..2024-03-20` for some of its days."""
        if self.is_whole_month:
            return f"{self.month:%Y-%m}"
        return f"{self.first_day}..{self.last_day}"


def _month(day: date) -> date:
    return day.replace(day=1)


@dataclass(frozen=True)
class Split:
    """A stock split as the provider lists it: `split_from` shares became `split_to` on
    `execution_date` (4:1 is 1 -> 4); adjusted bars before that day are divided by the ratio."""

    symbol: str
    execution_date: date
    split_from: float
    split_to: float
    provider_id: str

    @property
    def ratio(self) -> str:
        return f"{self.split_to:g}:{self.split_from:g}"
