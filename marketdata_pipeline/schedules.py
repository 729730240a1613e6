"""Schedules that keep the bars current: stocks after the close, crypto daily in UTC."""

import dagster as dg

from marketdata_pipeline.assets import ALL_BARS_ASSETS, partition_key
from marketdata_pipeline.refresh import refresh_months


def _job(asset_class: str):
    names = [spec.name for spec in ALL_BARS_ASSETS if spec.asset_class == asset_class]
    return dg.define_asset_job(
        f"{asset_class}_bars_refresh",
        selection=dg.AssetSelection.assets(*names),
        description=f"Daily and minute {asset_class} bars of the given partitions.",
    )


stock_bars_refresh = _job("stock")
crypto_bars_refresh = _job("crypto")


def _requests(
    context: dg.ScheduleEvaluationContext, asset_class: str, dimension: str
) -> list[dg.RunRequest] | dg.SkipReason:
    now = context.scheduled_execution_time
    symbols = context.instance.get_dynamic_partitions(dimension)
    if not symbols:
        return dg.SkipReason(f"no {dimension} registered yet")
    months = refresh_months(asset_class, now)
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
def stock_bars_after_close(context: dg.ScheduleEvaluationContext):
    return _requests(context, "stock", "stock_symbols")


@dg.schedule(
    job=crypto_bars_refresh,
    cron_schedule="30 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily 00:30 UTC: refreshes the month of the last complete UTC day (and the "
    "previous month on a month's first day).",
)
def crypto_bars_daily(context: dg.ScheduleEvaluationContext):
    return _requests(context, "crypto", "crypto_symbols")
