"""The read API (`marketdata serve`) as a consumer meets it: a real server process on a real
socket over a real PostgreSQL, every endpoint and format read back against the tables."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import psycopg
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from psycopg import sql

from marketdata_pipeline.api.openapi import DOCUMENT
from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.registry import api_keys, symbols
from marketdata_pipeline.warehouse import migrations
from marketdata_pipeline.warehouse.connection import connection, with_database
from marketdata_pipeline.warehouse.reading import BarRange, BarSize
from tests.conftest import PROJECT_DIR, free_port

# A year of crypto minutes (24/7): the "year of minute bars" that must stream, not be held.
YEAR_START, YEAR_END = "2023-01-01T00:00:00Z", "2024-01-01T00:00:00Z"
YEAR_OF_MINUTES = 365 * 24 * 60


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str | None) -> httpx.Client:
        headers = {"X-API-Key": key} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert match
        return int(match.group(1))


@contextmanager
def api_server(url: str, log: Path, *args: str) -> Iterator[Server]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "marketdata_pipeline", "serve", "--port", str(port), *args],
            env={**os.environ, "DATABASE_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_DIR,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{server.url}/v1/openapi.json", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"marketdata serve did not start: {log.read_text()}")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


def _keys(url: str, count: int) -> list[str]:
    with connection(url) as conn:
        return [api_keys.create(conn, f"reader {uuid.uuid4().hex[:6]}")[1] for _ in range(count)]


def _migrated_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(admin_url, name)
    with connection(url) as conn:
        migrations.migrate(conn)
    return url


@pytest.fixture(scope="module")
def warehouse(pg_admin_url: str) -> Iterator[str]:
    """AAPL (stock) minutes of four January sessions and a year of daily bars; BTC (crypto)
    minutes of all of 2023. Random full-precision doubles, some vwap and trades NULL."""
    name = f"t_api_{uuid.uuid4().hex[:8]}"
    url = _migrated_database(pg_admin_url, name)
    with connection(url) as conn:
        symbols.add(conn, "AAPL", AssetClass.STOCK)
        symbols.add(conn, "BTC", AssetClass.CRYPTO)
        symbols.add(conn, "MSFT", AssetClass.STOCK)  # registered, nothing loaded yet
        conn.execute("SELECT setseed(0.42)")
        bars = (
            "INSERT INTO {table} SELECT %s, ts, 100 + random(), 102 + random(), 98 + random(), "
            "100 + random(), {volume}, CASE WHEN random() < 0.05 THEN NULL ELSE 100 + random() "
            "END, CASE WHEN random() < 0.05 THEN NULL ELSE (random() * 500)::int END "
            "FROM generate_series(%s::timestamptz, %s::timestamptz, %s::interval) ts {where}"
        )
        for table, symbol, first, last, step, volume, where in (
            ("bars_minute", "AAPL", "2024-01-02 09:00", "2024-01-05 20:00", "1 minute",
             "(random() * 10000)::int", "WHERE (ts AT TIME ZONE 'America/New_York')::time "
             "BETWEEN '04:00' AND '19:59'"),
            ("bars_daily", "AAPL", "2024-01-01 00:00", "2024-12-31 00:00", "1 day",
             "(random() * 1e7)::int", "WHERE extract(isodow FROM ts) < 6"),
            ("bars_minute", "BTC", "2023-01-01 00:00+00", "2023-12-31 23:59+00", "1 minute",
             "random() * 3", ""),
        ):  # fmt: skip
            if table == "bars_daily":  # stock days start at midnight New York
                first, last = f"{first} America/New_York", f"{last} America/New_York"
            statement = sql.SQL(bars).format(
                table=sql.Identifier(table), volume=sql.SQL(volume), where=sql.SQL(where)
            )
            conn.execute(statement, (symbol, first, last, step))
        conn.execute("ANALYZE")
    yield url
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def key(warehouse: str) -> str:
    with connection(warehouse) as conn:
        return api_keys.create(conn, "notebook")[1]


@pytest.fixture(scope="module")
def server(warehouse: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with api_server(warehouse, tmp_path_factory.mktemp("api") / "serve.log") as running:
        yield running


def _schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def _stored(url: str, relation: str, symbol: str, start: str, end: str) -> pl.DataFrame:
    with connection(url) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT ts, open, high, low, close, volume, vwap, trades FROM {} "
                "WHERE symbol = %s AND ts >= %s AND ts < %s ORDER BY ts"
            ).format(sql.Identifier(relation)),
            (symbol, start, end),
        ).fetchall()
    return _frame(rows)


FRAME_SCHEMA = pl.Schema(
    {
        "ts": pl.Datetime("us", "UTC"),
        **{c: pl.Float64() for c in ("open", "high", "low", "close", "volume", "vwap")},
        "trades": pl.Int64(),
    }
)


def _frame(rows: list[Any]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=FRAME_SCHEMA, orient="row")


def _read(fmt: str, body: bytes) -> pl.DataFrame:
    if fmt == "arrow":
        return pl.read_ipc_stream(body)
    if fmt == "parquet":
        return pl.read_parquet(body)
    assert fmt == "csv"
    frame = pl.read_csv(io.BytesIO(body), schema_overrides={"ts": pl.String})
    return frame.with_columns(
        pl.col("ts").str.to_datetime("%Y-%m-%d %H:%M:%S%#z", time_unit="us", time_zone="UTC")
    ).cast(dict(FRAME_SCHEMA))  # type: ignore[arg-type]


def test_the_openapi_document_is_valid_and_needs_no_key(server: Server) -> None:
    served = httpx.get(f"{server.url}/v1/openapi.json").json()
    validate_openapi(served)
    assert served == DOCUMENT
    assert set(served["paths"]) == {
        "/v1/bars/{symbol}", "/v1/symbols", "/v1/symbols/{symbol}/stats", "/v1/health",
        "/v1/usage", "/v1", "/v1/openapi.json",
    }  # fmt: skip


@pytest.mark.parametrize("timeframe", ["minute", "hourly", "daily", "weekly"])
@pytest.mark.parametrize("fmt", ["json", "csv", "arrow", "parquet"])
def test_bars_read_back_exactly_in_every_timeframe_and_format(
    server: Server, key: str, warehouse: str, timeframe: str, fmt: str
) -> None:
    # Dates are market days in New York (Jan 3 through Jan 4 inclusive), but for weekly bars
    # UTC days: weeks start Monday 00:00 UTC, and a week is in when one of its days is.
    start, end = "2024-01-03T05:00:00Z", "2024-01-05T05:00:00Z"
    if timeframe == "daily":
        start, end = "2024-01-01T05:00:00Z", "2024-07-01T04:00:00Z"
    if timeframe == "weekly":  # Monday Jan 1 through the week of Sunday Jun 30
        start, end = "2024-01-01T00:00:00Z", "2024-07-01T00:00:00Z"
    relation = f"bars_{timeframe}"
    expected = _stored(warehouse, relation, "AAPL", start, end)
    assert expected.height > 10
    if timeframe in ("minute", "daily"):
        assert expected["vwap"].null_count() > 0 and expected["trades"].null_count() > 0
    if relation in ("bars_daily", "bars_weekly"):
        first_bar = datetime(2024, 1, 1, 5 if relation == "bars_daily" else 0, tzinfo=UTC)
        assert expected["ts"][0] == first_bar
    dates = {"minute": ("2024-01-03", "2024-01-04"), "hourly": ("2024-01-03", "2024-01-04")}
    first, last = dates.get(timeframe, ("2024-01-01", "2024-06-30"))
    with server.client(key) as client:
        if fmt == "json":
            pages, got = 0, []
            first_page = f"/v1/bars/AAPL?timeframe={timeframe}&start={first}&end={last}"
            url: str | None = f"{first_page}&limit={max(1, expected.height // 3)}"
            while url:
                page = client.get(url)
                assert page.status_code == 200, page.text
                _schema("BarsPage").validate(page.json())
                got += [list(bar.values()) for bar in page.json()["bars"]]
                url, pages = page.json()["next"], pages + 1
            assert pages >= 3, "paged by limit, each page linking the next"
            whole = client.get(url_of_all := f"{first_page}&limit={expected.height}").json()
            assert len(whole["bars"]) == expected.height and whole["next"] is None, url_of_all
            received = _frame([[datetime.fromisoformat(r[0]), *r[1:]] for r in got])
        else:
            response = client.get(
                f"/v1/bars/AAPL?timeframe={timeframe}&start={first}&end={last}&format={fmt}"
            )
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith(
                {"csv": "text/csv", "arrow": "application/vnd.apache.arrow.stream",
                 "parquet": "application/vnd.apache.parquet"}[fmt]
            )  # fmt: skip
            received = _read(fmt, response.content)
    assert received.equals(expected), f"{fmt} {timeframe}: not the stored bars"


def test_an_empty_range_is_an_empty_document_in_every_format(server: Server, key: str) -> None:
    with server.client(key) as client:
        for fmt in ("json", "csv", "arrow", "parquet"):
            response = client.get(f"/v1/bars/MSFT?timeframe=minute&start=2024-01-02&format={fmt}")
            assert response.status_code == 200, response.text
            if fmt == "json":
                assert response.json()["bars"] == [] and response.json()["next"] is None
            else:
                frame = _read(fmt, response.content)
                assert frame.height == 0 and frame.columns == list(FRAME_SCHEMA)


def test_symbols_stats_health_and_usage_tell_the_truth(
    server: Server, key: str, warehouse: str
) -> None:
    with server.client(key) as client:
        listed = client.get("/v1/symbols").json()
        crypto = client.get("/v1/symbols?asset_class=crypto").json()
        stats = client.get("/v1/symbols/aapl/stats").json()
        msft = client.get("/v1/symbols/MSFT/stats").json()
        health = client.get("/v1/health").json()
    _schema("Symbol").validate(listed["symbols"][0])
    assert [s["symbol"] for s in listed["symbols"]] == ["AAPL", "BTC", "MSFT"]
    assert [s["symbol"] for s in crypto["symbols"]] == ["BTC"]
    assert {s["backfill_status"] for s in listed["symbols"]} == {"pending"}
    _schema("SymbolStats").validate(stats)
    with connection(warehouse) as conn:
        minute_bars, first, last = conn.execute(
            "SELECT count(*), min(ts), max(ts) FROM bars_minute WHERE symbol = 'AAPL'"
        ).fetchone() or (0, None, None)
        latest_btc = conn.execute("SELECT max(ts) FROM bars_minute WHERE symbol = 'BTC'").fetchone()
    assert stats["timeframes"]["minute"]["bars"] == minute_bars > 3000
    assert stats["timeframes"]["minute"]["first_bar"] == f"{first:%Y-%m-%dT%H:%M:%SZ}"
    assert stats["timeframes"]["minute"]["last_bar"] == f"{last:%Y-%m-%dT%H:%M:%SZ}"
    assert stats["timeframes"]["minute"]["missing_days"] == [], "Jan 2-5 are all sessions"
    assert stats["timeframes"]["minute"]["validation_rate"] == 1.0
    nothing = msft["timeframes"]["daily"]
    assert nothing["bars"] == 0 and nothing["validation_rate"] is None
    assert nothing["missing_days"] is None, "no gaps measured without bars: null, not 0"
    _schema("Health").validate(health)
    assert health["warehouse"] == "reachable"
    assert health["latest_bar"]["crypto"] == {
        "minute": f"{latest_btc[0]:%Y-%m-%dT%H:%M:%SZ}" if latest_btc else None,
        "daily": None,
    }
    assert health["latest_bar"]["etf"] == {"minute": None, "daily": None}


def test_usage_and_audit_count_every_request_with_its_status(
    server: Server, warehouse: str
) -> None:
    with connection(warehouse) as conn:
        record, raw = api_keys.create(conn, "dashboard")
    with server.client(raw) as client:
        statuses = [
            client.get("/v1/health").status_code,
            client.get("/v1/bars/AAPL?start=2024-01-02&format=arrow").status_code,
            client.get("/v1/bars/NOPE?start=2024-01-02").status_code,
            client.get("/v1/bars/AAPL?start=yesterday").status_code,
        ]
        assert statuses == [200, 200, 404, 400]
        usage = client.get("/v1/usage").json()
    _schema("Usage").validate(usage)
    assert usage["name"] == "dashboard" and usage["request_count"] == 4, "before this request"
    assert [(r["endpoint"], r["status"]) for r in usage["recent_requests"]] == [
        ("/v1/bars/AAPL", 400), ("/v1/bars/NOPE", 404), ("/v1/bars/AAPL", 200),
        ("/v1/health", 200),
    ]  # fmt: skip
    with connection(warehouse) as conn:
        stored = api_keys.get(conn, record.id)
        trail = api_keys.audit(conn, key_id=record.id)
    assert stored.request_count == 5 and stored.last_used_endpoint == "/v1/usage"
    assert next((e.endpoint, e.method, e.status_code) for e in trail) == ("/v1/usage", "GET", 200)
    assert len(trail) == 5


def test_every_auth_failure_is_one_401_line_audited_and_the_key_never_logged(
    server: Server, warehouse: str
) -> None:
    with connection(warehouse) as conn:
        revoked, revoked_raw = api_keys.create(conn, "revoked")
        api_keys.revoke(conn, revoked.id)
        deleted, deleted_raw = api_keys.create(conn, "deleted")
        api_keys.delete(conn, deleted.id)
        live, live_raw = api_keys.create(conn, "live")
        before = len(api_keys.audit(conn, limit=10_000))
    near_miss = live_raw[:-1] + ("A" if live_raw[-1] != "A" else "B")
    refused = {
        "missing": None,
        "empty": "",
        "malformed": "not-a-key",
        "unknown": api_keys.generate_key(),
        "near miss": near_miss,
        "revoked": revoked_raw,
        "deleted": deleted_raw,
    }
    for why, raw in refused.items():
        with server.client(raw) as client:
            for path in ("/v1/health", "/v1/bars/AAPL?start=2024-01-02", "/v1/nowhere"):
                response = client.get(path)
                assert response.status_code == 401, f"{why} {path}: {response.status_code}"
                message = response.json()["error"]
                assert message in {
                    "missing API key: send an X-API-Key header",
                    "invalid API key: unknown, revoked or deleted",
                }, message
                assert (raw or "") not in response.text or not raw
    with connection(warehouse) as conn:
        trail = api_keys.audit(conn, limit=10_000)
        new = trail[: len(trail) - before]  # newest first
        assert len(new) == len(refused) * 3 and {e.status_code for e in new} == {401}
        assert {e.key_id for e in new} == {None, revoked.id}
        against_revoked = api_keys.audit(conn, key_id=revoked.id)
        assert len(against_revoked) == 3, "a revoked key's refusals are audited against it"
        assert api_keys.get(conn, revoked.id).request_count == 0, "and not counted as uses"
        assert api_keys.get(conn, live.id).request_count == 0, "a near miss is not its key"
    logged = server.log.read_text()
    for raw in (*filter(None, refused.values()), live_raw):
        assert raw not in logged


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("/v1/bars/AAPL", 400, "start is required"),
        ("/v1/bars/AAPL?start=2024-13-01", 400, "start '2024-13-01' is neither a date"),
        ("/v1/bars/AAPL?start=2024-01-02T10:00", 400, "has no time zone"),
        ("/v1/bars/AAPL?start=2024-01-05&end=2024-01-02", 400, "is not before end"),
        ("/v1/bars/AAPL?start=2024-01-02&end=9999-12-31", 400, "end '9999-12-31' is out of range"),
        ("/v1/bars/AAPL?start=0001-01-01T00:00:00%2B05:00", 400, "is out of range"),
        ("/v1/bars/AAPL?start=2024-01-02&timeframe=yearly", 400, "timeframe must be one of"),
        ("/v1/bars/AAPL?start=2024-01-02&format=xlsx", 400, "format must be one of"),
        ("/v1/bars/AAPL?start=2024-01-02&limit=50001", 400, "limit must be 1 to 50,000"),
        ("/v1/bars/AAPL?start=2024-01-02&limit=ten", 400, "limit must be a whole number"),
        ("/v1/bars/AAPL?start=2024-01-02&format=csv&limit=5", 400, "limit and after page JSON"),
        ("/v1/bars/AAPL?start=2024-01-02&format=arrow&after=2024-01-03", 400, "page JSON only"),
        ("/v1/bars/ZZZZ?start=2024-01-02", 404, "symbol ZZZZ is not registered"),
        ("/v1/bars/BAD$?start=2024-01-02", 400, "invalid symbol 'BAD$'"),
        ("/v1/symbols?asset_class=bond", 400, "invalid asset class 'bond'"),
        ("/v1/symbols/ZZZZ/stats", 404, "symbol ZZZZ is not registered"),
        ("/v2/bars/AAPL", 404, "no endpoint /v2/bars/AAPL"),
        ("/v1/bars/AAPL?start=2024-01-02&timeframes=minute", 400, "unknown parameter 'timeframes'"),
        ("/v1/bars/AAPL?start=2024-01-02&start=2024-01-03", 400, "start is given more than once"),
        ("/v1/bars/AAPL?start=2024-01-02&api_key=x", 400, "in the X-API-Key header, not in"),
        ("/v1/bars/AAPL?start=2024-01-02&limit=1_0", 400, "limit must be a whole number"),
        ("/v1/health%00", 404, "no endpoint /v1/health"),
        ("/v1/health/", 404, "no endpoint /v1/health/"),
        ("/v1/health?api_key=x", 400, "in the X-API-Key header, not in"),
        ("/v1/usage?verbose=1", 400, "unknown parameter 'verbose': this endpoint takes none"),
        ("/v1/symbols?asset_clas=crypto", 400, "unknown parameter 'asset_clas'"),
        ("/v1/symbols/AAPL/stats?x=1", 400, "unknown parameter 'x'"),
        (f"/v1/bars/AAPL?start=2024-01-02&limit=1{'0' * 5000}", 400, "limit must be 1 to"),
        ("/v1/symbols?asset_class=", 400, "parameter asset_class is empty"),
        ("/v1/symbols?asset_class", 400, "parameter asset_class is empty"),
        ("/v1/bars/AAPL?start=", 400, "parameter start is empty"),
        ("/v1/bars/AAPL?start=2024-01-02&end=", 400, "parameter end is empty"),
        ("/v1/bars/AAPL?start=2024-01-02&timeframe=", 400, "parameter timeframe is empty"),
        ("/v1/bars/AAPL?start=2024-01-02&format=", 400, "parameter format is empty"),
        ("/v1/bars/AAPL?start=2024-01-02&limit=", 400, "parameter limit is empty"),
        ("/v1/bars/AAPL?start=2024-01-02&after=", 400, "parameter after is empty"),
        ("/v1/health?x=", 400, "unknown parameter 'x'"),
        ("/v1?x=", 400, "unknown parameter 'x'"),
        ("/v1/openapi.json?x=", 400, "unknown parameter 'x'"),
        ("/v1/bars/AAPL?start=2024-W01-1", 400, "'2024-W01-1' is neither a date"),
        ("/v1/bars/AAPL?start=20240102", 400, "is neither a date"),
        ("/v1/bars/AAPL?start=2024-01-02T10:00:00.1234567Z", 400, "is neither a date"),
        ("/v1/bars/AAPL?start=2024-01-02T10:00Z", 400, "is neither a date"),
        ("/v1/bars/AAPL?start=2024-01-02 10:00:00Z", 400, "(send a + in a URL as %2B)"),
    ],
)
def test_bad_input_gets_a_4xx_with_one_readable_line(
    server: Server, key: str, query: str, status: int, message: str
) -> None:
    with server.client(key) as client:
        response = client.get(query)
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"] and message in body["error"] and "\n" not in body["error"]


def test_weekly_bars_are_the_weeks_that_hold_the_days_asked(server: Server, key: str) -> None:
    """Weeks start Monday 00:00 UTC, before a stock's Monday (midnight New York)."""

    def weeks(first: str, last: str) -> list[str]:
        with server.client(key) as client:
            url = f"/v1/bars/AAPL?timeframe=weekly&start={first}&end={last}"
            return [bar["ts"] for bar in client.get(url).json()["bars"]]

    assert weeks("2024-01-01", "2024-01-07") == ["2024-01-01T00:00:00Z"]
    assert weeks("2024-01-03", "2024-01-09") == ["2024-01-01T00:00:00Z", "2024-01-08T00:00:00Z"]
    assert weeks("2024-01-06", "2024-01-07") == ["2024-01-01T00:00:00Z"], "the week of a weekend"


def test_a_nul_a_doubled_key_and_a_key_in_the_path_are_refused_and_audited(
    server: Server, key: str, warehouse: str
) -> None:
    with connection(warehouse) as conn:
        before = len(api_keys.audit(conn, limit=10_000))
    with server.client(key) as client:
        nul = client.get("/v1/bars/AAPL%00?start=2024-01-02")
        doubled = client.get("/v1/health", headers=[("X-API-Key", key), ("X-API-Key", key)])
        in_path = client.get(f"/v1/usage/{key}")  # a key put in a URL is not repeated
    assert nul.status_code == 400 and "invalid symbol" in nul.json()["error"]
    assert doubled.status_code == 401
    assert doubled.json() == {"error": "missing API key: send one X-API-Key header"}
    assert in_path.status_code == 404 and key not in in_path.text
    assert in_path.json() == {"error": "no endpoint /v1/usage/mdw_... (see /v1/openapi.json)"}
    with connection(warehouse) as conn:
        trail = api_keys.audit(conn, limit=10_000)
    assert len(trail) == before + 3
    assert (trail[0].endpoint, trail[0].status_code) == ("/v1/usage/mdw_...", 404)
    assert (trail[2].endpoint, trail[2].status_code) == ("/v1/bars/AAPL\ufffd", 400)
    assert "Traceback" not in server.log.read_text()


def test_slow_streams_cannot_lock_out_other_clients(server: Server, warehouse: str) -> None:
    """Streams read on sessions of their own, at most 2 per key: clients that stop reading
    hold theirs, and everyone else is still served or told to retry, never a false error."""
    with connection(warehouse) as conn:
        keys = [api_keys.create(conn, f"slow-{i}")[1] for i in range(5)]
    year = f"/v1/bars/BTC?timeframe=minute&start={YEAR_START}&end={YEAR_END}&format=csv"
    with contextlib.ExitStack() as held:
        entering = threading.Lock()

        def hold(raw: str, barrier: threading.Barrier | None = None) -> int:
            with entering:
                client = held.enter_context(server.client(raw))
            if barrier:
                barrier.wait()
            stream = client.stream("GET", year)
            response = stream.__enter__()  # outside the lock: the requests race
            with entering:
                held.push(stream)  # kept open, unread, until the test ends
            return response.status_code

        # Six requests of one key at once: its check cannot pass them all before any counts.
        racing = threading.Barrier(6)
        with ThreadPoolExecutor(6) as pool:
            raced = sorted(pool.map(lambda _: hold(keys[4], racing), range(6)))
        for raw in keys[:3]:  # with the race's 2, all 8 sessions of the stream pool are held
            assert [hold(raw), hold(raw)] == [200, 200]
        with server.client(keys[0]) as first:
            third = first.get(year)
        with server.client(keys[3]) as other:
            started = time.monotonic()
            busy = other.get(year)
            waited = time.monotonic() - started
            health = other.get("/v1/health")
            page = other.get("/v1/bars/BTC?timeframe=minute&start=2023-06-01&end=2023-06-01")
    assert raced == [200, 200, 429, 429, 429, 429], raced
    assert third.status_code == 429 and third.headers["Retry-After"] == "5"
    assert "this key has 2 streams open already" in third.json()["error"]
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5", busy.text
    assert busy.json()["error"].startswith("busy: all 8 warehouse sessions for streams are in use")
    print(f"a stream with every session held waited {waited:.1f} s for one")
    assert health.status_code == 200 and len(page.json()["bars"]) == 1440
    with server.client(keys[4]) as other:  # the sessions came back when the clients left
        assert other.get(year.replace(YEAR_END, "2023-01-02T00:00:00Z")).status_code == 200


def test_writes_are_refused(server: Server, key: str) -> None:
    with server.client(key) as client:
        for method in ("POST", "PUT", "DELETE"):
            response = client.request(method, "/v1/symbols")
            assert response.status_code == 405
            assert response.json() == {"error": f"{method} is not allowed: this API is read-only"}


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(
    warehouse: str, tmp_path: Path
) -> None:
    with connection(warehouse) as conn:
        first = api_keys.create(conn, "busy")[1]
        second = api_keys.create(conn, "quiet")[1]
    limited = api_server(warehouse, tmp_path / "serve.log", "--rate-limit", "3/minute")
    with limited as server, server.client(first) as busy, server.client(second) as quiet:
        assert [busy.get("/v1/health").status_code for _ in range(3)] == [200] * 3
        refused = busy.get("/v1/health")
        assert quiet.get("/v1/health").status_code == 200, "the limit is per key"
        usage = quiet.get("/v1/usage").json()
        # Refused keys count against the address they come from, whatever it claims to be.
        for forwarded in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
            headers = {"X-API-Key": "mdw_nope", "X-Forwarded-For": forwarded}
            assert httpx.get(f"{server.url}/v1/health", headers=headers).status_code == 401
        headers = {"X-API-Key": "mdw_nope", "X-Forwarded-For": "203.0.113.4"}
        probing = httpx.get(f"{server.url}/v1/health", headers=headers)
        # A valid key from that address (every local client shares it) is still served.
        still_served = quiet.get("/v1/health").status_code
    assert still_served == 200
    assert probing.status_code == 429
    assert "for refused API keys from this address" in probing.json()["error"]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.json()["error"].startswith("rate limit of 3 per 1 minute for this key reached")
    assert usage["rate_limit"] == "3 per 1 minute" and usage["rate_limit_remaining"] == 1


def test_a_key_has_at_most_8_requests_in_progress(server: Server, warehouse: str) -> None:
    """One key's many concurrent JSON pages cannot take every query session from the others:
    its pages are held in progress by a lock on the bars, and its ninth is refused."""
    with connection(warehouse) as conn:
        greedy, other = (api_keys.create(conn, name)[1] for name in ("greedy", "other"))
    page = "/v1/bars/BTC?timeframe=minute&start=2023-01-01&end=2023-01-02"

    def ask(_: int) -> int:
        with server.client(greedy) as client:
            return client.get(page).status_code

    with connection(warehouse) as lock, ThreadPoolExecutor(8) as pool:
        lock.execute("LOCK TABLE bars_minute IN ACCESS EXCLUSIVE MODE")
        held = [pool.submit(ask, i) for i in range(8)]
        deadline = time.monotonic() + 20
        while lock.execute(  # all 8 are waiting on the lock, inside the server
            "SELECT count(*) FROM pg_locks WHERE relation = 'bars_minute'::regclass AND NOT granted"
        ).fetchone() != (8,):
            assert time.monotonic() < deadline, "the 8 requests did not reach the warehouse"
            time.sleep(0.1)
        with server.client(greedy) as client:
            ninth = client.get(page)
        with server.client(other) as client:  # (health would wait on the lock too)
            others = client.get("/v1/symbols").status_code
        lock.rollback()
        assert [future.result() for future in held] == [200] * 8
    assert ninth.status_code == 429 and ninth.headers["Retry-After"] == "5"
    assert "this key has 8 requests in progress" in ninth.json()["error"]
    assert others == 200


def test_a_bad_rate_limit_or_port_exits_with_one_line() -> None:
    for args, expected in (
        (["--rate-limit", "lots"], "marketdata: error: API rate limit must read like"),
        (["--rate-limit", "0/minute"], "marketdata: error: API rate limit must read like"),
        (["--port", "0"], "marketdata: Invalid value for '--port'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "marketdata_pipeline", "serve", *args],
            capture_output=True,
            text=True,
            cwd=PROJECT_DIR,
            timeout=60,
        )
        assert done.returncode != 0 and done.stderr.startswith(expected), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line_before_anything_is_announced(warehouse: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "marketdata_pipeline", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=PROJECT_DIR,
            env={**os.environ, "DATABASE_URL": warehouse},
            timeout=60,
        )
    assert done.returncode == 1 and done.stdout == ""
    assert (
        done.stderr
        == f"marketdata: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


# Known open defect, in the closing note of issue 20: since the read API's limits moved into
# the warehouse (a heartbeat every 2 s), a Parquet year's peak grows 41-45 MiB instead of 9 in
# about one run in four (any periodic wake-up does it: with no beats it held 9.0 MiB in 6 of 6;
# a beat that does nothing, on its thread or on the event loop, did not help). Not strict, so
# the run that keeps to the bound shows as XPASS.
PARQUET_PEAK_DEFECT = pytest.mark.xfail(
    reason="a Parquet year's peak memory sometimes grows past half of what is sent (issue 20)",
    strict=False,
)


@pytest.mark.parametrize(
    "fmt", ["arrow", "csv", pytest.param("parquet", marks=PARQUET_PEAK_DEFECT)]
)
def test_a_year_of_minute_bars_streams_without_being_held(
    server: Server, key: str, fmt: str
) -> None:
    query = f"/v1/bars/BTC?timeframe=minute&start={YEAR_START}&end={YEAR_END}&format={fmt}"
    with server.client(key) as client:
        # Four months first (three batches): the server's high-water mark then holds
        # everything a stream needs in flight, and the year may not raise it much.
        client.get(query.replace(YEAR_END, "2023-05-01T00:00:00Z")).raise_for_status()
        before = server.peak_rss_kib()
        received = 0
        with client.stream("GET", query) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += len(chunk)
        grown_mib = (server.peak_rss_kib() - before) / 1024
    received_mib = received / 2**20
    print(f"{fmt}: {received_mib:.1f} MiB sent, server peak memory grew {grown_mib:.1f} MiB")
    # Held, the year would raise the peak by at least what was sent (over 20 MiB in every
    # format); streamed, by a batch or two (measured 0-12 MiB, parquet the most).
    assert received_mib > 20 and grown_mib < received_mib / 2, "the year was held, not streamed"


def test_a_client_that_hangs_up_mid_stream_frees_its_session(
    server: Server, key: str, warehouse: str
) -> None:
    query = f"/v1/bars/BTC?timeframe=minute&start={YEAR_START}&end={YEAR_END}&format=csv"
    with server.client(key) as client:
        for _ in range(12):  # more than the stream pool's 8 sessions and a key's 2 slots
            with client.stream("GET", query) as response:
                if response.status_code == 429:  # the last hang-up not yet noticed
                    time.sleep(0.5)
                    continue
                assert response.status_code == 200
                next(response.iter_bytes())
        # Nothing leaked: all 8 stream sessions can be held at once again.
        with contextlib.ExitStack() as held:
            for raw in [key, key, *_keys(warehouse, 3) * 2]:
                stream = held.enter_context(server.client(raw)).stream("GET", query)
                assert held.enter_context(stream).status_code == 200
    deadline = time.monotonic() + 10
    with connection(warehouse, autocommit=True) as conn:
        while True:
            copying = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchone()
            if copying == (0,) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert copying == (0,), "a COPY of a client gone is still running"


def test_an_unreachable_warehouse_is_503_in_one_line(pg_admin_url: str, tmp_path: Path) -> None:
    name = f"t_gone_{uuid.uuid4().hex[:8]}"
    url = _migrated_database(pg_admin_url, name)
    with connection(url) as conn:
        key = api_keys.create(conn, "ops")[1]
    with api_server(url, tmp_path / "serve.log") as server, server.client(key) as client:
        assert client.get("/v1/health").status_code == 200
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        response = client.get("/v1/health")
    assert response.status_code == 503
    assert response.json()["error"].startswith("warehouse unreachable (socket ")
    assert "Traceback" not in server.log.read_text()


def _raw_exchange(server: Server, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send `request` as bytes on a socket of its own; the status and JSON body of the
    answer (uvicorn's own answers to bad HTTP come before any handler)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    return int(head.split()[1]), json.loads(body)


def test_request_heads_are_bounded_and_a_huge_one_costs_nothing(
    warehouse: str, tmp_path: Path
) -> None:
    """A 64 MiB X-API-Key is refused after its first KiBs: at once, without the server
    holding it, while another client is served."""
    with api_server(warehouse, tmp_path / "serve.log") as server:
        status, body = _raw_exchange(
            server, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-API-Key: " + b"a" * 20_000
        )
        assert (status, body) == (431, {"error": "request line and headers over 8 KiB: refused"})
        before_kib = server.peak_rss_kib()
        host, port = server.url.removeprefix("http://").split(":")
        refused_after: list[float] = []

        def attack() -> None:
            started = time.monotonic()
            with (
                socket.create_connection((host, int(port)), timeout=30) as conn,
                contextlib.suppress(OSError),  # the server hangs up mid-send
            ):
                conn.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-API-Key: ")
                block = b"a" * 2**20
                for _ in range(64):
                    conn.sendall(block)
                conn.recv(65536)
            refused_after.append(time.monotonic() - started)

        attacker = threading.Thread(target=attack)
        attacker.start()
        started = time.monotonic()
        served = httpx.get(f"{server.url}/v1/openapi.json", timeout=10)
        other_waited = time.monotonic() - started
        attacker.join(timeout=30)
        grown_mib = (server.peak_rss_kib() - before_kib) / 1024
    print(f"64 MiB header refused in {refused_after[0]:.2f} s; another client served in "
          f"{other_waited:.2f} s; server peak memory grew {grown_mib:.1f} MiB")  # fmt: skip
    assert served.status_code == 200 and other_waited < 2
    assert refused_after and refused_after[0] < 2, "refused at once, not after reading it all"
    assert grown_mib < 4, "the header was held"
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n",
    ],
)
def test_malformed_http_gets_the_one_json_line(server: Server, request_bytes: bytes) -> None:
    status, body = _raw_exchange(server, request_bytes)
    assert (status, body) == (400, {"error": "malformed HTTP request: not parsed"})


@pytest.mark.parametrize(
    "path",
    [
        "/v1/openapi.json?api_key=x",
        "/v1?apikey=x",
        "/v1/health?key=x",
        "/v2/nowhere?X-API-Key=x",
        "/v1/bars/AAPL?start=2024-01-02&token=mdw_abcdefghijklmnop",
    ],
)
def test_a_key_in_the_url_is_refused_on_every_path(server: Server, key: str, path: str) -> None:
    for header in (key, None):
        with server.client(header) as client:
            response = client.get(path)
        assert response.status_code == 400, f"{path}: {response.status_code}"
        assert response.json() == {
            "error": "send the API key in the X-API-Key header, not in the URL"
        }


def test_v1_lists_the_endpoints_without_a_key(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1")
    assert response.status_code == 200
    _schema("Index").validate(response.json())
    listed = {e["path"]: e["needs_key"] for e in response.json()["endpoints"]}
    assert set(listed) == set(DOCUMENT["paths"])
    assert [p for p, needs in listed.items() if not needs] == ["/v1", "/v1/openapi.json"]
    assert httpx.get(f"{server.url}/v1?x=1").status_code == 400


def test_hourly_bars_of_a_day_read_only_that_days_minutes(warehouse: str) -> None:
    """bars_hourly on plain PostgreSQL is a view over all the minutes: the API's query of one
    day must reach the minutes by index, not by a scan of the table."""
    day = BarRange(
        "BTC",
        BarSize.HOURLY,
        datetime(2023, 6, 1, tzinfo=UTC),
        datetime(2023, 6, 2, tzinfo=UTC),
    )
    with connection(warehouse) as conn:
        plan = "\n".join(row[0] for row in conn.execute(sql.SQL("EXPLAIN {}").format(day.select())))
        analyzed = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(day.select())
        ).fetchone()
    assert "Seq Scan" not in plan and "bars_minute_symbol_hour" in plan, plan
    assert analyzed is not None
    scanned = _rows_read(analyzed[0][0]["Plan"], "bars_minute")
    assert scanned <= 25 * 60, f"{scanned} minutes read for 24 hours"


def _rows_read(node: dict[str, Any], relation: str) -> int:
    here = node.get("Actual Rows", 0) if node.get("Relation Name") == relation else 0
    return here + sum(_rows_read(child, relation) for child in node.get("Plans", []))


@contextmanager
def _reading_slowly(server: Server, key: str, path: str, *, per_second: int) -> Iterator[None]:
    """GET `path` on a socket with a small receive buffer, read steadily at about
    `per_second` bytes a second in a thread of its own, until the block ends."""
    host, port = server.url.removeprefix("http://").split(":")
    done = threading.Event()

    def read(conn: socket.socket) -> None:
        step = max(1024, per_second // 16)
        with contextlib.suppress(OSError):
            while not done.is_set() and (chunk := conn.recv(step)):
                time.sleep(len(chunk) / per_second)

    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        conn.settimeout(10)
        conn.connect((host, int(port)))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n".encode())
        reader = threading.Thread(target=read, args=(conn,))
        reader.start()
        try:
            yield
        finally:
            done.set()
            reader.join()


def _logged_within(server: Server, text: str, seconds: float) -> float:
    """How long it took `text` to appear in the server's log (fails after `seconds`)."""
    started = time.monotonic()
    while text not in server.log.read_text():
        assert time.monotonic() - started < seconds, f"not logged in {seconds} s: {text}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_stream_read_too_slowly_or_too_long_is_cut_and_its_session_freed(
    warehouse: str, tmp_path: Path
) -> None:
    """A client that reads steadily, but slower than the floor, holds its session no longer
    than the pace allows; nor does one that reads fast enough past the cap. (The bytes
    already in the sockets' buffers still reach the client: it is the session that is
    freed.)"""
    [key] = _keys(warehouse, 1)
    year = f"/v1/bars/BTC?timeframe=minute&start={YEAR_START}&end={YEAR_END}&format=csv"
    day = year.replace(YEAR_END, "2023-01-02T00:00:00Z")
    floor = 240 * 2**20  # 4 MiB a second, for a short test
    with (
        api_server(warehouse, tmp_path / "slow.log", "--stream-floor", str(floor)) as server,
        _reading_slowly(server, key, year, per_second=32 * 1024),
    ):
        slow = _logged_within(server, "read slower than 251,658,240 bytes a minute", 20)
        # Its slot and its session came back: the key may hold two streams again.
        with contextlib.ExitStack() as held:
            for _ in range(2):
                stream = held.enter_context(server.client(key)).stream("GET", day)
                assert held.enter_context(stream).status_code == 200
        with connection(warehouse, autocommit=True) as conn:
            copying = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchone()
        assert copying == (0,), "the cut stream's COPY still runs"
    with (
        api_server(warehouse, tmp_path / "long.log", "--stream-cap", "2") as server,
        _reading_slowly(server, key, year, per_second=2 * 2**20),
    ):
        long = _logged_within(server, "it ran for 2 s", 15)
    print(f"a client reading 32 KiB/s was cut after {slow:.1f} s, one reading 2 MiB/s of a "
          f"long stream after {long:.1f} s")  # fmt: skip
    assert long >= 2


def test_schemathesis_finds_no_mismatch_between_the_document_and_the_server(
    warehouse: str, tmp_path: Path
) -> None:
    """A bounded schemathesis run (every check it has, but one where OpenAPI cannot say
    enough: see schemathesis.toml) against a server of its own, whose rate limit the run
    cannot reach."""
    [key] = _keys(warehouse, 1)
    with api_server(warehouse, tmp_path / "serve.log", "--rate-limit", "100000/minute") as server:
        command = [
            str(Path(sys.executable).with_name("st")),
            "--config-file", str(PROJECT_DIR / "tests" / "schemathesis.toml"), "run",
            f"{server.url}/v1/openapi.json", "--header", f"X-API-Key: {key}",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "25", "--seed", "19", "--workers", "1", "--max-time", "30",
            "--request-timeout", "20", "--no-shrink",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report.replace(key, "mdw_...")
    assert "Traceback" not in server.log.read_text()
