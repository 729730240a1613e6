"""Partitions of the bars assets: month x symbol, with each market's symbols as dynamic
partitions (`stock_symbols`, `crypto_symbols`)."""

from datetime import date

import dagster as dg

from marketdata_pipeline import config
from marketdata_pipeline.domain import Market

SYMBOL_PARTITIONS = {
    market: dg.DynamicPartitionsDefinition(name=market.symbol_dimension) for market in Market
}

# Dagster's run tags for what a run targets: one partition, or a range of them.
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def months() -> dg.MonthlyPartitionsDefinition:
    # end_offset=1: the month in progress is a partition, so the schedules can refresh it.
    return dg.MonthlyPartitionsDefinition(
        start_date=config.history_start().isoformat(), end_offset=1
    )


def bars_partitions(market: Market) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({"month": months(), "symbol": SYMBOL_PARTITIONS[market]})


def partition_key(month: date, symbol: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"month": month.isoformat(), "symbol": symbol})


def month_and_symbol(partitions: dg.MultiPartitionsDefinition, key: str) -> tuple[date, str]:
    """The month and symbol of a bars partition key such as `2024-01-01|AAPL`."""
    dimensions = partitions.get_partition_key_from_str(key).keys_by_dimension
    return date.fromisoformat(dimensions["month"]), dimensions["symbol"]
