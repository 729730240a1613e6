"""The simulator speaks Polygon's published aggregates contract (openapi-aggregates.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import jsonschema
import pytest

from marketdata_pipeline.polygon.client import PolygonAuthError, PolygonClient
from marketdata_pipeline.polygon.simulator import Simulator
from tests.conftest import PROJECT_DIR, free_port

SPEC = json.loads((Path(__file__).parent / "fixtures/polygon/openapi-aggregates.json").read_text())
STOCKS = "/v2/aggs/ticker/{stocksTicker}/range/{multiplier}/{timespan}/{from}/{to}"
CRYPTO = "/v2/aggs/ticker/{cryptoTicker}/range/{multiplier}/{timespan}/{from}/{to}"
GROUPED_STOCKS = "/v2/aggs/grouped/locale/us/market/stocks/{date}"
GROUPED_CRYPTO = "/v2/aggs/grouped/locale/global/market/crypto/{date}"


def response_schema(path: str) -> dict:
    return SPEC["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]


def parameter_names(path: str) -> set[str]:
    return {p["name"] for p in SPEC["paths"][path]["get"]["parameters"]}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(transport=Simulator().transport(), base_url="http://sim") as client:
        yield client


@pytest.mark.parametrize(
    ("spec_path", "url"),
    [
        (STOCKS, "/v2/aggs/ticker/AAPL/range/1/minute/2024-01-02/2024-01-03?limit=500"),
        (STOCKS, "/v2/aggs/ticker/SPY/range/1/day/2024-01-01/2024-12-31?adjusted=false"),
        (STOCKS, "/v2/aggs/ticker/AAPL/range/1/day/2024-01-06/2024-01-07"),  # weekend: no results
        (STOCKS, "/v2/aggs/ticker/MSFT/range/15/minute/2024-01-02/2024-01-02?sort=desc"),
        (CRYPTO, "/v2/aggs/ticker/X:BTCUSD/range/1/hour/2024-01-01/2024-01-03?limit=10"),
        (GROUPED_STOCKS, "/v2/aggs/grouped/locale/us/market/stocks/2024-01-02"),
        (GROUPED_CRYPTO, "/v2/aggs/grouped/locale/global/market/crypto/2024-01-02"),
    ],
)
def test_responses_validate_against_the_spec(http: httpx.Client, spec_path: str, url: str) -> None:
    response = http.get(url)
    assert response.status_code == 200
    body = response.json()
    jsonschema.validate(body, response_schema(spec_path))
    assert body["status"] == "OK"
    assert body["resultsCount"] == len(body.get("results", []))


def test_simulator_accepts_every_documented_parameter(http: httpx.Client) -> None:
    assert parameter_names(STOCKS) == {
        "stocksTicker", "multiplier", "timespan", "from", "to", "adjusted", "sort", "limit"
    }  # fmt: skip
    response = http.get(
        "/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-02-01",
        params={"adjusted": "false", "sort": "desc", "limit": 5},
    )
    body = response.json()
    assert body["adjusted"] is False
    stamps = [bar["t"] for bar in body["results"]]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) == 5


def test_limit_counts_base_bars(http: httpx.Client) -> None:
    # From 09:30 New York (14:30Z), where a bar exists almost every minute.
    body = http.get("/v2/aggs/ticker/AAPL/range/5/minute/1704205800000/2024-01-02?limit=50").json()
    assert body["queryCount"] <= 50
    assert body["resultsCount"] == 10  # ten 5-minute bars from 50 minute bars
    assert "next_url" in body


def test_timestamps_are_window_starts_in_ms(http: httpx.Client) -> None:
    url = "/v2/aggs/ticker/AAPL/range/1/{}/2024-07-01/2024-07-01?limit=50000"
    stamps = [bar["t"] for bar in http.get(url.format("minute")).json()["results"]]
    assert 1719840600000 in stamps  # 09:30 New York (EDT) = 13:30Z, the session's first minute
    assert min(stamps) >= 1719820800000  # nothing before 04:00 New York (EDT) = 08:00Z
    hours = http.get(url.format("hour")).json()["results"]
    assert hours[0]["t"] == 1719820800000  # the 04:00 window, whichever minute traded first


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/v2/aggs/ticker/AAPL/range/1/fortnight/2024-01-01/2024-01-02", 400),
        ("/v2/aggs/ticker/AAPL/range/0/day/2024-01-01/2024-01-02", 400),
        ("/v2/aggs/ticker/AAPL/range/1/day/yesterday/2024-01-02", 400),
        ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-02?limit=lots", 400),
        ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-02?cursor=garbage", 400),
        ("/v3/nothing", 404),
    ],
)
def test_bad_requests_get_polygon_error_bodies(http: httpx.Client, url: str, status: int) -> None:
    response = http.get(url)
    assert response.status_code == status
    body = response.json()
    assert body["status"] == "ERROR" and body["error"] and body["request_id"]


def test_auth_by_bearer_or_api_key_query() -> None:
    sim = Simulator(api_key="k-123")
    with httpx.Client(transport=sim.transport(), base_url="http://sim") as http:
        url = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-02"
        assert http.get(url).json()["error"] == "API Key was not provided"
        assert http.get(url, params={"apiKey": "nope"}).status_code == 401
        assert http.get(url, params={"apiKey": "k-123"}).status_code == 200
        assert http.get(url, headers={"Authorization": "Bearer k-123"}).status_code == 200


def test_same_request_gives_the_same_bars(http: httpx.Client) -> None:
    url = "/v2/aggs/ticker/TSLA/range/1/minute/2024-03-01/2024-03-01?limit=50000"
    first, second = http.get(url).json(), http.get(url).json()
    assert first["results"] == second["results"]
    assert first["request_id"] != second["request_id"]


def test_stock_minute_bars_span_extended_hours_with_a_few_missing(http: httpx.Client) -> None:
    body = http.get("/v2/aggs/ticker/AAPL/range/1/minute/2024-03-01/2024-03-01?limit=50000").json()
    # 04:00-20:00 New York (EST: 09:00-01:00Z); the session 09:30-16:00 is 14:30-21:00Z.
    day = 1709269200000  # 2024-03-01 00:00 New York
    minutes = [(bar["t"] - day) // 60_000 for bar in body["results"]]
    regular = [m for m in minutes if 570 <= m < 960]
    extended = [m for m in minutes if not 570 <= m < 960]
    assert 380 <= len(regular) < 390, "a bar almost every session minute, a few have none"
    assert extended and min(extended) >= 240 and max(extended) < 1200
    assert len(extended) < 570 / 2, "extended hours are sparse"
    for bar in body["results"]:
        assert bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"]
        # vwap may sit a hair outside [low, high], as the provider's does
        assert bar["l"] * (1 - 0.0005) <= bar["vw"] <= bar["h"] * (1 + 0.0005)


def test_cli_simulator_on_a_socket_with_a_fault() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "marketdata_pipeline", "simulator", "--port", str(port),
         "--fault", "not-authorized@X:ETHUSD"],
        cwd=PROJECT_DIR,
        env={**os.environ, "SIMULATOR_API_KEY": "local-key"},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}" in process.stdout.readline()
        client = PolygonClient("local-key", f"http://127.0.0.1:{port}")
        frame = client.aggregates("AAPL", 1, "day", date(2024, 1, 1), date(2024, 1, 31))
        assert frame.height == 21
        with pytest.raises(PolygonAuthError, match="X:ETHUSD"):
            client.aggregates("X:ETHUSD", 1, "day", date(2024, 1, 1), date(2024, 1, 2))
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cli_simulator_rejects_an_unknown_fault_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "marketdata_pipeline", "simulator", "--fault", "gremlins"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown fault 'gremlins'" in result.stderr
