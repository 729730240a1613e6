"""Splits: the `stock_splits` asset keeps each stock symbol's splits current; when they change,
the symbol's bars partitions show stale (they depend on its splits partition) and the
revision sensor re-fetches every month loaded under the old adjustment, one ranged run per
symbol and bars asset."""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from marketdata_pipeline import clock
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, GROUP, OWNERS, STOCK_SPLITS
from marketdata_pipeline.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, SYMBOL_PARTITIONS
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.schedules import REFRESH_JOBS, bars_run
from marketdata_pipeline.domain import Market, consecutive_months
from marketdata_pipeline.polygon.client import PolygonError
from marketdata_pipeline.registry.splits import (
    SplitsRefused,
    StaleMonths,
    replace_splits,
    splits_of,
    stale_months,
)
from marketdata_pipeline.registry.symbols import active_symbols


class SplitsRunConfig(dg.Config):
    accept_withdrawal: bool = Field(
        default=False,
        description="Accept an answer that lists no split for a symbol with known splits: "
        "they are withdrawn and its loaded months fetched again. Off, such an answer is "
        "refused and the splits are kept (a provider glitch looks like that).",
    )


@dg.asset(
    key=STOCK_SPLITS,
    description="Each stock symbol's splits from Polygon's splits reference "
    "(`/v3/reference/splits`), in the `splits` table: added, changed and withdrawn exactly as "
    "the provider lists them. A partition (a symbol) is materialized by its first fetch (the "
    "registry sensor asks for it as the symbol is registered), and again when a change has "
    "taken effect on months already loaded: the symbol's bars partitions then show stale "
    "until the revision sensor has re-fetched them. Any other fetch is observed.",
    partitions_def=SYMBOL_PARTITIONS[Market.STOCK],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="polygon",
    kinds={"polygon", "postgres"},
    group_name=GROUP,
    owners=OWNERS,
    output_required=False,
    metadata={"dagster/table_name": "splits"},
)
def stock_splits(
    context: dg.AssetExecutionContext,
    config: SplitsRunConfig,
    polygon: PolygonResource,
    warehouse: WarehouseResource,
) -> Iterator[dg.AssetMaterialization | dg.AssetObservation]:
    failed: dict[str, str] = {}
    with (
        polygon.client(warehouse.url()) as client,
        warehouse.connection(autocommit=True) as conn,
    ):
        for symbol in context.partition_keys:
            try:
                change = replace_splits(
                    conn,
                    symbol,
                    client.splits(symbol),
                    accept_withdrawal=config.accept_withdrawal,
                )
            except (PolygonError, SplitsRefused) as error:
                failed[symbol] = str(error)
                context.log.error(f"{symbol}: {error}")
                continue
            splits = splits_of(conn, symbol)
            metadata = {
                "change": change.describe(),
                "splits": ", ".join(f"{s.ratio} on {s.execution_date}" for s in splits) or "none",
            }
            took_effect = _took_effect(context.instance, symbol, stale_months(conn, [symbol]))
            if took_effect or change.first_fetch:
                yield dg.AssetMaterialization(
                    STOCK_SPLITS,
                    partition=symbol,
                    description=took_effect or change.describe(),
                    metadata=metadata,
                )
            else:
                # A change not yet in effect (a split announced for a later day) is told, not
                # materialized: the bars stay fresh until it executes.
                yield dg.AssetObservation(
                    STOCK_SPLITS, partition=symbol, description=change.describe(), metadata=metadata
                )
    if failed:
        first, words = next(iter(failed.items()))
        others = (
            f" (and {len(failed) - 1} more: {', '.join(list(failed)[1:])})"
            if len(failed) > 1
            else ""
        )
        raise dg.Failure(f"stock_splits {first}: {words}{others}")


def _took_effect(instance: dg.DagsterInstance, symbol: str, stale: list[StaleMonths]) -> str | None:
    """The split change that made loaded months stale since the partition's last
    materialization (what the UI then shows its bars stale for); None if there is none."""
    if not stale:
        return None
    latest = max(stale, key=lambda group: group.since)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(STOCK_SPLITS, asset_partitions=[symbol]), limit=1
    ).records
    if records and records[0].timestamp >= latest.since.timestamp():
        return None
    return f"{latest.why} (loaded months are stale)"


stock_splits_refresh = dg.define_asset_job(
    "stock_splits_refresh",
    selection=[STOCK_SPLITS],
    description="The splits of the given stock symbols, from Polygon's splits reference.",
)


@dg.schedule(
    job=stock_splits_refresh,
    cron_schedule="30 19 * * 1-5",
    execution_timezone="America/New_York",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekdays 19:30 New York, an hour before the nightly bars: every stock "
    "symbol's splits, in one run (one request per symbol).",
)
def stock_splits_daily(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    symbols = context.instance.get_dynamic_partitions(Market.STOCK.symbol_dimension)
    if not symbols:
        return dg.SkipReason("no stock_symbols registered yet")
    return dg.RunRequest(
        run_key=f"splits|{context.scheduled_execution_time:%Y-%m-%d}",
        tags={
            RANGE_START_TAG: symbols[0],
            RANGE_END_TAG: symbols[-1],
        },
    )


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    jobs=[REFRESH_JOBS[Market.STOCK]],
    description="Re-fetches, whole, every month of a stock symbol's bars loaded before its "
    "splits last changed (a split added, changed or withdrawn that has taken effect), if it "
    "holds bars: one ranged run per symbol, bars asset and run of consecutive stale months, "
    "tagged with the change. backfill_state records the "
    "months as revised for it.",
)
def split_revision_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SensorResult:
    with warehouse.connection() as conn:
        stale = stale_months(conn, active_symbols(conn, Market.STOCK))
    specs = {spec.timeframe: spec for spec in ALL_BARS_ASSETS if spec.market is Market.STOCK}
    # Exactly the stale months, each run of consecutive ones in one request stream.
    runs = [
        bars_run(
            specs[group.timeframe],
            [months[0].isoformat(), months[-1].isoformat()],
            [group.symbol],
            # One run per change and day: a failed revision is asked again the next day.
            run_key=(
                f"revision|{group.symbol}|{group.timeframe}|{months[0]:%Y-%m}"
                f"|{group.since:%Y%m%dT%H%M%S}|{clock.now():%Y-%m-%d}"
            ),
            trigger="split revision",
            revision=f"{group.symbol} {group.why}",
        )
        for group in stale
        for months in consecutive_months(group.months)
    ]
    by_symbol: dict[str, list[StaleMonths]] = {}
    for group in stale:
        by_symbol.setdefault(group.symbol, []).append(group)
        context.log.info(
            f"{group.symbol} {group.timeframe}: {len(group.months)} month(s) loaded before the "
            f"{group.why} (in effect for the warehouse since {group.since:%Y-%m-%d %H:%M}Z)"
        )
    # A split announced earlier takes effect on its day, with no fetch to tell: the symbol's
    # splits partition is materialized here, so its bars show stale until the runs end.
    events = [
        dg.AssetMaterialization(
            STOCK_SPLITS,
            partition=symbol,
            description=took_effect,
            metadata={
                "change": took_effect,
                "in_effect_since": dg.MetadataValue.timestamp(max(g.since for g in groups)),
                "told_by": "split_revision_sensor: the change took effect on its day",
            },
        )
        for symbol, groups in by_symbol.items()
        if (took_effect := _took_effect(context.instance, symbol, groups))
    ]
    return dg.SensorResult(
        run_requests=runs,
        asset_events=events,
        skip_reason=None if runs else "no month is stale",
    )
