"""The simulator behaves like the provider: the shape of its bars, its clock, its plans, its
edge cases, and every fault it can inject on demand."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import click
import httpx
import numpy as np
import pytest

from marketdata_pipeline.cli.simulator import parse_fault
from marketdata_pipeline.polygon.simulator import (
    TIMESPANS,
    Faults,
    Simulator,
    SimulatorHTTPServer,
    serve,
)
from tests.conftest import PROJECT_DIR

NY = ZoneInfo("America/New_York")
# Monday to Friday: before the March DST change, after it, after the November change.
WEEKS = [date(2024, 3, 4), date(2024, 3, 11), date(2024, 11, 4)]
RECENT = f"{date.today() - timedelta(days=40)}/{date.today() - timedelta(days=30)}"  # free plan
PLAN_MESSAGE = (
    "Your plan doesn't include this data timeframe. Please upgrade your plan at "
    "https://polygon.io/pricing"
)


def http_client(sim: Simulator, **headers: str) -> httpx.Client:
    return httpx.Client(transport=sim.transport(), base_url="http://sim", headers=headers)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with http_client(Simulator()) as client:
        yield client


@pytest.fixture
def running() -> Iterator[tuple[Simulator, SimulatorHTTPServer]]:
    sim = Simulator(plan="free")
    server = serve(sim)
    yield sim, server
    server.shutdown()
    server.server_close()


def follow(client: httpx.Client, url: str, max_pages: int = 200) -> list[dict]:
    """Every page of a request, following next_url by path and query."""
    pages = [client.get(url).json()]
    while "next_url" in pages[-1] and len(pages) < max_pages:
        parts = urlsplit(pages[-1]["next_url"])
        pages.append(client.get(f"{parts.path}?{parts.query}").json())
    return pages


def minutes_of_day(t: np.ndarray, day: date) -> np.ndarray:
    midnight = int(datetime.combine(day, datetime.min.time(), NY).timestamp() * 1000)
    return (t - midnight) // 60_000


def one_day(bars: dict[str, np.ndarray], day: date) -> dict[str, np.ndarray]:
    minute = minutes_of_day(bars["t"], day)
    keep = (minute >= 0) & (minute < 24 * 60)
    return {**{k: v[keep] for k, v in bars.items()}, "m": minute[keep]}


# -- the shape of the bars ----------------------------------------------------------------


@pytest.mark.parametrize("monday", WEEKS)
@pytest.mark.parametrize("ticker", ["AAPL", "SPY", "NVDA"])
def test_regular_session_is_dense_and_extended_hours_sparse(ticker: str, monday: date) -> None:
    bars = Simulator().expected_bars(ticker, "minute", monday, monday + timedelta(days=4))
    for offset in range(5):
        minute = one_day(bars, monday + timedelta(days=offset))["m"]
        regular = np.count_nonzero((minute >= 570) & (minute < 960))
        pre = np.count_nonzero((minute >= 240) & (minute < 570))
        after = np.count_nonzero((minute >= 960) & (minute < 1200))
        assert regular >= 385, "a bar almost every session minute"
        assert 0 < pre < 330 / 2, "fewer than half of 04:00-09:30 minutes have a bar"
        assert 0 < after < 240 / 2
        assert minute.min() >= 240 and minute.max() < 1200


@pytest.mark.parametrize("monday", WEEKS)
@pytest.mark.parametrize("ticker", ["AAPL", "SPY", "NVDA"])
def test_minute_volume_is_u_shaped(ticker: str, monday: date) -> None:
    bars = Simulator().expected_bars(ticker, "minute", monday, monday + timedelta(days=4))
    for offset in range(5):
        day = one_day(bars, monday + timedelta(days=offset))
        v, m = day["v"], day["m"]
        midday = v[(m >= 12 * 60) & (m < 14 * 60)].mean()
        first = v[(m >= 570) & (m < 585)].mean()
        last = v[(m >= 945) & (m < 960)].mean()
        assert first > 3 * midday and last > 3 * midday
        assert 4 < v[m == 570][0] / midday < 20, "the first minute is several times midday"
        assert v[m == 959][0] > 2 * midday, "the closing minute is heavy"
        extended = v[(m < 570) | (m >= 960)]
        assert extended.mean() < 0.3 * midday, "extended hours trade a small fraction"


def test_neighbouring_minutes_vary_but_never_jump_50x_within_a_part_of_the_day() -> None:
    bars = Simulator().expected_bars("MSFT", "minute", date(2024, 5, 1), date(2024, 5, 31))
    minute = (bars["t"] - 4 * 3_600_000) % 86_400_000 // 60_000  # EDT minute of the day
    part = np.digitize(minute, [570, 960])  # pre-market, session, after hours
    same = (np.diff(bars["t"]) == 60_000) & (np.diff(part) == 0)
    ratio = bars["v"][1:][same] / bars["v"][:-1][same]
    assert ratio.max() < 50 and ratio.min() > 1 / 50
    changes = np.abs(np.log(ratio[part[1:][same] == 1]))
    assert 0.1 < np.median(changes) < 0.7, "a few tens of percent from minute to minute"


def test_daily_volume_is_about_the_sum_of_the_minutes() -> None:
    sim = Simulator()
    for ticker in ("AAPL", "X:ETHUSD"):
        daily = sim.expected_bars(ticker, "day", date(2024, 4, 1), date(2024, 4, 30))
        minutes = sim.expected_bars(ticker, "minute", date(2024, 4, 1), date(2024, 4, 30))
        zone = NY if ticker == "AAPL" else UTC
        days = [datetime.fromtimestamp(t / 1000, zone).date() for t in minutes["t"]]
        sums: Counter[date] = Counter()
        for day, volume in zip(days, minutes["v"], strict=True):
            sums[day] += volume
        ratios = [
            v / sums[datetime.fromtimestamp(t / 1000, zone).date()]
            for t, v in zip(daily["t"], daily["v"], strict=True)
        ]
        assert len(ratios) == len(sums) and min(ratios) > 0.8 and max(ratios) < 1.25


def test_crypto_trades_around_the_clock_busiest_in_the_afternoon_utc() -> None:
    bars = Simulator().expected_bars("X:BTCUSD", "minute", date(2024, 2, 5), date(2024, 2, 9))
    hour = bars["t"] % 86_400_000 // 3_600_000
    assert len(bars["t"]) > 5 * 1440 * 0.99
    assert set(hour.tolist()) == set(range(24))
    busy, quiet = bars["v"][(hour >= 13) & (hour < 16)].mean(), bars["v"][hour < 3].mean()
    assert 1.2 < busy / quiet < 3, "a mild daily cycle"
    assert (bars["v"] % 1 != 0).mean() > 0.9, "fractional coins"


def test_vwap_sits_outside_low_high_now_and_then_by_a_hair_at_most() -> None:
    sim = Simulator()
    sim.split("NVDA", date(2024, 6, 10), 10.0)
    for ticker in ("AAPL", "NVDA", "X:SOLUSD"):
        bars = sim.expected_bars(ticker, "minute", date(2024, 6, 1), date(2024, 6, 30))
        above = (bars["vw"] - bars["h"]) / bars["h"]
        below = (bars["l"] - bars["vw"]) / bars["l"]
        outside = (above > 0) | (below > 0)
        assert 1 / 400 < outside.mean() < 1 / 100, "about 1 bar in 200"
        assert max(above.max(), below.max()) <= 0.0005, "never beyond 0.05%"
        assert np.array_equal(np.round(bars["vw"], 4), bars["vw"])


def test_bars_keep_ohlc_rules_positive_prices_and_whole_trades() -> None:
    sim = Simulator()
    for ticker, span in (("AAPL", "minute"), ("SPY", "day"), ("X:BTCUSD", "minute")):
        bars = sim.expected_bars(ticker, span, date(2023, 1, 1), date(2023, 3, 31))
        low, high = bars["l"], bars["h"]
        assert (low > 0).all()
        assert (low <= np.minimum(bars["o"], bars["c"])).all()
        assert (np.maximum(bars["o"], bars["c"]) <= high).all()
        assert bars["n"].dtype == np.int64 and (bars["n"] >= 1).all()
        assert (bars["v"] > 0).all()


def test_bars_are_the_same_whatever_range_or_page_they_come_in(http: httpx.Client) -> None:
    day = http.get("/v2/aggs/ticker/TSLA/range/1/minute/2024-03-05/2024-03-05?limit=50000")
    pages = follow(http, "/v2/aggs/ticker/TSLA/range/1/minute/2024-03-01/2024-03-08?limit=333")
    bars = {bar["t"]: bar for page in pages for bar in page["results"]}
    assert all(bars[bar["t"]] == bar for bar in day.json()["results"])


# -- the clock ------------------------------------------------------------------------------


def test_no_bar_starts_after_the_clock(http: httpx.Client) -> None:
    now = datetime(2024, 3, 6, 11, 17, 30, tzinfo=NY)
    sim = Simulator(now=now, cache_pages=16)
    now_ms = int(now.timestamp() * 1000)
    with http_client(sim) as client:
        for url in (
            "/v2/aggs/ticker/AAPL/range/1/minute/2024-03-06/2024-03-08?limit=50000",
            "/v2/aggs/ticker/AAPL/range/1/minute/2024-03-06/2024-03-08?limit=50000&sort=desc",
            "/v2/aggs/ticker/X:BTCUSD/range/1/minute/2024-03-06/2024-03-06?limit=50000",
        ):
            stamps = [bar["t"] for bar in client.get(url).json()["results"]]
            assert max(stamps) <= now_ms
            assert max(stamps) > now_ms - 5 * 60_000, "the bars up to the current minute"
        minutes = client.get(
            "/v2/aggs/ticker/AAPL/range/1/minute/2024-03-06/2024-03-08?limit=50000"
        )
        assert minutes.json()["results"][-1]["t"] == now_ms - 30_000, "the started minute too"
        expected = sim.expected_bars("AAPL", "minute", date(2024, 3, 6), date(2024, 3, 8))
        assert [bar["t"] for bar in minutes.json()["results"]] == expected["t"].tolist()
        daily = client.get("/v2/aggs/ticker/AAPL/range/1/day/2024-03-01/2024-03-31").json()
        days = [datetime.fromtimestamp(b["t"] / 1000, NY).date() for b in daily["results"]]
        assert days[-1] == date(2024, 3, 6), "today's bar once it started, nothing later"

        # A page answered earlier is not the answer once the clock is moved back.
        sim.now = datetime(2024, 3, 5, 0, 0, tzinfo=NY)
        again = client.get("/v2/aggs/ticker/AAPL/range/1/day/2024-03-01/2024-03-31").json()
        assert again["resultsCount"] == 3  # March 1, 4 and the 5th (started at midnight)
        assert sim.expected_bars("AAPL", "day", date(2024, 3, 1), date(2024, 3, 31))["t"].size == 3
        with pytest.raises(ValueError, match="timezone-aware"):
            sim.now = datetime(2024, 3, 5)


def test_the_default_clock_is_the_real_one(http: httpx.Client) -> None:
    today = datetime.now(UTC).date()
    body = http.get(
        f"/v2/aggs/ticker/X:BTCUSD/range/1/minute/{today - timedelta(days=1)}/"
        f"{today + timedelta(days=2)}?limit=50000"
    ).json()
    assert body["results"][-1]["t"] <= datetime.now(UTC).timestamp() * 1000


# -- plans ----------------------------------------------------------------------------------


def test_free_plan_sixth_request_in_a_minute_is_429_per_key(running) -> None:
    _, server = running
    url = f"{server.url}/v2/aggs/ticker/AAPL/range/1/day/{RECENT}"
    with httpx.Client() as client:
        bearer = {"Authorization": "Bearer key-a"}
        statuses = [client.get(url, headers=bearer).status_code for _ in range(3)]
        statuses += [client.get(url, params={"apiKey": "key-a"}).status_code for _ in range(2)]
        assert statuses == [200] * 5
        refused = client.get(url, headers=bearer)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        body = refused.json()
        assert body["status"] == "ERROR" and body["request_id"]
        assert "exceeded the maximum requests per minute" in body["error"]
        # Another key, and requests without one, have their own minute.
        assert client.get(url, headers={"Authorization": "Bearer key-b"}).status_code == 200
        assert [client.get(url).status_code for _ in range(6)] == [200] * 5 + [429]


def test_free_plan_counts_a_key_across_connections_and_threads(running) -> None:
    _, server = running
    url = f"{server.url}/v2/aggs/ticker/MSFT/range/1/day/{RECENT}"
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def one_request() -> None:
        with httpx.Client(headers={"Authorization": "Bearer shared"}) as client:  # own socket
            start.wait()
            status = client.get(url).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one_request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(statuses) == [200] * 5 + [429] * 3


def test_free_plan_refuses_history_older_than_two_years() -> None:
    sim = Simulator(plan="free", now=datetime(2026, 11, 22, 12, tzinfo=UTC))
    with http_client(sim, Authorization="Bearer k") as client:
        old = client.get("/v2/aggs/ticker/AAPL/range/1/day/2023-11-01/2023-11-30")
        assert old.status_code == 403
        assert old.json() == {
            "status": "NOT_AUTHORIZED",
            "request_id": old.json()["request_id"],
            "message": PLAN_MESSAGE,
        }
        recent = client.get("/v2/aggs/ticker/AAPL/range/1/day/2025-11-01/2025-11-30")
        assert recent.status_code == 200 and recent.json()["resultsCount"] == 19
        grouped = client.get("/v2/aggs/grouped/locale/us/market/stocks/2023-11-01")
        assert grouped.status_code == 403
    assert sim.expected_bars("AAPL", "day", date(2023, 11, 1), date(2023, 11, 30))["t"].size == 0
    sim.plan = None
    assert sim.expected_bars("AAPL", "day", date(2023, 11, 1), date(2023, 11, 30))["t"].size == 21
    with pytest.raises(ValueError, match="unknown plan"):
        Simulator(plan="gold")


# -- provider details -----------------------------------------------------------------------


def raw_get(server: SimulatorHTTPServer, path: str) -> tuple[int, dict]:
    """GET exactly this path on the socket (httpx would normalize it)."""
    host, port = server.server_address[:2]
    connection = HTTPConnection(str(host), int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_percent_encoded_tickers_are_decoded(running) -> None:
    sim, server = running
    sim.plan = None
    status, encoded = raw_get(
        server, "/v2/aggs/ticker/X%3ABTCUSD/range/1/day/2024-01-01/2024-01-05"
    )
    _, plain = raw_get(server, "/v2/aggs/ticker/X:BTCUSD/range/1/day/2024-01-01/2024-01-05")
    assert status == 200
    assert encoded["ticker"] == "X:BTCUSD" and encoded["resultsCount"] == 5
    assert encoded["results"] == plain["results"]
    _, stock = raw_get(server, "/v2/aggs/ticker/%41APL/range/1/day/2024-01-02/2024-01-02")
    assert stock["ticker"] == "AAPL" and stock["resultsCount"] == 1


@pytest.mark.parametrize(
    "path",
    [
        "/v2/aggs/ticker/AAPL/range/1/day/1900-01-01/1969-12-31",
        "/v2/aggs/ticker/AAPL/range/1/minute/1960-01-01/1960-01-02",
        "/v2/aggs/ticker/AAPL/range/1/day/1980-01-01/1989-12-31",  # before the calendar
        "/v2/aggs/ticker/AAPL/range/1/day/2099-01-01/2100-12-31",  # after the calendar
        "/v2/aggs/ticker/AAPL/range/1/day/2101-01-01/9999-12-31",
        "/v2/aggs/ticker/X:BTCUSD/range/1/minute/2150-01-01/2150-01-02",
        "/v2/aggs/ticker/X:BTCUSD/range/1/day/0001-01-01/1969-12-31",
        "/v2/aggs/ticker/AAPL/range/1/day/99999999999999999999/999999999999999999999",
        f"/v2/aggs/ticker/AAPL/range/1/day/{'9' * 5000}/{'9' * 5001}",
        "/v2/aggs/grouped/locale/us/market/stocks/1900-01-02",
        "/v2/aggs/grouped/locale/global/market/crypto/2200-01-01",
    ],
)
def test_dates_outside_the_calendar_are_an_empty_ok(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "OK" and body["resultsCount"] == 0 and "results" not in body


@pytest.mark.parametrize("timespan", TIMESPANS)
def test_every_timespan_is_served_or_refused_the_providers_way(
    http: httpx.Client, timespan: str
) -> None:
    response = http.get(f"/v2/aggs/ticker/SPY/range/1/{timespan}/2024-03-01/2024-06-30?limit=50000")
    if timespan == "second":  # not synthesized: an entitlement the simulated plan lacks
        assert response.status_code == 403
        assert response.json()["status"] == "NOT_AUTHORIZED"
        assert "not entitled" in response.json()["message"]
        return
    assert response.status_code == 200
    bars = response.json()["results"]
    starts = [datetime.fromtimestamp(bar["t"] / 1000, NY) for bar in bars]
    if timespan in ("day", "week", "month", "quarter", "year"):
        assert all(s.hour == 0 and s.minute == 0 for s in starts), "midnight New York"
    window_starts = {
        "week": lambda s: s.weekday() == 6,  # Sunday
        "month": lambda s: s.day == 1,
        "quarter": lambda s: s.day == 1 and s.month in (1, 4, 7, 10),
        "year": lambda s: (s.month, s.day) == (1, 1),
        "hour": lambda s: s.minute == 0,
    }
    assert all(map(window_starts.get(timespan, lambda s: True), starts))
    assert len(bars) == {"week": 18, "month": 4, "quarter": 2, "year": 1}.get(timespan, len(bars))


def test_aggregates_are_built_from_their_base_bars(http: httpx.Client) -> None:
    minutes = http.get("/v2/aggs/ticker/AAPL/range/1/minute/2024-03-05/2024-03-05?limit=50000")
    hours = http.get("/v2/aggs/ticker/AAPL/range/1/hour/2024-03-05/2024-03-05?limit=50000")
    by_hour: dict[int, list[dict]] = {}
    for bar in minutes.json()["results"]:
        by_hour.setdefault(bar["t"] // 3_600_000 * 3_600_000, []).append(bar)
    for bar in hours.json()["results"]:
        inside = by_hour[bar["t"]]
        assert bar["v"] == pytest.approx(sum(m["v"] for m in inside))
        assert bar["o"] == inside[0]["o"] and bar["c"] == inside[-1]["c"]
        assert bar["h"] == max(m["h"] for m in inside) and bar["l"] == min(m["l"] for m in inside)


def test_pages_move_the_range_start_like_the_provider(http: httpx.Client) -> None:
    pages = follow(http, "/v2/aggs/ticker/MSFT/range/1/minute/2024-01-01/2024-06-30?limit=20000")
    assert [p["resultsCount"] for p in pages[:-1]] == [20000] * (len(pages) - 1)
    for page, following in itertools.pairwise(pages):
        path = urlsplit(page["next_url"]).path.split("/")
        assert int(path[-2]) == following["results"][0]["t"] and path[-1] == "2024-06-30"
    total = sum(p["resultsCount"] for p in pages)
    sim = Simulator()
    assert (
        total == sim.expected_bars("MSFT", "minute", date(2024, 1, 1), date(2024, 6, 30))["t"].size
    )


# -- faults ---------------------------------------------------------------------------------

RANGE = "/v2/aggs/ticker/AAPL/range/1/minute/2024-03-04/2024-03-08?limit=1000"


def fetch_all(faults: Faults | None, url: str = RANGE) -> list[dict]:
    sim = Simulator(api_key="k")
    if faults:
        sim.inject(faults)
    with http_client(sim, Authorization="Bearer k") as client:
        return follow(client, url)


def bars_of(pages: list[dict]) -> list[dict]:
    return [bar for page in pages for bar in page.get("results", [])]


def test_delayed_status_on_demand() -> None:
    pages = fetch_all(Faults(delayed=True))
    assert {page["status"] for page in pages} == {"DELAYED"}
    assert bars_of(pages) == bars_of(fetch_all(None))


@pytest.mark.parametrize("order", ["desc", "shuffled"])
def test_results_out_of_order_keep_the_same_bars(order: str) -> None:
    clean, broken = fetch_all(None), fetch_all(Faults(order=order))
    key = lambda bar: json.dumps(bar, sort_keys=True)  # noqa: E731
    assert sorted(map(key, bars_of(broken))) == sorted(map(key, bars_of(clean)))
    for page in broken:
        stamps = [bar["t"] for bar in page["results"]]
        if order == "desc":
            assert stamps == sorted(stamps, reverse=True)
        else:
            assert stamps != sorted(stamps) and stamps != sorted(stamps, reverse=True)
    assert broken == [dict(p, request_id=q["request_id"]) for p, q in zip(
        fetch_all(Faults(order=order)), broken, strict=True
    )], "the same disorder every time"  # fmt: skip
    with pytest.raises(ValueError, match="order"):
        Faults(order="sideways")


def test_late_bars_arrive_on_the_next_page_and_nothing_is_lost() -> None:
    clean, late = fetch_all(None), fetch_all(Faults(late_every=7))
    assert len(late) == len(clean) > 2
    assert sorted(b["t"] for b in bars_of(late)) == sorted(b["t"] for b in bars_of(clean))
    assert sum(p["resultsCount"] for p in late) == sum(p["resultsCount"] for p in clean)
    previous_last = clean[0]["results"][-1]["t"]
    second = [bar["t"] for bar in late[1]["results"]]
    assert second[0] < previous_last, "page two opens with bars held back from page one"
    last = [bar["t"] for bar in late[-1]["results"]]
    assert last != sorted(last), "the last page's own late bars come at its end"


def test_repeat_cursor_never_advances() -> None:
    sim = Simulator()
    sim.inject(Faults(repeat_cursor=True))
    with http_client(sim) as client:
        pages = follow(client, RANGE, max_pages=6)
    assert len(pages) == 6
    assert len({page["next_url"] for page in pages}) == 1
    assert pages[2]["results"] == pages[1]["results"] == pages[5]["results"]


def test_empty_results_counted_like_other_faults() -> None:
    sim = Simulator()
    sim.inject(Faults(empty_results=2))
    with http_client(sim) as client:
        url = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-31"
        bodies = [client.get(url).json() for _ in range(3)]
    for body in bodies[:2]:
        assert body["status"] == "OK" and body["resultsCount"] == 0
        assert "results" not in body and "next_url" not in body
    assert bodies[2]["resultsCount"] == 21


def test_wrong_types_appear_in_the_raw_json() -> None:
    sim = Simulator()
    sim.inject(Faults(wrong_types_every=10), "AAPL")
    with http_client(sim) as client:
        raw = client.get("/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-06-30").text
    assert raw.count('"o":true') == 124 // 10
    assert raw.count('"n":100000000000000000000') == 124 // 10
    bars = json.loads(raw)["results"]
    assert bars[9]["o"] is True and bars[10]["n"] == 10**20 and isinstance(bars[10]["o"], float)


def test_volume_spikes_on_demand() -> None:
    clean, spiked = fetch_all(None), fetch_all(Faults(spike_every=50))
    for page, clean_page in zip(spiked, clean, strict=True):
        for i, (bar, was) in enumerate(zip(page["results"], clean_page["results"], strict=True)):
            assert bar["v"] == pytest.approx(was["v"] * (200 if i % 50 == 49 else 1))
            assert {k: v for k, v in bar.items() if k != "v"} == {
                k: v for k, v in was.items() if k != "v"
            }


@pytest.mark.parametrize(
    ("headers", "params", "shown"),
    [
        ({"Authorization": "Bearer pk_SECRET_1"}, {}, "pk_SECRET_1"),
        ({}, {"apiKey": "pk_SECRET_2"}, "pk_SECRET_2"),
        ({}, {}, "none"),
    ],
)
def test_echo_key_reflects_the_presented_key(headers: dict, params: dict, shown: str) -> None:
    sim = Simulator()
    sim.inject(Faults(echo_key=True))
    with http_client(sim, **headers) as client:
        response = client.get(
            "/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-31", params=params
        )
    assert response.status_code == 502
    body = response.json()
    assert body["status"] == "ERROR" and body["request_id"]
    assert body["error"] == (
        f"upstream rejected request with Authorization: Bearer {shown} (apiKey={shown})"
    )


def test_faults_never_come_from_the_page_cache() -> None:
    sim = Simulator(cache_pages=8)
    url = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-31"
    with http_client(sim) as client:
        clean = client.get(url).json()
        sim.inject(Faults(delayed=True, order="desc"))
        broken = client.get(url).json()
        sim.clear_faults()
        assert client.get(url).json() == clean
    assert broken["status"] == "DELAYED" and broken["results"] == clean["results"][::-1]


# -- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("delayed", (None, "delayed", True)),
        ("order=desc", (None, "order", "desc")),
        ("order=shuffled@AAPL", ("AAPL", "order", "shuffled")),
        ("late=5", (None, "late_every", 5)),
        ("repeat-cursor", (None, "repeat_cursor", True)),
        ("empty=3@X:BTCUSD", ("X:BTCUSD", "empty_results", 3)),
        ("empty", (None, "empty_results", -1)),
        ("wrong-types=20", (None, "wrong_types_every", 20)),
        ("spike=100", (None, "spike_every", 100)),
        ("echo-key", (None, "echo_key", True)),
        ("slow=0.5", (None, "delay_seconds", 0.5)),
    ],
)
def test_cli_parses_the_new_faults(spec: str, parsed: tuple[str | None, str, Any]) -> None:
    assert parse_fault(spec) == parsed
    _, name, value = parsed
    setting: dict[str, Any] = {name: value}
    assert getattr(Faults(**setting), name) == value  # a valid setting


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("order", "order needs a value"),
        ("order=sideways", "order=sideways"),
        ("late=often", "late=often"),
        ("spike=2.5", "spike=2.5"),
        ("delayed=maybe", "delayed=maybe"),
    ],
)
def test_cli_names_a_bad_fault_value(spec: str, message: str) -> None:
    with pytest.raises(click.BadParameter, match=message):
        parse_fault(spec)


def test_cli_plan_is_a_choice() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "marketdata_pipeline", "simulator", "--plan", "gold"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "'gold' is not one of 'free', 'unlimited'" in result.stderr


def test_fault_free_pages_render_as_the_json_encoder_would() -> None:
    # A fault that breaks no bar of these pages sends them through json.dumps instead.
    url = "/v2/aggs/ticker/X:ETHUSD/range/1/minute/2024-01-01/2024-01-02?limit=2000&sort=desc"
    fast, slow = fetch_all(None, url), fetch_all(Faults(spike_every=10**9), url)
    assert [dict(p, request_id="") for p in fast] == [dict(p, request_id="") for p in slow]
