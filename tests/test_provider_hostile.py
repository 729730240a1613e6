"""The pipeline against the provider as it really is and at its worst: bars out of order and
late, runaway cursors, empty answers, future bars, wrong types, echoed keys, plan limits.

Nothing lost: for every hostile mode, each month's loaded + quarantined bars equal what the
provider sent for it. Nothing runaway: pagination stops with the request id. Nothing wiped:
an answer that would empty or halve a loaded month is refused.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import httpx
import polars as pl
import psycopg
import pytest

from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.pipeline import WindowOutcome, ingest
from marketdata_pipeline.polygon.client import (
    PolygonClient,
    PolygonResponseError,
    PolygonUnavailable,
    RetryPolicy,
)
from marketdata_pipeline.polygon.simulator import Faults, Simulator, serve
from marketdata_pipeline.quality.coverage import coverage
from marketdata_pipeline.warehouse.connection import connection
from tests.conftest import read_bars

MONTHS = [date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)]
QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
KEY = "pk_test_SECRET_KEY_42"


@pytest.fixture
def conn(migrated_conn: psycopg.Connection) -> psycopg.Connection:
    return migrated_conn


def client_for(sim: Simulator, transport: httpx.BaseTransport | None = None) -> PolygonClient:
    return PolygonClient(
        KEY, "http://simulator", transport=transport or sim.transport(), retry=QUICK
    )


def run(
    client: PolygonClient, conn: psycopg.Connection, months: list[date] = MONTHS, **options
) -> list[WindowOutcome]:
    with client:
        return list(
            ingest(
                client,
                conn,
                market=Market.CRYPTO,
                timeframe=Timeframe.MINUTE,
                symbol="BTC",
                months=months,
                **options,
            )
        )


def expected_count(sim: Simulator, month: date) -> int:
    window = Window.of_month(Market.CRYPTO, Timeframe.MINUTE, "BTC", month)
    return len(sim.expected_bars("X:BTCUSD", "minute", month, window.last_day)["t"])


def latest_ts(conn: psycopg.Connection) -> pl.Series:
    rows = conn.execute("SELECT ts FROM bars_minute ORDER BY ts").fetchall()
    return pl.Series("ts", [ts for (ts,) in rows], dtype=pl.Datetime("us", "UTC"))


def stored_counts(conn: psycopg.Connection, month: date) -> tuple[int, int]:
    window = Window.of_month(Market.CRYPTO, Timeframe.MINUTE, "BTC", month)
    [(loaded,)] = conn.execute(
        "SELECT count(*) FROM bars_minute WHERE symbol = 'BTC' AND ts >= %s AND ts < %s",
        (window.start, window.end),
    ).fetchall()
    [(rejected,)] = conn.execute(
        "SELECT count(*) FROM bars_rejected WHERE symbol = 'BTC' AND month = %s", (month,)
    ).fetchall()
    return loaded, rejected


@pytest.mark.parametrize(
    "faults",
    [
        Faults(order="desc"),
        Faults(order="shuffled"),
        Faults(late_every=997),
        Faults(wrong_types_every=5000),
        Faults(repeat_timestamp_every=4000),
        Faults(bad_ohlc_every=3000),
    ],
    ids=["desc", "shuffled", "late", "wrong-types", "repeat-timestamp", "bad-ohlc"],
)
def test_every_bar_sent_is_loaded_or_quarantined_exactly_once(conn, faults: Faults) -> None:
    sim = Simulator()
    sim.inject(faults)
    outcomes = run(client_for(sim), conn)
    final = {o.window.month: o for o in outcomes}  # a late month is fetched again, last wins
    assert sorted(final) == MONTHS
    for month in MONTHS:
        sent = expected_count(sim, month)
        loaded, rejected = stored_counts(conn, month)
        outcome = final[month]
        assert outcome.load is not None and outcome.validation is not None
        assert (outcome.load.rows_loaded, outcome.load.rows_rejected) == (loaded, rejected)
        assert loaded + rejected == sent == outcome.validation.received, month
        print(f"{faults}: {month:%Y-%m} sent {sent}, loaded {loaded}, quarantined {rejected}")
    if faults.order != "asc" or faults.late_every:  # reordering loses and alters nothing
        for month in MONTHS:
            assert stored_counts(conn, month) == (expected_count(sim, month), 0)


def test_bars_in_reverse_order_land_in_their_own_months(conn) -> None:
    sim = Simulator()
    sim.inject(Faults(order="desc"))
    run(client_for(sim), conn)
    for month in MONTHS:
        window = Window.of_month(Market.CRYPTO, Timeframe.MINUTE, "BTC", month)
        got = read_bars(conn, Timeframe.MINUTE, "BTC", window.start, window.end)
        want = sim.expected_bars("X:BTCUSD", "minute", month, window.last_day)
        assert got["ts"].dt.epoch("ms").to_list() == sorted(want["t"].tolist())


def test_a_cursor_that_never_advances_stops_with_the_request_id(conn) -> None:
    sim = Simulator()
    sim.inject(Faults(repeat_cursor=True))
    with pytest.raises(PolygonResponseError, match=r"repeated a page cursor .*request id \w+"):
        run(client_for(sim), conn)
    assert len(sim.requests) <= 3


def test_more_pages_than_the_range_can_hold_stop_the_stream(conn) -> None:
    sim = Simulator()
    inner = sim.transport()
    served = [0]

    def endless(request: httpx.Request) -> httpx.Response:
        # A provider whose cursor always moves on but whose pages never end.
        served[0] += 1
        response = inner.handle_request(request)
        body = json.loads(response.read())
        path = request.url.path
        body["next_url"] = f"http://simulator{path}?sort=asc&limit=50000&page={served[0]}"
        body.pop("results", None)
        return httpx.Response(200, json=body, headers={"X-Request-Id": f"r{served[0]}"})

    with pytest.raises(PolygonResponseError, match=r"more than \d+ pages .*request id \w+"):
        run(client_for(sim, httpx.MockTransport(endless)), conn, [MONTHS[0]])
    assert served[0] <= 4, "a month of minutes fits one page: two spare at most"


def test_an_empty_answer_never_wipes_a_loaded_month_unless_accepted(conn) -> None:
    sim = Simulator()
    run(client_for(sim), conn, [MONTHS[0]])
    before = stored_counts(conn, MONTHS[0])
    assert before[0] > 40_000

    sim.inject(Faults(empty_results=-1))
    [outcome] = run(client_for(sim), conn, [MONTHS[0]])
    assert outcome.load is None
    assert outcome.refused and "0 valid bars where" in outcome.refused
    assert stored_counts(conn, MONTHS[0]) == before

    [accepted] = run(client_for(sim), conn, [MONTHS[0]], accept_shrink=True)
    assert accepted.load is not None and accepted.load.rows_replaced == before[0]
    assert stored_counts(conn, MONTHS[0]) == (0, 0)


def test_an_all_rejected_answer_is_refused_and_the_next_month_still_loads(conn) -> None:
    sim = Simulator()
    run(client_for(sim), conn, MONTHS[:1])
    before = stored_counts(conn, MONTHS[0])
    sim.inject(Faults(bad_ohlc_every=1))
    outcomes = run(client_for(sim), conn, MONTHS[:2])
    assert [o.refused is not None for o in outcomes] == [True, False]
    assert stored_counts(conn, MONTHS[0]) == before
    loaded, rejected = stored_counts(conn, MONTHS[1])
    assert loaded == 0 and rejected == expected_count(sim, MONTHS[1]), "an empty month fills"


def test_bars_that_start_after_the_fetch_are_rejected_with_their_reason(conn) -> None:
    now = datetime.now(UTC)
    month = now.date().replace(day=1)
    sim = Simulator(now=now + timedelta(days=2))  # a provider whose clock runs ahead
    [outcome] = run(client_for(sim), conn, [month])
    assert outcome.validation is not None and outcome.load is not None
    rejected = outcome.validation.rejected
    assert rejected.height > 0
    assert all(
        any(r.startswith("ts starts after the fetch") for r in reasons)
        for reasons in rejected["reasons"].to_list()
    )
    latest_valid = outcome.validation.valid["ts"].max()
    assert isinstance(latest_valid, datetime) and latest_valid <= datetime.now(UTC)
    [(latest,)] = conn.execute("SELECT max(ts) FROM bars_minute").fetchall()
    assert latest <= datetime.now(UTC)
    window = outcome.window
    measured = coverage(Market.CRYPTO, Timeframe.MINUTE, month, window.last_day, latest_ts(conn))
    # Only finished days are expected (none on the 1st of a month): never above 1.
    assert measured.ratio is None or 0.9 < measured.ratio <= 1.0


def test_a_key_echoed_by_a_gateway_never_reaches_the_error(conn, caplog) -> None:
    sim = Simulator()
    sim.inject(Faults(echo_key=True))
    with pytest.raises(PolygonUnavailable) as failed:
        run(client_for(sim), conn, [MONTHS[0]])
    assert "[redacted]" in str(failed.value)
    seen = str(failed.value) + "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in seen


def test_retry_after_as_an_http_date_is_waited_out(conn) -> None:
    sim = Simulator()
    inner = sim.transport()
    asked: list[datetime] = []

    def limited_once(request: httpx.Request) -> httpx.Response:
        asked.append(datetime.now(UTC))
        if len(asked) == 1:
            until = datetime.now(UTC) + timedelta(seconds=2)
            when = until.strftime("%a, %d %b %Y %H:%M:%S GMT")
            return httpx.Response(429, json={"status": "ERROR"}, headers={"Retry-After": when})
        return inner.handle_request(request)

    client = PolygonClient(
        KEY,
        "http://simulator",
        transport=httpx.MockTransport(limited_once),
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05),
    )
    [outcome] = run(client, conn, [MONTHS[0]])
    assert outcome.load is not None
    assert (asked[1] - asked[0]).total_seconds() >= 1.0, "not retried before the date"


def test_values_of_the_wrong_type_are_quarantined_with_their_reason(conn) -> None:
    sim = Simulator()
    sim.inject(Faults(wrong_types_every=5000))
    run(client_for(sim), conn, [MONTHS[0]])
    reasons = pl.DataFrame(
        conn.execute("SELECT reasons FROM bars_rejected").fetchall(),
        schema=["reasons"],
        orient="row",
    )["reasons"].explode()
    assert reasons.str.contains("is a boolean").any()
    assert reasons.str.contains("not an integer in range").any()
    assert not reasons.str.starts_with("open is null").any(), "named by the defect, not as null"


def test_a_wait_longer_than_the_retry_budget_fails_at_once(conn) -> None:
    sim = Simulator()
    sim.inject(Faults(rate_limited=-1, retry_after=3600))
    started = time.monotonic()
    with pytest.raises(PolygonUnavailable, match=r"asked to wait 3600 s .* retry budget"):
        run(client_for(sim), conn, [MONTHS[0]])
    assert time.monotonic() - started < 5
    assert len(sim.requests) == 1


def test_a_key_echoed_in_a_successful_body_is_redacted_everywhere(conn) -> None:
    sim = Simulator()
    inner = sim.transport()

    def echoing(request: httpx.Request) -> httpx.Response:
        body = json.loads(inner.handle_request(request).read())
        body["request_id"] = f"req-{KEY}"
        body["results"][0]["o"] = f"Bearer {KEY}"  # a gateway's debug text in a price
        return httpx.Response(200, json=body)

    [outcome] = run(client_for(sim, httpx.MockTransport(echoing)), conn, [MONTHS[0]])
    assert outcome.load is not None and outcome.load.rows_rejected == 1
    stored = conn.execute("SELECT reasons::text, run_id FROM bars_rejected").fetchall()
    seen = f"{outcome.request_ids} {outcome.validation.rejected if outcome.validation else ''}"
    seen += str(stored)
    assert "[redacted]" in seen
    assert KEY not in seen


def test_a_run_with_late_bars_ends_green_with_every_month_whole(
    warehouse_url: str,
) -> None:
    migrated_url = warehouse_url
    sim = Simulator()
    server = serve(sim)
    asset = next(a for a in bars_assets if a.key.path[-1] == "crypto_minute_bars")
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("crypto_symbols", ["BTC"])
            for faults in (Faults(), Faults(late_every=997)):  # loaded, then re-run hostile
                sim.inject(faults)
                result = dg.materialize(
                    [asset],
                    instance=instance,
                    tags={
                        "dagster/asset_partition_range_start": "2024-01-01|BTC",
                        "dagster/asset_partition_range_end": "2024-03-01|BTC",
                    },
                    resources={
                        "warehouse": WarehouseResource(),
                        "polygon": PolygonResource(base_url=server.url, simulated=True),
                    },
                )
                assert result.success
                checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
                assert checks["rejection_rate"].passed
                assert checks["rejection_rate"].metadata["partitions"].value == 3
    finally:
        server.shutdown()
    with connection(migrated_url) as check:
        for month in MONTHS:
            assert stored_counts(check, month) == (expected_count(sim, month), 0)


@pytest.mark.parametrize("spacing", ["compact", "pretty", "odd"])
def test_a_boolean_price_is_found_whatever_the_bodys_whitespace(conn, spacing: str) -> None:
    """`"o": true` as pretty-printed JSON has it is quarantined, never loaded as 1.0, with
    nothing else wrong on the page to give it away; over a real socket."""
    sim = Simulator()
    sim.inject(Faults(boolean_every=5000, spacing=spacing))
    server = serve(sim)
    try:
        body = httpx.get(
            f"{server.url}/v2/aggs/ticker/X:BTCUSD/range/1/minute/2024-01-01/2024-01-05"
        ).content
        assert (b'"o": true' in body) == (spacing == "pretty")
        assert (b'"o": true' not in body and b'"o":true' not in body) == (spacing == "odd")
        run(PolygonClient(KEY, server.url, retry=QUICK), conn, [MONTHS[0]])
    finally:
        server.shutdown()
        server.server_close()
    loaded, rejected = stored_counts(conn, MONTHS[0])
    assert rejected > 0 and loaded + rejected == expected_count(sim, MONTHS[0])
    reasons = conn.execute("SELECT DISTINCT unnest(reasons) FROM bars_rejected").fetchall()
    assert reasons == [("open is a boolean (true), not a number",)]
    [(ones,)] = conn.execute("SELECT count(*) FROM bars_minute WHERE open = 1.0").fetchall()
    assert ones == 0
