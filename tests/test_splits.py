"""Splits: kept exact from the provider's splits reference; a change makes the symbol's bars
partitions stale in the UI (GraphQL) and the revision sensor re-fetches exactly them.

Real PostgreSQL, the simulator on a loopback socket, Dagster runs, and Dagster's GraphQL API
over the code location loaded as the web server loads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date

import dagster as dg
import httpx
import polars as pl
import psycopg
import pytest
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from marketdata_pipeline.cli.simulator import SPLIT
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.sensors import backfill_status_sensor, register_symbol_partitions
from marketdata_pipeline.defs.splits import split_revision_sensor, stock_splits
from marketdata_pipeline.domain import Market, Split, Timeframe, Window
from marketdata_pipeline.polygon.client import PolygonClient, PolygonResponseError
from marketdata_pipeline.polygon.simulator import Simulator, SimulatorHTTPServer
from marketdata_pipeline.registry.splits import (
    SplitsRefused,
    replace_splits,
    splits_of,
    stale_months,
)
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from tests.conftest import PROJECT_DIR, bars_frame, read_bars, run_cli

SPLIT_DAY = date(2024, 6, 3)
MONTHS = [date(year, month, 1) for year in (2023, 2024) for month in range(1, 13)]
ASSETS = {a.key.to_user_string(): a for a in [*bars_assets, stock_splits]}
SPECS = {spec.timeframe: spec for spec in ALL_BARS_ASSETS if spec.market is Market.STOCK}


def resources(server: SimulatorHTTPServer) -> dict[str, object]:
    return {
        "warehouse": WarehouseResource(),
        "polygon": PolygonResource(
            base_url=server.url, retry_attempts=2, retry_max_seconds=5, simulated=True
        ),
    }


def run(
    instance: dg.DagsterInstance, server: SimulatorHTTPServer, asset: str, tags: dict[str, str]
) -> dg.ExecuteInProcessResult:
    result = dg.materialize(
        [ASSETS[asset]], instance=instance, tags=tags, resources=resources(server)
    )
    assert result.success
    return result


def ranged(first: str, last: str) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }


def stored(url: str, timeframe: Timeframe, symbol: str) -> pl.DataFrame:
    first = Window.of_month(Market.STOCK, timeframe, symbol, MONTHS[0])
    last = Window.of_month(Market.STOCK, timeframe, symbol, MONTHS[-1])
    with db.connection(url) as conn:
        return read_bars(conn, timeframe, symbol, first.start, last.end)


def expected(sim: Simulator, timeframe: Timeframe, symbol: str) -> pl.DataFrame:
    last = Window.of_month(Market.STOCK, timeframe, symbol, MONTHS[-1])
    bars = sim.expected_bars(symbol, timeframe.timespan, MONTHS[0], last.last_day)
    return bars_frame(bars)


STALE = """
query ($key: AssetKeyInput!, $partitions: [String!]!) {
  assetNodes(assetKeys: [$key]) {
    staleStatusByPartition(partitions: $partitions)
    staleCausesByPartition(partitions: $partitions) { reason key { path } partitionKey }
  }
}
"""


def stale_in_the_ui(
    instance: dg.DagsterInstance, asset: str, partitions: list[str]
) -> tuple[list[str], list[str]]:
    """The partitions' stale status as the UI reads it (GraphQL), and the causes' reasons."""
    with define_out_of_process_context(
        str(PROJECT_DIR / "marketdata_pipeline" / "definitions.py"), "defs", instance
    ) as context:
        result = execute_dagster_graphql(
            context, STALE, {"key": {"path": [asset]}, "partitions": partitions}
        )
    assert not result.errors, result.errors
    [node] = result.data["assetNodes"]
    causes = [
        f"{'/'.join(c['key']['path'])} {c['partitionKey']} {c['reason']}"
        for per in node["staleCausesByPartition"]
        for c in per
    ]
    return node["staleStatusByPartition"], causes


def a_bar_in(conn: psycopg.Connection, table: str, symbol: str, month: str) -> None:
    """One bar at noon New York on the month's first day: the month holds bars."""
    conn.execute(
        f"INSERT INTO {table} (symbol, ts, open, high, low, close, volume) VALUES "
        "(%s, (%s::date + time '12:00') AT TIME ZONE 'America/New_York', 1, 1, 1, 1, 1)",
        (symbol, month),
    )


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_splits_are_kept_exact_corrections_and_withdrawals_included(
    migrated_url: str, sim: Simulator
) -> None:
    client = PolygonClient(None, "http://simulator", transport=sim.transport())
    sim.split("AAPL", date(2020, 8, 31), 4.0)
    with db.connection(migrated_url, autocommit=True) as conn:
        first = replace_splits(conn, "AAPL", client.splits("AAPL"))
        assert first.first_fetch and [s.execution_date for s in first.added] == [date(2020, 8, 31)]
        assert not replace_splits(conn, "AAPL", client.splits("AAPL")), "idempotent"
        assert not replace_splits(conn, "MSFT", client.splits("MSFT"))

        sim.split("AAPL", SPLIT_DAY, 2.0)  # a new split
        assert replace_splits(conn, "AAPL", client.splits("AAPL")).describe() == (
            "2:1 split on 2024-06-03 added"
        )
        sim.withdraw_split("AAPL", SPLIT_DAY)  # corrected: 3:1, not 2:1
        sim.split("AAPL", SPLIT_DAY, 3.0)
        assert replace_splits(conn, "AAPL", client.splits("AAPL")).describe() == (
            "split on 2024-06-03 changed to 3:1"
        )
        sim.withdraw_split("AAPL", SPLIT_DAY)  # withdrawn
        assert replace_splits(conn, "AAPL", client.splits("AAPL")).describe() == (
            "split on 2024-06-03 withdrawn"
        )
        assert [s.execution_date for s in splits_of(conn, "AAPL")] == [date(2020, 8, 31)]
        kept = conn.execute("SELECT count(*) FROM splits WHERE withdrawn_at IS NOT NULL")
        assert kept.fetchone() == (1,), "a withdrawn split is kept, marked"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"split_to": 0}, "without a positive ratio for AAPL"),
        ({"split_from": "1"}, "without a positive ratio for AAPL"),
        ({"execution_date": "2024-13-01"}, "without a valid date for AAPL"),
        ({"ticker": "MSFT"}, "listed a split of 'MSFT'"),
        ({"next_url": "/v3/reference/splits?cursor=again"}, "do not end"),
    ],
)
def test_a_splits_answer_that_breaks_the_spec_fails_the_fetch(record: dict, message: str) -> None:
    """A split taken wrong would rewrite history: such an answer fails, naming what."""
    split = {"execution_date": "2024-06-03", "id": "E1", "split_from": 1, "split_to": 4}
    next_url = record.pop("next_url", None)
    body = {"status": "OK", "request_id": "r1", "results": [{**split, "ticker": "AAPL", **record}]}
    if next_url:
        body["next_url"] = next_url
    provider = httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    with pytest.raises(PolygonResponseError, match=message):
        PolygonClient(None, "http://crafted", transport=provider).splits("AAPL")


def test_a_month_is_stale_after_a_split_change_takes_effect(migrated_url: str) -> None:
    with db.connection(migrated_url, autocommit=True) as conn:  # each change its own moment
        replace_splits(conn, "AAPL", [])
        replace_splits(conn, "MSFT", [])
        conn.execute(
            "INSERT INTO loaded_months VALUES ('daily', 'AAPL', '2024-01-01', now()), "
            "('minute', 'AAPL', '2024-01-01', now()), ('daily', 'MSFT', '2024-01-01', now()), "
            "('daily', 'AAPL', '2024-02-01', now())"  # loaded, but without bars
        )
        for table, symbol in [
            ("bars_daily", "AAPL"),
            ("bars_minute", "AAPL"),
            ("bars_daily", "MSFT"),
        ]:
            a_bar_in(conn, table, symbol, "2024-01-01")
        assert stale_months(conn, ["AAPL", "MSFT"]) == []
        announced = Split("AAPL", date(2099, 1, 2), 1, 4, "e1")  # not executed yet
        replace_splits(conn, "AAPL", [announced])
        assert stale_months(conn, ["AAPL", "MSFT"]) == [], "a future split changes nothing yet"
        replace_splits(conn, "AAPL", [announced, Split("AAPL", SPLIT_DAY, 1, 4, "e2")])
        stale = stale_months(conn, ["AAPL", "MSFT"])
    assert [(s.symbol, s.timeframe, s.months) for s in stale] == [
        ("AAPL", Timeframe.DAILY, [date(2024, 1, 1)]),  # February holds nothing to adjust
        ("AAPL", Timeframe.MINUTE, [date(2024, 1, 1)]),
    ]
    assert stale[0].why == "4:1 split on 2024-06-03"


def test_months_loaded_before_a_symbols_first_splits_fetch_are_stale_if_it_lists_a_split(
    migrated_url: str,
) -> None:
    """The provider may list a split days after it executed: a month loaded before the fetch
    that first lists it may lack it, whatever the order of loads and first fetch."""
    with db.connection(migrated_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO loaded_months VALUES ('daily', 'AAPL', '2024-07-01', now()), "
            "('daily', 'MSFT', '2024-07-01', now())"
        )
        a_bar_in(conn, "bars_daily", "AAPL", "2024-07-01")
        a_bar_in(conn, "bars_daily", "MSFT", "2024-07-01")
        # First fetches after the loads: AAPL lists a split executed before them.
        replace_splits(conn, "AAPL", [Split("AAPL", SPLIT_DAY, 1, 4, "e1")])
        replace_splits(conn, "MSFT", [])
        stale = stale_months(conn, ["AAPL", "MSFT"])
        assert [(s.symbol, s.months) for s in stale] == [("AAPL", [date(2024, 7, 1)])]
        # Loaded again after the fetch: it holds the split now.
        conn.execute("UPDATE loaded_months SET loaded_at = now() WHERE symbol = 'AAPL'")
        assert stale_months(conn, ["AAPL", "MSFT"]) == []


def test_a_revision_fetches_exactly_the_stale_months_with_bars_in_consecutive_streams(
    warehouse_url: str, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    loaded = ["2024-01-01", "2024-02-01", "2024-05-01", "2024-06-01", "2024-07-01"]
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)
        register_symbol_partitions(instance, conn)
    with db.connection(warehouse_url, autocommit=True) as conn:  # each change its own moment
        replace_splits(conn, "AAPL", [])
        for month in [*loaded, "2024-03-01"]:  # March is loaded, but holds no bar
            conn.execute("INSERT INTO loaded_months VALUES ('daily', 'AAPL', %s, now())", (month,))
        for month in loaded:
            a_bar_in(conn, "bars_daily", "AAPL", month)
        replace_splits(conn, "AAPL", [Split("AAPL", SPLIT_DAY, 1, 4, "e1")])
    context = dg.build_sensor_context(instance=instance, resources=resources(server))
    requested = split_revision_sensor(context)
    assert isinstance(requested, dg.SensorResult)
    ranges = sorted(
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in requested.run_requests or []
    )
    assert ranges == [
        ("2024-01-01|AAPL", "2024-02-01|AAPL"),
        ("2024-05-01|AAPL", "2024-07-01|AAPL"),
    ]
    assert len({r.run_key for r in requested.run_requests or []}) == 2


@pytest.mark.slow
def test_a_split_revises_that_symbols_history_exactly_and_nothing_else(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)  # AAPL and MSFT are the first default stock symbols
        register_symbol_partitions(instance, conn)  # as `marketdata ui` and the sensor do
    first = run(instance, server, "stock_splits", ranged("AAPL", "MSFT"))
    fetched = {
        str(m.partition): m.materialization.description
        for m in first.get_asset_materialization_events()
    }
    assert {"AAPL", "MSFT"} <= set(fetched), "a first fetch materializes its partition"
    assert set(fetched.values()) == {"first fetch: no split"}
    for spec in SPECS.values():
        run(instance, server, spec.name, ranged(f"{MONTHS[0]}|AAPL", f"{MONTHS[-1]}|MSFT"))
    msft_before = {t: stored(warehouse_url, t, "MSFT") for t in Timeframe}
    aapl_before = stored(warehouse_url, Timeframe.DAILY, "AAPL")

    sim.split("AAPL", SPLIT_DAY, 4.0)
    splits = run(instance, server, "stock_splits", ranged("AAPL", "MSFT"))
    changed = [str(m.partition) for m in splits.get_asset_materialization_events()]
    assert changed == ["AAPL"], "only a symbol whose splits changed is materialized"

    keys = {symbol: [f"{m}|{symbol}" for m in MONTHS] for symbol in ("AAPL", "MSFT")}
    status, causes = stale_in_the_ui(instance, "stock_daily_bars", keys["AAPL"] + keys["MSFT"])
    assert status == ["STALE"] * len(MONTHS) + ["FRESH"] * len(MONTHS)
    # The cause, as the UI shows it: the symbol's splits partition changed.
    assert causes == ["stock_splits AAPL has a new materialization"] * len(MONTHS)

    context = dg.build_sensor_context(instance=instance, resources=resources(server))
    requested = split_revision_sensor(context)
    assert isinstance(requested, dg.SensorResult)
    revisions = requested.run_requests or []
    assert len(revisions) == 2  # one per bars asset, for AAPL only
    sim.requests.clear()
    pages = 0
    for request in revisions:
        assert request.tags["marketdata/revision"] == "AAPL 4:1 split on 2024-06-03"
        [key] = request.asset_selection or []
        result = run(instance, server, key.to_user_string(), dict(request.tags))
        materialized = result.get_asset_materialization_events()
        assert sorted(str(m.partition) for m in materialized) == keys["AAPL"]
        pages += sum(m.materialization.metadata["pages"].value for m in materialized)  # type: ignore[misc]
    assert all("/AAPL/" in r for r in sim.requests), "no other symbol is fetched"
    # Each asset's 24 months come in one paged stream: requests are its pages, not months.
    assert len(sim.requests) <= pages and len(sim.requests) < 2 * len(MONTHS)
    print(f"revision of AAPL: {2 * len(MONTHS)} months re-fetched in {len(sim.requests)} requests")

    for timeframe in Timeframe:
        assert stored(warehouse_url, timeframe, "AAPL").equals(expected(sim, timeframe, "AAPL"))
        assert stored(warehouse_url, timeframe, "MSFT").equals(msft_before[timeframe])
    # Adjusted history is the whole series divided by 4: continuous across the split.
    ratios = aapl_before["close"] / stored(warehouse_url, Timeframe.DAILY, "AAPL")["close"]
    assert ratios.len() > 400 and all(abs(r - 4) < 0.01 for r in ratios.to_list())

    with db.connection(warehouse_url) as conn:
        assert stale_months(conn, ["AAPL", "MSFT"]) == []
    status, _ = stale_in_the_ui(instance, "stock_daily_bars", keys["AAPL"])
    assert status == ["FRESH"] * len(MONTHS)
    again = split_revision_sensor(context)
    assert isinstance(again, dg.SensorResult) and not again.run_requests

    backfill_status_sensor(dg.build_sensor_context(instance=instance, resources=resources(server)))
    with psycopg.connect(warehouse_url) as conn:
        revised = conn.execute(
            "SELECT count(*) FROM backfill_state WHERE symbol = 'AAPL' "
            "AND revised_for = 'AAPL 4:1 split on 2024-06-03'"
        ).fetchone()
    assert revised == (2 * len(MONTHS),)


def test_the_demo_stages_a_split_the_simulator_then_lists(sim: Simulator) -> None:
    staged = SPLIT.convert("aapl:2024-06-03:4@0.01", None, None)  # in 0.6 s
    staged.stage(sim)
    client = PolygonClient(None, "http://simulator", transport=sim.transport())
    assert client.splits("AAPL") == [], "not yet"
    time.sleep(1.5)
    [split] = client.splits("AAPL")
    assert (split.execution_date, split.ratio) == (SPLIT_DAY, "4:1")


@pytest.mark.parametrize("spec", ["AAPL:2024-13-01:4", "AAPL:2024-06-03:0", "AAPL:2024-06-03"])
def test_a_bad_split_option_is_one_line_and_exit_2(spec: str) -> None:
    done = run_cli("simulator", "--port", "0", "--split", spec)
    assert done.returncode == 2 and "Invalid value for '--split'" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_announced_split_is_observed_until_it_takes_effect_then_revised(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)
        register_symbol_partitions(instance, conn)
        conn.execute(
            "INSERT INTO loaded_months VALUES "
            "('daily', 'AAPL', '2024-01-01', now() - interval '3 days')"
        )
        a_bar_in(conn, "bars_daily", "AAPL", "2024-01-01")
    run(instance, server, "stock_splits", ranged("AAPL", "AAPL"))  # none yet
    sim.split("AAPL", date(2099, 1, 2), 4.0)  # announced for a later day
    announced = run(instance, server, "stock_splits", ranged("AAPL", "AAPL"))
    assert not announced.get_asset_materialization_events()
    context = dg.build_sensor_context(instance=instance, resources=resources(server))
    quiet = split_revision_sensor(context)
    assert isinstance(quiet, dg.SensorResult) and not quiet.run_requests

    with db.connection(warehouse_url) as conn:  # its day comes, in New York
        conn.execute(
            "UPDATE splits SET execution_date = (now() AT TIME ZONE 'America/New_York')::date "
            "WHERE symbol = 'AAPL'"
        )
    due = split_revision_sensor(context)
    assert isinstance(due, dg.SensorResult)
    assert [r.tags["dagster/asset_partition_range_start"] for r in due.run_requests or []] == [
        "2024-01-01|AAPL"
    ]
    [event] = due.asset_events
    assert isinstance(event, dg.AssetMaterialization) and event.partition == "AAPL"
    assert "4:1 split on" in (event.description or "")


def test_a_split_withdrawn_before_its_day_changes_nothing_and_an_empty_list_is_refused(
    migrated_url: str,
) -> None:
    with db.connection(migrated_url, autocommit=True) as conn:
        replace_splits(conn, "AAPL", [Split("AAPL", date(2020, 8, 31), 1, 4, "e0")])
        conn.execute("UPDATE splits SET changed_at = now() - interval '5 days'")  # first seen
        conn.execute(
            "INSERT INTO loaded_months VALUES "
            "('daily', 'AAPL', '2024-01-01', now() - interval '4 days')"
        )
        a_bar_in(conn, "bars_daily", "AAPL", "2024-01-01")
        announced = Split("AAPL", date(2099, 1, 2), 1, 4, "e1")
        replace_splits(conn, "AAPL", [Split("AAPL", date(2020, 8, 31), 1, 4, "e0"), announced])
        replace_splits(conn, "AAPL", [Split("AAPL", date(2020, 8, 31), 1, 4, "e0")])  # withdrawn
        # As if seen 3 days ago, withdrawn 2 days ago, and its day was yesterday.
        conn.execute(
            "UPDATE splits SET changed_at = now() - interval '3 days', "
            "withdrawn_at = now() - interval '2 days', "
            "execution_date = (now() AT TIME ZONE 'America/New_York')::date - 1 "
            "WHERE provider_id = 'e1'"
        )
        assert stale_months(conn, ["AAPL"]) == [], "withdrawn before its day: never in effect"
        with pytest.raises(SplitsRefused, match="listed no split of AAPL where 1 are known"):
            replace_splits(conn, "AAPL", [])
        assert [s.provider_id for s in splits_of(conn, "AAPL")] == ["e0"]
        withdrawn = replace_splits(conn, "AAPL", [], accept_withdrawal=True)
        assert withdrawn.withdrawn == [date(2020, 8, 31)] and splits_of(conn, "AAPL") == []


def test_a_refused_withdrawal_says_in_one_line_how_to_accept_it_and_the_config_does(
    warehouse_url: str, sim: Simulator, server: SimulatorHTTPServer, instance: dg.DagsterInstance
) -> None:
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)
        register_symbol_partitions(instance, conn)
    sim.split("AAPL", SPLIT_DAY, 4.0)
    run(instance, server, "stock_splits", ranged("AAPL", "AAPL"))
    sim.withdraw_split("AAPL", SPLIT_DAY)  # the demo restarted without its --split
    refused = dg.materialize(
        [stock_splits],
        instance=instance,
        tags=ranged("AAPL", "AAPL"),
        resources=resources(server),
        raise_on_error=False,
    )
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message.strip()  # type: ignore[union-attr]
    assert "\n" not in message and message.count("AAPL:") == 1, message
    assert "accept_withdrawal: true" in message
    accepted = dg.materialize(
        [stock_splits],
        instance=instance,
        tags=ranged("AAPL", "AAPL"),
        resources=resources(server),
        run_config={"ops": {"stock_splits": {"config": {"accept_withdrawal": True}}}},
    )
    assert accepted.success
    with db.connection(warehouse_url) as conn:
        assert splits_of(conn, "AAPL") == []
