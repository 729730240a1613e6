"""Schedules that keep the bars current: each night one run per bars asset loads what is new
for every symbol; each week one run per bars asset reloads the recent months whole (provider
corrections); the freshness checks run on their own, after the night should be done."""

from collections.abc import Sequence
from datetime import timedelta

import dagster as dg

from marketdata_pipeline.defs.assets import (
    ALL_BARS_ASSETS,
    FRESHNESS_DEADLINES,
    BarsAsset,
    BarsRunConfig,
)
from marketdata_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG
from marketdata_pipeline.domain import Market
from marketdata_pipeline.quality.calendars import last_complete_session, refresh_months

REFRESH_JOBS = {
    market: dg.define_asset_job(
        f"{market}_bars_refresh",
        selection=dg.AssetSelection.assets(
            *(spec.key for spec in ALL_BARS_ASSETS if spec.market is market)
        )
        - dg.AssetSelection.checks(*(spec.freshness_check_key for spec in ALL_BARS_ASSETS)),
        description=f"Daily and minute {market} bars of the given partitions.",
    )
    for market in Market
}
FRESHNESS_JOBS = {
    market: dg.define_asset_job(
        f"{market}_bars_freshness",
        selection=dg.AssetSelection.checks(
            *(spec.freshness_check_key for spec in ALL_BARS_ASSETS if spec.market is market)
        ),
        description=f"The freshness checks of the {market} bars: reads the warehouse only.",
    )
    for market in Market
}
TRIGGER_TAG = "marketdata/trigger"
REVISION_TAG = "marketdata/revision"  # the split change a revision run re-fetches for


def bars_run(
    spec: BarsAsset,
    months: Sequence[str],
    symbols: Sequence[str],
    *,
    run_key: str,
    trigger: str,
    new_days_only: bool = False,
    revision: str | None = None,
) -> dg.RunRequest:
    """One run of a bars asset over the rectangle months x symbols (first..last of each, in
    the partitions' order), evaluating the asset's own checks only."""
    return dg.RunRequest(
        run_key=run_key,
        job_name=REFRESH_JOBS[spec.market].name,
        asset_selection=[spec.key],
        asset_check_keys=spec.own_check_keys(),
        run_config=dg.RunConfig(ops={spec.name: BarsRunConfig(new_days_only=new_days_only)}),
        tags={
            RANGE_START_TAG: f"{months[0]}|{symbols[0]}",
            RANGE_END_TAG: f"{months[-1]}|{symbols[-1]}",
            TRIGGER_TAG: trigger,
            **({REVISION_TAG: revision} if revision else {}),
        },
    )


def _refresh(
    context: dg.ScheduleEvaluationContext, market: Market, months: list[str], *, nightly: bool
) -> list[dg.RunRequest] | dg.SkipReason:
    # Dynamic partitions keep the order they were added in: a range from the first to the
    # last symbol is every symbol.
    symbols = context.instance.get_dynamic_partitions(market.symbol_dimension)
    if not symbols:
        return dg.SkipReason(f"no {market.symbol_dimension} registered yet")
    kind = "night" if nightly else "week"
    return [
        bars_run(
            spec,
            months,
            symbols,
            run_key=f"{kind}|{context.scheduled_execution_time:%Y-%m-%d}|{spec.name}",
            trigger=f"{kind} schedule",
            new_days_only=nightly,
        )
        for spec in ALL_BARS_ASSETS
        if spec.market is market
    ]


def _night(
    context: dg.ScheduleEvaluationContext, market: Market
) -> list[dg.RunRequest] | dg.SkipReason:
    months = refresh_months(market, context.scheduled_execution_time)
    return _refresh(context, market, [m.isoformat() for m in months], nightly=True)


def _week(
    context: dg.ScheduleEvaluationContext, market: Market
) -> list[dg.RunRequest] | dg.SkipReason:
    """The months of the last seven days, whole."""
    last = last_complete_session(market, context.scheduled_execution_time)
    first = last - timedelta(days=6)
    months = sorted({first.replace(day=1).isoformat(), last.replace(day=1).isoformat()})
    return _refresh(context, market, months, nightly=False)


@dg.schedule(
    job=REFRESH_JOBS[Market.STOCK],
    cron_schedule="30 20 * * 1-5",
    execution_timezone="America/New_York",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekdays 20:30 New York, after extended hours: one run per stock bars asset "
    "loads every symbol's days since its latest stored bar through the session just ended "
    "(daily bars: one grouped request for all symbols).",
)
def stock_bars_after_close(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _night(context, Market.STOCK)


@dg.schedule(
    job=REFRESH_JOBS[Market.CRYPTO],
    cron_schedule="30 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily 00:30 UTC: one run per crypto bars asset loads every symbol's days "
    "since its latest stored bar through the UTC day just ended.",
)
def crypto_bars_daily(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _night(context, Market.CRYPTO)


@dg.schedule(
    job=REFRESH_JOBS[Market.STOCK],
    cron_schedule="0 8 * * 6",
    execution_timezone="America/New_York",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Saturdays 08:00 New York: reloads whole the months of the week's sessions, "
    "for every stock symbol, so the provider's corrections to earlier days reach the "
    "warehouse within a week.",
)
def stock_bars_weekly(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _week(context, Market.STOCK)


@dg.schedule(
    job=REFRESH_JOBS[Market.CRYPTO],
    cron_schedule="30 2 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Sundays 02:30 UTC: reloads whole the months of the last seven days, for every "
    "crypto symbol (the provider's corrections).",
)
def crypto_bars_weekly(
    context: dg.ScheduleEvaluationContext,
) -> list[dg.RunRequest] | dg.SkipReason:
    return _week(context, Market.CRYPTO)


@dg.schedule(
    job=FRESHNESS_JOBS[Market.STOCK],
    cron_schedule=FRESHNESS_DEADLINES[Market.STOCK][0],
    execution_timezone=FRESHNESS_DEADLINES[Market.STOCK][1],
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekdays 21:30 New York, an hour after the nightly refresh starts (the "
    "assets' freshness deadline): is every stock symbol's latest bar the session's?",
)
def stock_bars_freshness() -> dg.RunRequest:
    return dg.RunRequest()


@dg.schedule(
    job=FRESHNESS_JOBS[Market.CRYPTO],
    cron_schedule=FRESHNESS_DEADLINES[Market.CRYPTO][0],
    execution_timezone=FRESHNESS_DEADLINES[Market.CRYPTO][1],
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily 01:30 UTC, an hour after the nightly refresh starts (the assets' "
    "freshness deadline): is every crypto symbol's latest bar yesterday's?",
)
def crypto_bars_freshness() -> dg.RunRequest:
    return dg.RunRequest()


SCHEDULES = [
    stock_bars_after_close,
    crypto_bars_daily,
    stock_bars_weekly,
    crypto_bars_weekly,
    stock_bars_freshness,
    crypto_bars_freshness,
]
