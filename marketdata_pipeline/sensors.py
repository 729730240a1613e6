"""Sensors: the symbol registry drives the dynamic partitions."""

import dagster as dg

from marketdata_pipeline import config, registry
from marketdata_pipeline.assets import ALL_BARS_ASSETS
from marketdata_pipeline.partitions import SYMBOL_DIMENSIONS, months
from marketdata_pipeline.resources import WarehouseResource
from marketdata_pipeline.schedules import crypto_bars_refresh, stock_bars_refresh


def partition_changes(
    instance: dg.DagsterInstance, active: dict[str, list[str]]
) -> tuple[list[dg.AddDynamicPartitionsRequest], list[dg.DeleteDynamicPartitionsRequest], dict]:
    """Requests that make each dimension's partitions equal its active symbols."""
    adds, deletes, added = [], [], {}
    for dimension, symbols in active.items():
        current = set(instance.get_dynamic_partitions(dimension))
        new = [s for s in symbols if s not in current]
        gone = sorted(current - set(symbols))
        if new:
            adds.append(dg.AddDynamicPartitionsRequest(dimension, new))
            added[dimension] = new
        if gone:
            deletes.append(dg.DeleteDynamicPartitionsRequest(dimension, gone))
    return adds, deletes, added


def history_backfill(dimension: str, symbol: str) -> list[dg.RunRequest]:
    """One ranged run per bars asset of the symbol's class, over the whole history."""
    asset_class = "crypto" if dimension == "crypto_symbols" else "stock"
    keys = months().get_partition_keys()
    return [
        dg.RunRequest(
            run_key=f"history|{spec.name}|{symbol}",
            job_name=f"{asset_class}_bars_refresh",
            asset_selection=[dg.AssetKey(spec.name)],
            tags={
                "dagster/asset_partition_range_start": f"{keys[0]}|{symbol}",
                "dagster/asset_partition_range_end": f"{keys[-1]}|{symbol}",
                "marketdata/trigger": "new symbol",
            },
        )
        for spec in ALL_BARS_ASSETS
        if spec.asset_class == asset_class
    ]


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Keeps the stock_symbols / crypto_symbols partitions equal to the active "
    f"symbols of tracked_symbols, and backfills history from {config.history_start():%Y-%m} "
    "for each newly added symbol.",
    jobs=[stock_bars_refresh, crypto_bars_refresh],
)
def symbol_registry_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SensorResult:
    with warehouse.connection() as conn:
        active = {
            dimension: registry.active_symbols(conn, classes)
            for dimension, classes in SYMBOL_DIMENSIONS.items()
        }
    adds, deletes, added = partition_changes(context.instance, active)
    runs = [
        run
        for dimension, symbols in added.items()
        for symbol in symbols
        for run in history_backfill(dimension, symbol)
    ]
    if adds or deletes:
        context.log.info(
            f"partitions: added {added}, removed {[d.partition_keys for d in deletes]}"
        )
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[*adds, *deletes],
        skip_reason=None if adds or deletes else "partitions already match the registry",
    )
