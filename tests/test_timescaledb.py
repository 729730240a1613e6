"""The TimescaleDB path of the migrations, on PGlite with TimescaleDB 2.23 (see DESIGN.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from marketdata_pipeline.domain import Timeframe
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import reading
from marketdata_pipeline.warehouse.loading import refresh_aggregate
from marketdata_pipeline.warehouse.reading import BarRange, BarSize
from tests.conftest import LATEST, run_cli


@pytest.fixture(scope="module")
def migrated(timescaledb_url: str) -> str:
    result = run_cli("db", "migrate", env={"DATABASE_URL": timescaledb_url})
    assert result.returncode == 0, result.stderr
    assert "003_bars_storage.timescaledb.sql" in result.stdout
    return timescaledb_url


def test_bars_tables_are_hypertables_compressed_by_symbol(migrated: str) -> None:
    with db.connection(migrated) as conn:
        hypertables = conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables"
        ).fetchall()
        segmentby = conn.execute(
            "SELECT hypertable_name, attname FROM timescaledb_information.compression_settings "
            "WHERE segmentby_column_index IS NOT NULL"
        ).fetchall()
        policies = conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression'"
        ).fetchall()
    assert {h for (h,) in hypertables} == {"bars_daily", "bars_minute"}
    assert set(segmentby) == {("bars_daily", "symbol"), ("bars_minute", "symbol")}
    assert {p for (p,) in policies} == {"bars_daily", "bars_minute"}


def test_continuous_aggregates_roll_up_after_a_refresh(migrated: str) -> None:
    with db.connection(migrated, autocommit=True) as conn:
        caggs = conn.execute(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates"
        ).fetchall()
        assert {c for (c,) in caggs} == {"bars_hourly", "bars_weekly"}
        conn.execute(
            "INSERT INTO bars_minute VALUES "
            "('AAPL', '2024-01-02 14:30Z', 10, 12, 9, 11, 100, 10.5, 5), "
            "('AAPL', '2024-01-02 14:59Z', 11, 13, 10, 12, 300, 12.0, 7), "
            "('AAPL', '2024-01-02 15:00Z', 12, 12, 12, 12, 10, 12.0, 1)"
        )
        [(schema, table)] = conn.execute(
            "SELECT materialization_hypertable_schema, materialization_hypertable_name "
            "FROM timescaledb_information.continuous_aggregates WHERE view_name = 'bars_hourly'"
        ).fetchall()
        materialized = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        assert conn.execute(materialized).fetchone() == (0,)
        conn.execute("CALL refresh_continuous_aggregate('bars_hourly', '2024-01-01', '2024-01-03')")
        assert conn.execute(materialized).fetchone() == (2,)
        rows = conn.execute(
            "SELECT ts, open, high, low, close, volume, vwap, trades FROM bars_hourly "
            "WHERE symbol = 'AAPL' ORDER BY ts"
        ).fetchall()
    assert [(r[0].hour, *r[1:6], r[7]) for r in rows] == [
        (14, 10.0, 13.0, 9.0, 12.0, 400.0, 12),
        (15, 12.0, 12.0, 12.0, 12.0, 10.0, 1),
    ]
    assert rows[0][6] == pytest.approx((10.5 * 100 + 12.0 * 300) / 400)


def test_weekly_aggregate_from_daily_bars(migrated: str) -> None:
    with db.connection(migrated, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bars_daily VALUES "
            "('MSFT', '2024-01-08 05:00Z', 1, 2, 0.5, 1.5, 10, NULL, NULL), "
            "('MSFT', '2024-01-12 05:00Z', 1.5, 3, 1, 2.5, 30, NULL, NULL)"
        )
        conn.execute("CALL refresh_continuous_aggregate('bars_weekly', '2024-01-01', '2024-01-31')")
        rows = conn.execute(
            "SELECT ts::date, open, high, low, close, volume FROM bars_weekly WHERE symbol = 'MSFT'"
        ).fetchall()
    assert [(str(r[0]), *r[1:]) for r in rows] == [("2024-01-08", 1.0, 3.0, 0.5, 2.5, 40.0)]


def test_upsert_on_a_hypertable(migrated: str) -> None:
    upsert = (
        "INSERT INTO bars_minute VALUES ('NVDA', '2024-03-01 15:00Z', 1, 2, 1, %s, 5, NULL, NULL) "
        "ON CONFLICT (symbol, ts) DO UPDATE SET close = excluded.close"
    )
    with db.connection(migrated, autocommit=True) as conn:
        conn.execute(upsert, (1.5,))
        conn.execute(upsert, (1.75,))
        rows = conn.execute("SELECT close FROM bars_minute WHERE symbol = 'NVDA'").fetchall()
    assert rows == [(1.75,)]


def test_status_reports_timescaledb(migrated: str) -> None:
    result = run_cli("db", "status", env={"DATABASE_URL": migrated})
    assert result.returncode == 0, result.stderr
    assert "TimescaleDB 2.23" in result.stdout
    assert "003_bars_storage.timescaledb.sql" in result.stdout


def test_second_migrate_is_a_no_op(migrated: str) -> None:
    result = run_cli("db", "migrate", env={"DATABASE_URL": migrated})
    assert result.returncode == 0, result.stderr
    assert "nothing to apply" in result.stdout
    with psycopg.connect(migrated) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (LATEST,)


def test_the_read_api_queries_read_the_continuous_aggregates(migrated: str) -> None:
    """What `marketdata serve` runs for a JSON page of the hourly aggregate and for health,
    once a load has refreshed the aggregate over its range.
    (PGlite's socket sends no COPY TO STDOUT data: the streamed formats, which read by COPY,
    are tested on PostgreSQL.)"""
    start, end = datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC)
    with db.connection(migrated, autocommit=True) as conn:
        refresh_aggregate(conn, Timeframe.MINUTE, start, end)  # the range refreshed: empty
        conn.execute(
            "INSERT INTO bars_minute VALUES "
            "('TSLA', '2024-01-02 14:30Z', 10, 12, 9, 11, 100, 10.5, 5), "
            "('TSLA', '2024-01-02 15:10Z', 11, 13, 10, 12, 300, NULL, NULL)"
        )
        conn.execute("INSERT INTO tracked_symbols (symbol, asset_class) VALUES ('TSLA', 'stock')")
        hourly = BarRange("TSLA", BarSize.HOURLY, start, end)
        # Below the aggregate's refreshed range, as a backfilled month is below the policy's:
        # what a run refreshes after its loads.
        assert reading.json_page(conn, hourly, after=None, limit=10).bars == "[]"
        refresh_aggregate(conn, Timeframe.MINUTE, datetime(2024, 1, 2, 14, 30, tzinfo=UTC), end)
        page = json.loads(reading.json_page(conn, hourly, after=None, limit=10).bars)
        latest = reading.latest_bars(conn)
    assert [(b["ts"], b["open"], b["close"], b["vwap"]) for b in page] == [
        ("2024-01-02T14:00:00Z", 10, 11, 10.5),
        ("2024-01-02T15:00:00Z", 11, 12, None),
    ]
    assert latest["stock"]["minute"] == datetime(2024, 1, 2, 15, 10, tzinfo=UTC)
