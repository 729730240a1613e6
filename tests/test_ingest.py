"""The pipeline path without Dagster: months load in order while the next is read ahead."""

from __future__ import annotations

import threading
from datetime import date

import psycopg
import pytest

from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.pipeline import ingest
from marketdata_pipeline.polygon.client import PolygonClient, PolygonUnavailable, RetryPolicy
from marketdata_pipeline.polygon.simulator import Faults, Simulator

MONTHS = [date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)]


@pytest.fixture
def conn(migrated_conn: psycopg.Connection) -> psycopg.Connection:
    return migrated_conn


def btc_minutes(sim: Simulator) -> PolygonClient:
    # About 44,500 bars a month: each 50,000-bar page ends inside the next month.
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    return PolygonClient(None, "http://simulator", transport=sim.transport(), retry=quick)


def loaded_months(conn) -> list[date]:
    rows = conn.execute(
        "SELECT DISTINCT date_trunc('month', ts, 'UTC')::date FROM bars_minute ORDER BY 1"
    ).fetchall()
    return [month for (month,) in rows]


def read_ahead_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_a_failure_mid_stream_keeps_the_months_before_it_and_is_raised(conn) -> None:
    sim = Simulator()
    sim.inject(Faults(server_errors=-1, after_requests=2))  # page three fails: March
    outcomes = []
    with btc_minutes(sim) as client, pytest.raises(PolygonUnavailable):
        for outcome in ingest(
            client,
            conn,
            market=Market.CRYPTO,
            timeframe=Timeframe.MINUTE,
            symbol="BTC",
            months=MONTHS,
        ):
            outcomes.append(outcome)
    assert [o.window.month for o in outcomes] == MONTHS[:2]
    expected = [
        len(sim.expected_bars("X:BTCUSD", "minute", m, m.replace(day=d))["t"])
        for m, d in zip(MONTHS[:2], (31, 29), strict=True)
    ]
    assert [o.load.rows_loaded if o.load else None for o in outcomes] == expected
    assert loaded_months(conn) == MONTHS[:2]
    assert read_ahead_workers() == []


def test_leaving_early_loads_nothing_more_and_stops_the_worker(conn) -> None:
    with btc_minutes(Simulator()) as client:
        outcomes = ingest(
            client,
            conn,
            market=Market.CRYPTO,
            timeframe=Timeframe.MINUTE,
            symbol="BTC",
            months=MONTHS,
        )
        first = next(outcomes)
        outcomes.close()  # the worker had February validated and waiting
    assert first.window == Window.of_month(Market.CRYPTO, Timeframe.MINUTE, "BTC", MONTHS[0])
    assert loaded_months(conn) == MONTHS[:1]
    assert read_ahead_workers() == []
