"""Schedules that keep the bars current: stocks after the close, crypto daily in UTC."""

import dagster as dg

from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS
from marketdata_pipeline.defs.partitions import partition_key
from marketdata_pipeline.domain import Market
from marketdata_pipeline.quality.calendars import refresh_months

REFRESH_JOBS = {
    market: dg.define_asset_job(
        f"{market}_bars_refresh",
        selection=dg.AssetSelection.assets(
            *(spec.name for spec in ALL_BARS_ASSETS if spec.market is market)
        ),
        description=f"Daily and minute {market} bars of the given partitions.",
    )
    for market in Market
}
stock_bars_refresh = REFRESH_JOBS[Market.STOCK]
crypto_bars_refresh = REFRESH_JOBS[Market.CRYPTO]


def _requests(
    context: dg.ScheduleEvaluationContext, market: Market
) -> list[dg.RunRequest] | dg.SkipReason:
    now = context.scheduled_execution_time
    symbols = context.instance.get_dynamic_partitions(market.symbol_dimension)
    if not symbols:
        return dg.SkipReason(f"no {market.symbol_dimension} registered yet")
    months = refresh_months(market, now)
    return [
        dg.RunRequest(
            run_key=f"{now:%Y-%m-%d}|{month}|{symbol}",
            partition_key=partition_key(month, symbol),
            tags={"marketdata/trigger": "schedule"},
        )
        for month in months
        for symbol in sorted(symbols)
    ]


@dg.schedule(
    job=stock_bars_refresh,
    cron_schedule="30 20 * * 1-5",
    execution_timezone="America/New_York",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekdays 20:30 New York, after extended hours: refreshes the month of the "
    "last complete NYSE session (and the previous month on a month's first session).",
)
def stock_bars_after_close(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _requests(context, Market.STOCK)


@dg.schedule(
    job=crypto_bars_refresh,
    cron_schedule="30 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily 00:30 UTC: refreshes the month of the last complete UTC day (and the "
    "previous month on a month's first day).",
)
def crypto_bars_daily(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _requests(context, Market.CRYPTO)
