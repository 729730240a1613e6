"""Soft rules on realistic bars: quiet on a normal month (the open's volume is normal), loud
on an injected spike. Prints the figures it measures."""

from __future__ import annotations

from datetime import date

import polars as pl

from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.polygon.simulator import Faults, Simulator
from marketdata_pipeline.quality.validation import validate

CASES = [
    ("AAPL", Market.STOCK, date(2024, 3, 1)),
    ("SPY", Market.STOCK, date(2024, 11, 1)),
    ("NVDA", Market.STOCK, date(2023, 1, 1)),
    ("BTC", Market.CRYPTO, date(2024, 2, 1)),
]


def month_of_minutes(sim: Simulator, symbol: str, market: Market, month: date):
    window = Window.of_month(market, Timeframe.MINUTE, symbol, month)
    with PolygonClient(None, "http://simulator", transport=sim.transport()) as client:
        ticker = market.provider_ticker(symbol)
        frame = client.aggregates(ticker, 1, "minute", month, window.last_day)
    return frame, validate(frame, window)


def test_normal_months_raise_fewer_than_one_flag_per_ten_thousand_bars() -> None:
    bars = flags = 0
    for symbol, market, month in CASES:
        frame, validation = month_of_minutes(Simulator(), symbol, market, month)
        assert validation.rejected.height == 0
        bars, flags = bars + frame.height, flags + validation.flagged.height
    per_10k = flags / bars * 10_000
    print(f"normal bars: {flags} flags in {bars:,} bars = {per_10k:.2f} per 10,000")
    assert per_10k < 1


def test_injected_volume_spikes_are_caught() -> None:
    caught = injected = 0
    for symbol, market, month in CASES:
        clean, _ = month_of_minutes(Simulator(), symbol, market, month)
        spiked = Simulator()
        spiked.inject(Faults(spike_every=500))
        frame, validation = month_of_minutes(spiked, symbol, market, month)
        ratio = frame["volume"] / clean["volume"]
        spikes = frame.filter(ratio > 100)["ts"]
        flagged = validation.flagged.filter(
            pl.col("flags").list.eval(pl.element().str.contains("volume spike")).list.any()
        )["ts"]
        injected += spikes.len()
        caught += spikes.is_in(flagged.implode()).sum()
        assert flagged.is_in(spikes.implode()).all(), "only the injected bars are flagged"
    share = caught / injected
    print(f"injected spikes: {caught} of {injected} caught ({share:.1%})")
    assert injected > 100 and share > 0.9
