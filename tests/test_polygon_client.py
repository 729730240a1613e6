"""The Polygon client against recorded responses and the simulator (in process and on a socket)."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest

from marketdata_pipeline.domain import BAR_SCHEMA, AssetClass, Market
from marketdata_pipeline.polygon.client import (
    PolygonAuthError,
    PolygonClient,
    PolygonResponseError,
    PolygonUnavailable,
    RetryPolicy,
    decode_page,
)
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer
from tests.conftest import bars_frame

FIXTURES = Path(__file__).parent / "fixtures" / "polygon"
KEY = "pk_live_7Hq2SECRETw9Zk4"
FAST_RETRY = RetryPolicy(max_attempts=4, max_total_seconds=20, initial_backoff=0.01, max_backoff=2)


@pytest.fixture
def sim() -> Simulator:
    return Simulator(api_key=KEY)


def socket_client(server: SimulatorHTTPServer, **kwargs: object) -> PolygonClient:
    return PolygonClient(KEY, server.url, retry=FAST_RETRY, **kwargs)  # type: ignore[arg-type]


def expected_frame(sim: Simulator, ticker: str, timespan: str, first: date, last: date):
    return bars_frame(sim.expected_bars(ticker, timespan, first, last))


# -- recorded responses ------------------------------------------------------------------


def test_recorded_aapl_daily_bars_parse_exactly() -> None:
    content = (FIXTURES / "aggs_AAPL_1_day_2005-04-01_2005-04-04.json").read_bytes()
    page = decode_page(content, ticker="AAPL", adjusted=True)
    assert page.request_id == "12afda77aab3b1936c5fb6ef4241ae42"
    assert page.frame.schema == BAR_SCHEMA
    first = page.frame.row(0, named=True)
    assert first == {
        "ts": datetime(2005, 4, 1, 5, 0, tzinfo=UTC),
        "open": 1.5032,
        "high": 1.5064,
        "low": 1.4489,
        "close": 1.4604,
        "volume": 642646396.0,
        "vwap": 1.469,
        "trades": 82132,
    }
    assert int(page.frame["ts"].dt.epoch("ms")[0]) == 1112331600000
    # 2005-04-04 is after the DST change: 00:00 New York is 04:00Z.
    assert page.frame["ts"][1] == datetime(2005, 4, 4, 4, 0, tzinfo=UTC)


def test_optional_fields_absent_become_nulls_and_no_results_is_an_empty_typed_frame() -> None:
    body = {
        "ticker": "X:BTCUSD",
        "adjusted": True,
        "queryCount": 1,
        "resultsCount": 1,
        "status": "OK",
        "request_id": "abc",
        "results": [{"o": 1, "h": 2, "l": 0.5, "c": 1.5, "v": 0.25, "t": 1704067200000}],
    }
    page = decode_page(json.dumps(body).encode(), ticker="X:BTCUSD", adjusted=True)
    assert page.frame.schema == BAR_SCHEMA
    assert page.frame.row(0) == (
        datetime(2024, 1, 1, tzinfo=UTC),
        1.0,
        2.0,
        0.5,
        1.5,
        0.25,
        None,
        None,
    )
    del body["results"]
    empty = decode_page(json.dumps(body).encode(), ticker="X:BTCUSD", adjusted=True)
    assert empty.frame.schema == BAR_SCHEMA and empty.frame.height == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ticker": "MSFT"}, "answered for 'MSFT'"),
        ({"adjusted": False}, "adjusted=False"),
        ({"results": "no bars"}, "breaks the aggregates schema"),
        ({"results": [["a", "list"]]}, "breaks the aggregates schema"),
        ({"status": "ERROR"}, "unexpected body"),
    ],
)
def test_schema_breaking_bodies_fail_with_the_request_id(change: dict, message: str) -> None:
    body = json.loads((FIXTURES / "aggs_AAPL_1_day_2005-04-01_2005-04-04.json").read_text())
    body.update(change)
    with pytest.raises(PolygonResponseError, match=message) as raised:
        decode_page(json.dumps(body).encode(), ticker="AAPL", adjusted=True)
    assert "12afda77aab3b1936c5fb6ef4241ae42" in str(raised.value)


def test_values_of_the_wrong_type_are_never_coerced_but_named() -> None:
    body = json.loads((FIXTURES / "aggs_AAPL_1_day_2005-04-01_2005-04-04.json").read_text())
    good = body["results"][0]
    body["results"] = [
        good | {"o": True},
        good | {"n": 100000000000000000000},
        good | {"c": "one"},
        good | {"v": "12.5"},
        good | {"vw": float("inf")},
        {k: v for k, v in good.items() if k != "t"},
        good,
    ]
    page = decode_page(json.dumps(body).encode(), ticker="AAPL", adjusted=True)
    frame = page.frame
    assert frame.height == 7, "every bar is kept, to be quarantined with its reason"
    assert frame["open"][0] is None and frame["trades"][1] is None and frame["close"][2] is None
    assert frame["defects"].to_list() == [
        ["open is a boolean (true), not a number"],
        ["trades is not an integer in range (100000000000000000000)"],
        ['close is a string ("one"), not a number'],
        ['volume is a string ("12.5"), not a number'],
        ["vwap is not finite (Infinity)"],
        [],
        [],
    ]
    assert frame["volume"][3] is None and frame["vwap"][4] is None
    assert frame["ts"][5] is None
    assert frame.row(6)[:8] == decode_page(
        json.dumps(body | {"results": [good]}).encode(), ticker="AAPL", adjusted=True
    ).frame.row(0)


@pytest.mark.parametrize(
    ("change", "defect"),
    [
        ({"t": 1112587200000.5}, "ts is not an integer in range (1112587200000.5)"),
        ({"n": 2.5}, "trades is not an integer in range (2.5)"),
        ({"n": 9007199254740993}, None),  # beyond a float's exact integers, within int64
    ],
)
def test_an_integer_field_is_never_truncated(change: dict, defect: str | None) -> None:
    body = json.loads((FIXTURES / "aggs_AAPL_1_day_2005-04-01_2005-04-04.json").read_text())
    body["results"][0] |= change
    frame = decode_page(json.dumps(body).encode(), ticker="AAPL", adjusted=True).frame
    assert frame["defects"][0].to_list() == ([defect] if defect else [])
    if defect is None:
        assert frame["trades"][0] == 9007199254740993, "read exactly"


# -- pagination and data ------------------------------------------------------------------


def test_pagination_over_three_pages_loses_and_repeats_nothing(sim: Simulator) -> None:
    client = PolygonClient(KEY, "http://polygon.test", transport=sim.transport())
    pages = list(client.aggregate_pages("AAPL", 1, "minute", date(2024, 1, 1), date(2024, 12, 31)))
    assert len(pages) >= 3
    assert all(p.frame.height <= 50_000 for p in pages)
    assert len({p.request_id for p in pages}) == len(pages)
    got = pl.concat([p.frame for p in pages])
    assert got["ts"].is_unique().all()
    assert got["ts"].is_sorted()
    assert got.equals(expected_frame(sim, "AAPL", "minute", date(2024, 1, 1), date(2024, 12, 31)))
    assert len(sim.requests) == len(pages)
    assert "limit=50000" in sim.requests[0] and "adjusted=true" in sim.requests[0]
    assert all("cursor=" in r for r in sim.requests[1:])


def test_next_url_is_followed_on_the_configured_host_only(sim: Simulator) -> None:
    sim.base_url = "https://attacker.example"
    client = PolygonClient(KEY, "http://polygon.test", transport=sim.transport())
    frame = client.aggregates("MSFT", 1, "minute", date(2024, 1, 1), date(2024, 6, 30))
    assert frame.height > 50_000  # needed a second page, fetched from polygon.test


def test_crypto_symbol_maps_to_polygon_ticker_and_trades_24_7(sim: Simulator) -> None:
    ticker = AssetClass("crypto").market.provider_ticker("btc")
    assert ticker == "X:BTCUSD"
    client = PolygonClient(KEY, "http://polygon.test", transport=sim.transport())
    daily = client.aggregates(ticker, 1, "day", date(2024, 1, 1), date(2024, 1, 31))
    assert daily.height == 31
    assert daily["ts"][0] == datetime(2024, 1, 1, tzinfo=UTC)
    assert (daily["volume"] % 1 != 0).any(), "crypto volume is fractional"


def test_stock_daily_bars_follow_nyse_sessions(sim: Simulator) -> None:
    client = PolygonClient(KEY, "http://polygon.test", transport=sim.transport())
    daily = client.aggregates("SPY", 1, "day", date(2024, 11, 25), date(2024, 12, 1))
    # Thanksgiving (28th) closed; weekend closed; 00:00 New York = 05:00Z in winter.
    assert [t.day for t in daily["ts"]] == [25, 26, 27, 29]
    assert all(t.hour == 5 for t in daily["ts"])
    weekend = client.aggregates("SPY", 1, "minute", date(2024, 11, 30), date(2024, 12, 1))
    assert weekend.height == 0 and weekend.schema == BAR_SCHEMA


def test_a_split_revises_adjusted_history_and_keeps_it_continuous(sim: Simulator) -> None:
    client = PolygonClient(KEY, "http://polygon.test", transport=sim.transport())
    june = (date(2024, 6, 1), date(2024, 6, 30))
    before = client.aggregates("NVDA", 1, "day", *june)
    sim.split("NVDA", date(2024, 6, 10), 10.0)
    adjusted = client.aggregates("NVDA", 1, "day", *june)
    unadjusted = client.aggregates("NVDA", 1, "day", *june, adjusted=False)
    split_at = pl.col("ts") >= datetime(2024, 6, 10, 4, tzinfo=UTC)
    # Adjusted: the whole series is a tenth, as continuous across the split as before it.
    assert adjusted["close"].to_list() == pytest.approx((before["close"] / 10).to_list(), abs=1e-4)
    assert adjusted["volume"].to_list() == pytest.approx((before["volume"] * 10).to_list())
    # Unadjusted: the price drops to a tenth on the split day, and only from there.
    assert unadjusted.filter(~split_at).equals(before.filter(~split_at))
    assert unadjusted.filter(split_at)["close"].to_list() == pytest.approx(
        (before.filter(split_at)["close"] / 10).to_list(), abs=1e-4
    )


# -- faults, over a real loopback socket -------------------------------------------------


def test_429_waits_for_retry_after_then_succeeds(sim: Simulator, server) -> None:
    sim.inject(Faults(rate_limited=1, retry_after=1))
    started = time.monotonic()
    frame = socket_client(server).aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 31))
    assert time.monotonic() - started >= 0.95
    assert frame.height == 21
    assert len(sim.requests) == 2


def test_5xx_burst_is_retried(sim: Simulator, server) -> None:
    sim.inject(Faults(server_errors=3))
    frame = socket_client(server).aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 31))
    assert frame.height == 21
    assert len(sim.requests) == 4


def test_persistent_5xx_gives_up_after_the_attempt_budget(sim: Simulator, server) -> None:
    sim.inject(Faults(server_errors=-1))
    with pytest.raises(PolygonUnavailable, match=r"AAPL kept failing.*502"):
        socket_client(server).aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 31))
    assert len(sim.requests) == FAST_RETRY.max_attempts


def test_total_retry_time_is_bounded(sim: Simulator, server) -> None:
    sim.inject(Faults(rate_limited=-1, retry_after=1))
    policy = RetryPolicy(max_attempts=50, max_total_seconds=2.5, initial_backoff=0.01)
    started = time.monotonic()
    with pytest.raises(PolygonUnavailable, match="429"):
        PolygonClient(KEY, server.url, retry=policy).aggregates(
            "AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 5)
        )
    assert time.monotonic() - started < 5
    assert 2 <= len(sim.requests) <= 4


def test_slow_replies_time_out_and_are_retried(sim: Simulator, server) -> None:
    sim.inject(Faults(delay_seconds=0.6), "AAPL")
    with pytest.raises(PolygonUnavailable, match="ReadTimeout"):
        socket_client(server, timeout=0.2).aggregates(
            "AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 5)
        )
    assert len(sim.requests) == FAST_RETRY.max_attempts
    frame = socket_client(server, timeout=5).aggregates(
        "AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 5)
    )
    assert frame.height == 4  # Jan 2-5, 2024


def test_connection_refused_is_retried_then_reported(server) -> None:
    url = server.url
    server.shutdown()
    server.server_close()
    with pytest.raises(PolygonUnavailable, match="ConnectError"):
        PolygonClient(KEY, url, retry=FAST_RETRY).aggregates(
            "AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 5)
        )


def test_truncated_json_fails_at_once_with_the_request_id(sim: Simulator, server) -> None:
    sim.inject(Faults(truncated=1))
    with pytest.raises(
        PolygonResponseError, match=r"malformed JSON for AAPL \(request id [0-9a-f]{32}"
    ):
        socket_client(server).aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 31))
    assert len(sim.requests) == 1


def test_not_authorized_fails_at_once_naming_ticker_and_provider_text(sim: Simulator, server):
    sim.inject(Faults(not_authorized=True), "X:SOLUSD")
    with pytest.raises(
        PolygonAuthError, match=r"X:SOLUSD \(403\): NOT_AUTHORIZED: You are not entitled"
    ):
        socket_client(server).aggregates(
            "X:SOLUSD", 1, "minute", date(2024, 1, 1), date(2024, 1, 2)
        )
    assert len(sim.requests) == 1
    # Other tickers are unaffected.
    assert (
        socket_client(server)
        .aggregates("AAPL", 1, "day", date(2024, 1, 2), date(2024, 1, 2))
        .height
        == 1
    )


def test_wrong_key_is_401_and_final(sim: Simulator, server) -> None:
    client = PolygonClient("not-the-key", server.url, retry=FAST_RETRY)
    with pytest.raises(PolygonAuthError, match=r"AAPL \(401\): ERROR: Unknown API Key"):
        client.aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 5))
    assert len(sim.requests) == 1


def test_bars_breaking_ohlc_rules_and_repeated_timestamps_reach_the_caller(sim: Simulator, server):
    sim.inject(Faults(bad_ohlc_every=5, repeat_timestamp_every=7), "AAPL")
    frame = socket_client(server).aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 3, 31))
    assert frame.filter(pl.col("high") < pl.col("low")).height == frame.height // 5
    assert frame["ts"].is_duplicated().sum() > 0


# -- secrets -----------------------------------------------------------------------------


def test_the_key_never_leaks(sim: Simulator, server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    client = socket_client(server)
    seen.append(repr(client))
    seen.append(
        str(client.aggregates("AAPL", 1, "minute", date(2024, 1, 1), date(2024, 6, 30)).head())
    )
    scenarios = [
        Faults(server_errors=-1, after_requests=1),  # fails mid-pagination, after page one
        Faults(truncated=1, after_requests=1),
        Faults(not_authorized=True, after_requests=1),
        Faults(rate_limited=-1, after_requests=1, retry_after=0),
        Faults(echo_key=True, after_requests=1),  # a gateway that reflects the key
    ]
    for faults in scenarios:
        sim.clear_faults()
        sim.inject(faults)
        with pytest.raises(Exception) as raised:
            list(client.aggregate_pages("AAPL", 1, "minute", date(2024, 1, 1), date(2024, 6, 30)))
        seen += [str(raised.value), repr(raised.value), str(raised.value.__cause__)]
        seen += [str(raised.value.__context__)]
    wrong = PolygonClient("pk_live_WRONG_KEY_0001", server.url, retry=FAST_RETRY)
    with pytest.raises(PolygonAuthError) as refused:
        wrong.aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 2))
    seen += [str(refused.value), repr(wrong)]

    everything = "\n".join(seen + caplog.messages + [r.getMessage() for r in caplog.records])
    everything += "\n".join(sim.requests)
    assert caplog.records, "the scenarios logged retries"
    assert KEY not in everything
    assert "pk_live_WRONG_KEY_0001" not in everything
    assert "apiKey" not in "\n".join(sim.requests)


# -- grouped daily ----------------------------------------------------------------------


def replying(body: bytes) -> httpx.MockTransport:
    """A provider that answers every request with `body` (a recorded or crafted response)."""
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


def test_recorded_grouped_bar_is_moved_from_the_close_to_its_day_start() -> None:
    content = (FIXTURES / "grouped_stocks_2005-04-04.json").read_bytes()
    client = PolygonClient(KEY, "http://recorded", transport=replying(content))
    page = client.grouped_daily(Market.STOCK, date(2020, 10, 14), {"GIK", "AAPL"})
    assert page.request_id == "eae3ded2d6d43f978125b7a8a609fad9"
    (bar,) = page.frame.to_dicts()
    # t = 1602705600000 is 16:00 New York, the session's close; range bars start at 00:00.
    assert bar.pop("ts") == datetime(2020, 10, 14, 4, 0, tzinfo=UTC)
    assert bar == {
        "ticker": "GIK",
        "open": 9.99,
        "high": 10.02,
        "low": 9.9,
        "close": 10.02,
        "volume": 895345.0,
        "vwap": 9.9979,
        "trades": 96,
        "defects": [],
    }
    assert client.grouped_daily(Market.STOCK, date(2020, 10, 14), {"AAPL"}).frame.height == 0


def test_grouped_bars_from_the_simulator_equal_its_range_bars(sim: Simulator, server) -> None:
    day = date(2024, 3, 12)
    with socket_client(server) as client:
        page = client.grouped_daily(Market.STOCK, day, {"AAPL", "MSFT"})
        assert sorted(page.frame["ticker"]) == ["AAPL", "MSFT"]
        for ticker in ("AAPL", "MSFT"):
            grouped = page.frame.filter(pl.col("ticker") == ticker).drop("ticker", "defects")
            assert grouped.equals(expected_frame(sim, ticker, "day", day, day))
        crypto = client.grouped_daily(Market.CRYPTO, day, {"X:BTCUSD"})
        assert crypto.frame.drop("ticker", "defects").equals(
            expected_frame(sim, "X:BTCUSD", "day", day, day)
        )


def test_grouped_values_of_the_wrong_type_are_named_and_odd_tickers_ignored() -> None:
    bar = {"o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 10, "t": 1710273600000}
    body = {
        "status": "OK",
        "adjusted": True,
        "request_id": "r1",
        "results": [
            {"T": "AAPL", **bar, "o": "1.0"},
            {"T": 5, **bar},
            {"T": ["MSFT"], **bar},
            {"T": "MSFT", **bar},
        ],
    }
    client = PolygonClient(KEY, "http://crafted", transport=replying(json.dumps(body).encode()))
    frame = client.grouped_daily(Market.STOCK, date(2024, 3, 12), {"AAPL", "MSFT"}).frame
    assert frame["ticker"].to_list() == ["AAPL", "MSFT"]
    assert frame["defects"].to_list() == [['open is a string ("1.0"), not a number'], []]
    assert frame["open"].to_list() == [None, 1.0]
    wrong = {**body, "adjusted": False}
    client = PolygonClient(KEY, "http://crafted", transport=replying(json.dumps(wrong).encode()))
    with pytest.raises(PolygonResponseError, match="adjusted=False for the grouped daily bars"):
        client.grouped_daily(Market.STOCK, date(2024, 3, 12), {"AAPL"})
