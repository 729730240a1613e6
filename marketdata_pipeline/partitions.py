"""Partitions of the bars assets: month x symbol, with the symbols as dynamic partitions."""

import dagster as dg

from marketdata_pipeline import config

# Registry asset classes behind each dynamic symbol dimension (ETFs are stock symbols).
SYMBOL_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "stock_symbols": ("stock", "etf"),
    "crypto_symbols": ("crypto",),
}

stock_symbols = dg.DynamicPartitionsDefinition(name="stock_symbols")
crypto_symbols = dg.DynamicPartitionsDefinition(name="crypto_symbols")


def months() -> dg.MonthlyPartitionsDefinition:
    # end_offset=1: the month in progress is a partition, so the schedules can refresh it.
    return dg.MonthlyPartitionsDefinition(
        start_date=config.history_start().isoformat(), end_offset=1
    )


def bars_partitions(asset_class: str) -> dg.MultiPartitionsDefinition:
    symbols = crypto_symbols if asset_class == "crypto" else stock_symbols
    return dg.MultiPartitionsDefinition({"month": months(), "symbol": symbols})
