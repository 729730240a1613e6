"""Deterministic synthetic OHLCV bars for the offline simulator, shaped like the provider's.

Every value is a pure function of (ticker, bar start): the same request gives the same bars,
whatever range or page it comes in. Prices follow a few slow waves around a per-ticker base
with hashed noise, and OHLC rules hold. Stocks trade NYSE sessions (daily bars stamped 00:00
New York), crypto trades 24/7 in UTC. A split revises history: adjusted bars are the
whole series divided by its ratio (continuous across it), unadjusted ones drop on its day.

What makes the bars look like the provider's, so the pipeline meets what real data does:
- Stock minute bars: the regular session (09:30-16:00 New York) has a bar nearly every
  minute (about 1 in 400 has no trade); the pre-market (04:00-09:30) and after hours
  (16:00-20:00) are sparse, denser next to the session, with a small share of the volume.
- Intraday volume is U-shaped: the opening minutes trade 5-15x a midday minute, volume sinks
  to a midday trough and rises into the close (15:59 is heavy). Minute-to-minute noise is
  lognormal and bounded, so neighbouring minutes differ by tens of percent, never 50x.
  Crypto trades 24/7 with a mild daily cycle (busiest 13:00-16:00 UTC), quieter at weekends.
- A day's volume is one draw per (ticker, day), shared by its minute bars and its daily bar,
  so a daily bar's volume is about the sum of its minutes'.
- vwap is the typical price (h+l+c)/3 with rounding noise, 4 decimals; about 1 bar in 200
  sits a hair outside [low, high], never by more than 0.05% relative.

Not modelled: early closes (the regular session always ends at 16:00), halts, auctions'
own prints, corporate actions other than the splits told to `Revisions`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

import numpy as np

from marketdata_pipeline.domain import Market
from marketdata_pipeline.quality import calendars

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_NY = Market.STOCK.zone
_EPOCH = date(1970, 1, 1)
# The simulator's history: nothing before or after (the provider's `from`/`to` may ask).
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(2100, 12, 31)

# New York minutes of the day (from midnight) where the parts of a stock's day begin.
PRE_MARKET = 4 * 60
REGULAR_OPEN = 9 * 60 + 30
REGULAR_CLOSE = 16 * 60
AFTER_HOURS_END = 20 * 60
_MISSING_ONE_IN = 400  # regular-session (and crypto) minutes without a trade
VWAP_OUTSIDE_ONE_IN = 200
VWAP_OUTSIDE_MAX = 0.0005  # relative; the pipeline tolerates 0.1%


def _mix(seed: int, values: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, value): a fast counter-based hash, uniform over uint64."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, values: np.ndarray) -> np.ndarray:
    return (_mix(seed, values) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _normal(seed: int, values: np.ndarray) -> np.ndarray:
    """About standard normal but bounded to [-3, 3]: the sum of three uniforms (21 bits each,
    from one hash), so noise can never make an outlandish value by chance."""
    z = _mix(seed, values)
    mask = np.uint64((1 << 21) - 1)
    total = (z & mask) + ((z >> np.uint64(21)) & mask) + ((z >> np.uint64(42)) & mask)
    return (total.astype(np.float64) / float(1 << 21) - 1.5) * 2.0


def ticker_seed(ticker: str) -> int:
    return zlib.crc32(ticker.encode())


# -- the shape of a day ---------------------------------------------------------------------


def _stock_day_profile() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per New York minute of the day: the chance a bar exists, its volume relative to a
    midday minute, and the log-sigma of its minute-to-minute volume noise."""
    minute = np.arange(24 * 60)
    presence, shape = np.zeros(minute.size), np.zeros(minute.size)
    sigma = np.full(minute.size, 0.3)

    pre = (minute >= PRE_MARKET) & (minute < REGULAR_OPEN)
    before_open = (REGULAR_OPEN - 1 - minute[pre]).astype(np.float64)
    presence[pre] = 0.12 + 0.6 * np.exp(-before_open / 60)  # ~23% of pre-market minutes
    shape[pre] = 0.02 + 0.15 * np.exp(-before_open / 45)
    sigma[pre] = 0.5  # thin markets jump about more

    regular = (minute >= REGULAR_OPEN) & (minute < REGULAR_CLOSE)
    k = (minute[regular] - REGULAR_OPEN).astype(np.float64)  # minutes into the session
    last = REGULAR_CLOSE - REGULAR_OPEN - 1
    u_shape = 0.9 + 0.8 * (2 * k / last - 1) ** 4
    opening = 7.5 * np.exp(-k / 6)  # the open's burst fades within 15-30 minutes
    closing = 4.0 * np.exp(-(last - k) / 12) + 5.0 * (k == last)  # 15:59: the closing cross
    shape[regular] = u_shape + opening + closing
    presence[regular] = 1 - 1 / _MISSING_ONE_IN
    # The open and the close always trade, and heavily: 6-16x a midday minute.
    presence[[REGULAR_OPEN, REGULAR_CLOSE - 1]] = 1.0
    sigma[[REGULAR_OPEN, REGULAR_CLOSE - 1]] = 0.15

    after = (minute >= REGULAR_CLOSE) & (minute < AFTER_HOURS_END)
    since_close = (minute[after] - REGULAR_CLOSE).astype(np.float64)
    presence[after] = 0.25 + 0.6 * np.exp(-since_close / 30)  # ~33% of after-hours minutes
    shape[after] = 0.03 + 0.35 * np.exp(-since_close / 20)
    sigma[after] = 0.5

    midday = (minute >= 12 * 60) & (minute < 14 * 60)
    return presence, shape / shape[midday].mean(), sigma


def _crypto_day_profile() -> np.ndarray:
    """Per UTC minute of the day: volume relative to the day's mean minute."""
    hours = (np.arange(24 * 60) + 0.5) / 60
    shape = 0.7 + 0.6 * np.exp(-(((hours - 14.5) / 3.0) ** 2))  # Europe and US overlap
    return shape / shape.mean()


_STOCK_PRESENCE, _STOCK_SHAPE, _STOCK_SIGMA = _stock_day_profile()
_CRYPTO_SHAPE = _crypto_day_profile()
_CRYPTO_SIGMA = 0.35
# A day's volume over its minutes: the expected sum of presence x shape x noise, so that a
# daily bar's volume is about the sum of its minute bars'. E[exp(sigma z)] ~ exp(sigma^2/2).
_STOCK_DAY_MINUTES = float(np.sum(_STOCK_PRESENCE * _STOCK_SHAPE * np.exp(_STOCK_SIGMA**2 / 2)))
_CRYPTO_DAY_MINUTES = 24 * 60 * (1 - 1 / _MISSING_ONE_IN) * math.exp(_CRYPTO_SIGMA**2 / 2)


def bars_per_day(ticker: str, span_ms: int) -> float:
    """About how many base bars a calendar day holds (sizes the chunks a page is built from)."""
    market = Market.of_provider_ticker(ticker)
    trading_days = 252 / 365 if market is Market.STOCK else 1.0
    if span_ms == DAY_MS:
        return trading_days
    per_session = float(_STOCK_PRESENCE.sum()) if market is Market.STOCK else 24 * 60.0
    return per_session * trading_days


# -- revisions --------------------------------------------------------------------------------


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


# -- which bars exist -------------------------------------------------------------------------


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ny_midnight_ms(day: date) -> int:
    return _ms(datetime.combine(day, time(0), tzinfo=_NY))


def local_midnights_ms(days: np.ndarray, market: Market) -> np.ndarray:
    """Start (ms) of each epoch day (days since 1970-01-01) in the market's time zone."""
    days = np.asarray(days, np.int64)
    if market is Market.CRYPTO or not len(days):
        return days * DAY_MS
    first = int(days.min())
    span = int(days.max()) - first + 1
    midnights = np.fromiter(
        (_ny_midnight_ms(_EPOCH + timedelta(days=first + i)) for i in range(span)),
        np.int64,
        span,
    )
    return midnights[days - first]


def _sessions(market: Market, first: date, last: date) -> list[date]:
    """The market's days in [first, last], within the simulator's history."""
    return calendars.sessions(market, max(first, FIRST_DAY), min(last, LAST_DAY))


def _midnights(market: Market, first: date, last: date) -> np.ndarray:
    return np.array(
        [_ms(datetime.combine(d, time(0), market.zone)) for d in _sessions(market, first, last)],
        np.int64,
    )


def daily_starts(ticker: str, first: date, last: date) -> np.ndarray:
    """Start (ms) of each daily bar in [first, last]: midnight of each session."""
    return _midnights(Market.of_provider_ticker(ticker), first, last)


def minute_starts(ticker: str, first: date, last: date) -> np.ndarray:
    """Start (ms) of each minute bar on the days [first, last]: the minutes that traded."""
    market = Market.of_provider_ticker(ticker)
    midnights = _midnights(market, first, last)
    if not len(midnights):
        return np.empty(0, np.int64)
    if market is Market.STOCK:
        minutes = np.arange(PRE_MARKET, AFTER_HOURS_END)
        presence = _STOCK_PRESENCE[minutes]
    else:
        minutes = np.arange(24 * 60)
        presence = np.full(minutes.size, 1 - 1 / _MISSING_ONE_IN)
    # No session day is a DST change (those are Sundays), so midnight + minutes is wall time.
    starts = (midnights[:, None] + minutes[None, :] * MINUTE_MS).ravel()
    traded = _uniform(ticker_seed(ticker) ^ 0x5EED, starts) < np.tile(presence, len(midnights))
    return starts[traded]


# -- what the bars hold -----------------------------------------------------------------------


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


def _ny_day_and_minute(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New York epoch day and minute of the day of stock minute bars. They run 04:00-20:00
    New York (08:00-01:00 UTC), so 4.5 h before each (between EDT's and EST's offsets)
    always lands on its New York date, whatever the season."""
    day = (starts - 4 * HOUR_MS - HOUR_MS // 2) // DAY_MS
    minute = (starts - local_midnights_ms(day, Market.STOCK)) // MINUTE_MS
    return day, np.clip(minute, 0, 24 * 60 - 1)


def _day_volume(seed: int, market: Market, day: np.ndarray) -> np.ndarray:
    """A ticker's volume on each epoch day (of each bar): computed once per day."""
    if not len(day):
        return np.empty(0)
    first = int(day.min())
    days = np.arange(first, int(day.max()) + 1, dtype=np.int64)
    return _volume_of_days(seed, market, days)[day - first]


def _volume_of_days(seed: int, market: Market, day: np.ndarray) -> np.ndarray:
    """Its own level, a slow wave, a daily draw, and quieter weekends for crypto."""
    u = (seed >> 7) % 1000 / 1000
    level = 10 ** (6 + 1.7 * u) if market is Market.STOCK else 10 ** (3 + 2 * u)
    wave = 1 + 0.25 * np.sin(2 * np.pi * day / 97.0 + (seed >> 5) % 628 / 100)
    volume = level * wave * np.exp(0.25 * _normal(seed ^ 0xDA7, day))
    if market is Market.CRYPTO:
        weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
        volume = np.where(weekday >= 5, volume * 0.75, volume)
    return volume


def _volume_and_trades(
    seed: int, market: Market, starts: np.ndarray, span_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    if span_ms == DAY_MS:
        # A daily bar starts at midnight in its zone; +12 h lands on its date in UTC.
        volume = _day_volume(seed, market, (starts + DAY_MS // 2) // DAY_MS)
    elif market is Market.STOCK:
        day, minute = _ny_day_and_minute(starts)
        noise = np.exp(_STOCK_SIGMA[minute] * _normal(seed ^ 3, starts))
        volume = _day_volume(seed, market, day) / _STOCK_DAY_MINUTES * _STOCK_SHAPE[minute]
        volume *= noise
    else:
        minute = starts % DAY_MS // MINUTE_MS
        noise = np.exp(_CRYPTO_SIGMA * _normal(seed ^ 3, starts))
        volume = _day_volume(seed, market, starts // DAY_MS) / _CRYPTO_DAY_MINUTES
        volume *= _CRYPTO_SHAPE[minute] * noise
    size_noise = np.exp(0.2 * _normal(seed ^ 4, starts))
    u = (seed >> 13) % 1000 / 1000
    if market is Market.STOCK:
        volume = np.maximum(1.0, np.floor(volume))  # whole shares
        per_trade = (60 + 140 * u) * size_noise
    else:
        volume = np.maximum(1e-8, np.round(volume, 8))  # fractional coins
        per_trade = (0.005 + 0.1 * u) * size_noise
    trades = np.maximum(1, np.round(volume / per_trade)).astype(np.int64)
    return volume, trades


def _vwap(
    seed: int, starts: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray
) -> np.ndarray:
    """The typical price with noise; 1 bar in VWAP_OUTSIDE_ONE_IN a hair outside the range."""
    typical = (high + low + close) / 3
    # The typical price sits at least a third of the range from either end: +-1/4 keeps it in.
    inside = typical + _normal(seed ^ 0x77, starts) / 3 * 0.25 * (high - low)
    inside = np.clip(np.round(inside, 4), low, high)
    draw = _uniform(seed ^ 0x78, starts)
    outside = draw < 1 / VWAP_OUTSIDE_ONE_IN
    hair = (0.15 + 0.6 * draw * VWAP_OUTSIDE_ONE_IN) * VWAP_OUTSIDE_MAX  # 7.5e-5 .. 3.75e-4
    above = _uniform(seed ^ 0x79, starts) < 0.5
    beyond = np.where(
        above,
        np.maximum(np.round(high * (1 + hair), 4), high + 0.0001),
        np.minimum(np.round(low * (1 - hair), 4), low - 0.0001),
    )
    return np.where(outside, beyond, inside)


def _within_hair(vwap: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """vwap held within VWAP_OUTSIDE_MAX of [low, high], rounded inwards to 4 decimals (a
    cent's rounding on a very low price, e.g. after a big split, could push it further)."""
    top = np.floor(high * (1 + VWAP_OUTSIDE_MAX) * 1e4) / 1e4
    bottom = np.ceil(low * (1 - VWAP_OUTSIDE_MAX) * 1e4) / 1e4
    return np.clip(vwap, np.minimum(bottom, low), np.maximum(top, high))


def bars(
    ticker: str, starts: np.ndarray, span_ms: int, revisions: Revisions, *, adjusted: bool
) -> dict[str, np.ndarray]:
    """OHLCV columns (Polygon's short names) for minute or daily bars starting at `starts`."""
    if span_ms not in (MINUTE_MS, DAY_MS):
        raise ValueError(f"base bars are minute or daily bars, not {span_ms} ms")
    starts = np.asarray(starts, np.int64)
    seed = ticker_seed(ticker)
    market = Market.of_provider_ticker(ticker)
    open_ = _price(seed, starts)
    close = _price(seed, starts + span_ms)  # the next bar's open, as in a market
    spread = 0.0005 + 0.004 * _uniform(seed ^ 1, starts) * min(1.0, span_ms / DAY_MS * 4 + 0.2)
    high = np.round(np.maximum(open_, close) * (1 + spread), 4)
    low = np.round(np.minimum(open_, close) * (1 - spread * _uniform(seed ^ 2, starts)), 4)
    vwap = _vwap(seed, starts, high, low, close)
    volume, trades = _volume_and_trades(seed, market, starts, span_ms)
    # The synthetic series is the company's continuous price. A split makes each share worth
    # 1/ratio from its day on (unadjusted bars drop there); adjusted bars divide the whole
    # series, so they stay continuous across it and history before it is revised.
    for split in revisions.splits.get(ticker, []):
        scaled = starts >= (0 if adjusted else _ny_midnight_ms(split.effective))
        for column in (open_, high, low, close, vwap):
            column[scaled] = np.round(column[scaled] / split.ratio, 4)
        volume = np.where(scaled, volume * split.ratio, volume)
    vwap = _within_hair(vwap, high, low)
    return {
        "v": volume,
        "vw": vwap,
        "o": open_,
        "c": close,
        "h": high,
        "l": low,
        "t": starts,
        "n": trades,
    }


def day_range(start_ms: int, end_ms: int, ticker: str) -> tuple[date, date]:
    """Calendar days (in the ticker's market time zone) touched by [start_ms, end_ms]."""
    zone = Market.of_provider_ticker(ticker).zone
    first = datetime.fromtimestamp(start_ms / 1000, zone).date()
    last = datetime.fromtimestamp(end_ms / 1000, zone).date()
    return first, last
