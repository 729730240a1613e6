"""How many runs a backfill of S symbols x M months makes: from an asset's Materialize dialog
(launched through the webserver's GraphQL API as the UI does, cut into runs by the backfill
daemon's own iteration), and from the `backfill_history` job (one run per symbol and asset).

Real Dagster: the code location in its own gRPC server, runs queued, not executed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import date

import dagster as dg
import psycopg
import pytest
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from marketdata_pipeline.defs.backfills import backfill_history, history_backfill_runs
from marketdata_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.domain import AssetClass, next_month
from marketdata_pipeline.registry import symbols as registry
from tests.conftest import PROJECT_DIR

STOCKS = [f"S{i:02d}" for i in range(20)]  # registry order: the stock_symbols partitions
CRYPTO = ["BTC", "ETH", "SOL"]
LAUNCH = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    queued = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}
    with dg.instance_for_test(overrides={"run_coordinator": queued}) as test_instance:
        test_instance.add_dynamic_partitions("stock_symbols", STOCKS)
        test_instance.add_dynamic_partitions("crypto_symbols", CRYPTO)
        yield test_instance


def months(count: int) -> list[date]:
    result = [date(2022, 1, 1)]
    while len(result) < count:
        result.append(next_month(result[-1]))
    return result


def ui_backfill(
    instance: dg.DagsterInstance, asset: str, symbols: list[str], count: int
) -> list[dg.DagsterRun]:
    """The runs the backfill daemon makes of a Materialize-dialog backfill."""
    keys = [f"{month}|{symbol}" for symbol in symbols for month in months(count)]
    params = {"assetSelection": [{"path": [asset]}], "partitionNames": keys}
    definitions = str(PROJECT_DIR / "marketdata_pipeline" / "definitions.py")
    with define_out_of_process_context(definitions, "defs", instance) as context:
        result = execute_dagster_graphql(context, LAUNCH, {"params": params})
        launched = result.data["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        for _ in range(3):  # the daemon's iterations: the first requests every root partition
            list(execute_backfill_iteration(context.process_context, logging.getLogger("test")))
    return list(instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": launched["backfillId"]})))


def blocks(symbols: list[str], order: list[str]) -> int:
    """How many runs of adjacent partitions the symbols make in the partitions' order."""
    positions = sorted(order.index(s) for s in symbols)
    return 1 + sum(1 for a, b in itertools.pairwise(positions) if b != a + 1)


CASES = [
    ("stock_daily_bars", [STOCKS[0], STOCKS[2], STOCKS[4]], 3),  # 3 x 3, none adjacent
    ("stock_minute_bars", [STOCKS[0], STOCKS[1], STOCKS[3], STOCKS[5]], 2),  # 4 x 2
    ("crypto_daily_bars", CRYPTO, 2),  # 3 crypto x 2
    ("stock_daily_bars", STOCKS, 3),  # 20 x 3, adjacent
    ("stock_minute_bars", [STOCKS[3], STOCKS[11]], 24),  # 2 x 24
]


@pytest.mark.parametrize(("asset", "symbols", "count"), CASES, ids=lambda c: str(c)[:20])
def test_a_ui_backfill_makes_the_runs_the_readme_says(
    instance: dg.DagsterInstance, asset: str, symbols: list[str], count: int
) -> None:
    """S runs, one per symbol's months, only when S < M; else M x the blocks of adjacent
    symbols (Dagster groups by the dimension with fewer keys): the README's count."""
    runs = ui_backfill(instance, asset, symbols, count)
    order = CRYPTO if asset.startswith("crypto") else STOCKS
    if len(symbols) < count:
        assert len(runs) == len(symbols)
        ranges = {(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in runs}
        first, last = months(count)[0], months(count)[-1]
        assert ranges == {(f"{first}|{s}", f"{last}|{s}") for s in symbols}
    else:
        assert len(runs) == count * blocks(symbols, order)


@pytest.mark.parametrize(("symbols", "count"), [(STOCKS[:3], 3), (STOCKS[::5], 2), (CRYPTO, 2)])
def test_backfill_history_makes_one_run_per_symbol_and_asset(
    warehouse_url: str, instance: dg.DagsterInstance, symbols: list[str], count: int
) -> None:
    with psycopg.connect(warehouse_url) as conn:  # the default symbols hold the crypto ones
        for symbol in set(symbols) - set(CRYPTO):
            registry.add(conn, symbol, AssetClass.STOCK)
    first, last = months(count)[0], months(count)[-1]
    config = {"symbols": symbols, "first_month": f"{first:%Y-%m}", "last_month": f"{last:%Y-%m}"}
    result = backfill_history.execute_in_process(
        run_config={"ops": {"plan_history_backfill": {"config": config}}},
        instance=instance,
        resources={"warehouse": WarehouseResource()},
    )
    assert result.success
    [success] = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
    context = dg.build_run_status_sensor_context(
        sensor_name=history_backfill_runs.name,
        dagster_event=success.dagster_event,  # type: ignore[arg-type]
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"warehouse": WarehouseResource()},
    )
    requests = history_backfill_runs(context)
    assert isinstance(requests, list)
    assert len(requests) == 2 * len(symbols)  # daily and minute
    got = sorted((r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in requests)
    want = sorted((f"{first}|{s}", f"{last}|{s}") for s in symbols for _ in range(2))
    assert got == want


def test_backfill_history_refuses_an_unregistered_symbol_in_one_line(
    warehouse_url: str, instance: dg.DagsterInstance
) -> None:
    result = backfill_history.execute_in_process(
        run_config={"ops": {"plan_history_backfill": {"config": {"symbols": ["NOPE"]}}}},
        instance=instance,
        resources={"warehouse": WarehouseResource()},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message.strip()  # type: ignore[union-attr]
    assert "\n" not in message
    assert message.endswith(
        "symbol NOPE is not registered: register it with `marketdata symbols add` or the "
        "add_symbol job"
    )
