"""Deterministic synthetic OHLCV bars for the offline simulator.

Every value is a pure function of (ticker, bar start): the same request gives the same bars,
whatever range or page it comes in. Prices follow a few slow waves around a per-ticker base
with hashed noise; OHLC rules hold and vwap lies within [low, high]. Stocks trade NYSE
sessions (minute bars 04:00-20:00 New York, including extended hours; daily bars stamped
00:00 New York), crypto trades 24/7 in UTC. A few minutes in each day have no bar, as on
Polygon. History can be revised with a split, which rescales adjusted bars before its date.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, time

import numpy as np

from marketdata_pipeline.domain import Market
from marketdata_pipeline.quality.calendars import sessions

MINUTE_MS = 60_000
DAY_MS = 86_400_000
_NY = Market.STOCK.zone
# First minute bar of a day: extended hours open at 04:00 New York; crypto starts at midnight.
_DAY_OPEN = {Market.STOCK: time(4, 0), Market.CRYPTO: time(0, 0)}
_MISSING_ONE_IN = 400  # about two or three missing minutes per stock session


def _mix(seed: int, values: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, value): a fast counter-based hash, uniform over uint64."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, values: np.ndarray) -> np.ndarray:
    return (_mix(seed, values) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def ticker_seed(ticker: str) -> int:
    return zlib.crc32(ticker.encode())


@dataclass(frozen=True)
class Split:
    effective: date
    ratio: float


@dataclass
class Revisions:
    """Changes to history the simulator has been told about, per ticker."""

    splits: dict[str, list[Split]] = field(default_factory=dict)

    def split(self, ticker: str, effective: date, ratio: float) -> None:
        self.splits.setdefault(ticker, []).append(Split(effective, ratio))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ny_midnight_ms(day: date) -> int:
    return _ms(datetime.combine(day, time(0), tzinfo=_NY))


def daily_starts(ticker: str, first: date, last: date) -> np.ndarray:
    """Start (ms) of each daily bar in [first, last]: midnight of each session."""
    market = Market.of_provider_ticker(ticker)
    days = sessions(market, first, last)
    return np.array([_ms(datetime.combine(d, time(0), market.zone)) for d in days], np.int64)


def minute_starts(ticker: str, first: date, last: date) -> np.ndarray:
    """Start (ms) of each minute bar on the days [first, last], without the missing minutes."""
    market = Market.of_provider_ticker(ticker)
    opens = [
        _ms(datetime.combine(d, _DAY_OPEN[market], market.zone))
        for d in sessions(market, first, last)
    ]
    if not opens:
        return np.empty(0, np.int64)
    offsets = np.arange(market.minutes_per_day, dtype=np.int64) * MINUTE_MS
    starts = (np.array(opens, np.int64)[:, None] + offsets[None, :]).ravel()
    keep = _mix(ticker_seed(ticker) ^ 0x5EED, starts) % np.uint64(_MISSING_ONE_IN) != 0
    return starts[keep]


def _price(seed: int, t: np.ndarray) -> np.ndarray:
    base = 20.0 + (seed % 4800) / 10.0
    phases = [(seed >> s) % 628 / 100.0 for s in (3, 11, 19)]
    days = t.astype(np.float64) / DAY_MS
    wave = (
        0.30 * np.sin(2 * np.pi * days / 611.0 + phases[0])
        + 0.06 * np.sin(2 * np.pi * days / 9.3 + phases[1])
        + 0.01 * np.sin(2 * np.pi * days / 0.77 + phases[2])
    )
    noise = (_uniform(seed, t // MINUTE_MS) - 0.5) * 0.002
    return np.round(base * np.exp(wave + noise), 4)


def bars(
    ticker: str, starts: np.ndarray, span_ms: int, revisions: Revisions, *, adjusted: bool
) -> dict[str, np.ndarray]:
    """OHLCV columns (Polygon's short names) for bars starting at `starts` lasting `span_ms`."""
    seed = ticker_seed(ticker)
    open_ = _price(seed, starts)
    close = _price(seed, starts + span_ms)  # the next bar's open, as in a market
    spread = 0.0005 + 0.004 * _uniform(seed ^ 1, starts) * min(1.0, span_ms / DAY_MS * 4 + 0.2)
    high = np.round(np.maximum(open_, close) * (1 + spread), 4)
    low = np.round(np.minimum(open_, close) * (1 - spread * _uniform(seed ^ 2, starts)), 4)
    vwap = np.round((high + low + close) / 3, 4)
    scale = span_ms / MINUTE_MS
    volume = (200 + 5000 * _uniform(seed ^ 3, starts)) * scale
    if Market.of_provider_ticker(ticker) is Market.CRYPTO:  # fractional coins
        volume, trades = volume / 1000, np.maximum(1, volume // 40)
    else:
        volume = np.floor(volume)
        trades = np.maximum(1, volume // 40)
    if adjusted:
        for split in revisions.splits.get(ticker, []):
            before = starts < _ny_midnight_ms(split.effective)
            for column in (open_, high, low, close, vwap):
                column[before] = np.round(column[before] / split.ratio, 4)
            volume = np.where(before, volume * split.ratio, volume)
    return {
        "v": volume,
        "vw": vwap,
        "o": open_,
        "c": close,
        "h": high,
        "l": low,
        "t": starts,
        "n": trades.astype(np.int64),
    }


def day_range(start_ms: int, end_ms: int, ticker: str) -> tuple[date, date]:
    """Calendar days (in the ticker's market time zone) touched by [start_ms, end_ms]."""
    zone = Market.of_provider_ticker(ticker).zone
    first = datetime.fromtimestamp(start_ms / 1000, zone).date()
    last = datetime.fromtimestamp(end_ms / 1000, zone).date()
    return first, last
