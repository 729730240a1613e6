"""A history backfill of one run per symbol and bars asset, whatever the symbols and months.

A backfill launched from an asset's Materialize dialog is cut into runs by Dagster: it groups
a multi-partition selection by the dimension with fewer keys, so S symbols x M months make S
runs only while S < M; otherwise one run per month and block of adjacent symbols (dagster
#18852). The job `backfill_history` takes symbols and months from the launchpad, checks them,
and the sensor `history_backfill_runs` then requests exactly one ranged run per symbol and
bars asset, each fetching the symbol's months in one paged stream.
"""

from collections.abc import Sequence
from datetime import date
from typing import cast

import dagster as dg
import psycopg
from pydantic import Field

from marketdata_pipeline import clock, config
from marketdata_pipeline.defs.admin_jobs import TAGS, failing_clearly
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, MAX_PARTITIONS_PER_RUN, BarsAsset
from marketdata_pipeline.defs.resources import WarehouseResource
from marketdata_pipeline.defs.schedules import REFRESH_JOBS, bars_run
from marketdata_pipeline.domain import Market, Timeframe, next_month
from marketdata_pipeline.errors import ConfigError, NotFound
from marketdata_pipeline.registry import symbols as registry

OP = "plan_history_backfill"
MAX_MONTHS_PER_RUN = MAX_PARTITIONS_PER_RUN  # as the bars assets' backfill policy


class HistoryBackfillConfig(dg.Config):
    symbols: list[str] = Field(description="Registered symbols, e.g. [AAPL, MSFT, BTC].")
    first_month: str = Field(
        default=f"{config.history_start():%Y-%m}",
        description="First month, like 2024-01 (default: the partitions' first).",
    )
    last_month: str | None = Field(
        default=None, description="Last month, like 2024-12 (default: the current month)."
    )
    daily: bool = Field(default=True, description="Backfill the daily bars.")
    minute: bool = Field(default=True, description="Backfill the minute bars.")


def _month(raw: str, what: str) -> date:
    try:
        return date.fromisoformat(f"{raw}-01" if len(raw) == 7 else raw).replace(day=1)
    except ValueError:
        raise ConfigError(f"{what} must be a month like 2024-01, got {raw[:20]!r}") from None


def month_range(plan: HistoryBackfillConfig) -> tuple[date, date]:
    """The plan's first and last month, checked against the partitions."""
    first = _month(plan.first_month, "first_month")
    this_month = clock.now().date().replace(day=1)
    last = _month(plan.last_month, "last_month") if plan.last_month else this_month
    if first < config.history_start():
        raise ConfigError(
            f"first_month {first:%Y-%m} is before the partitions' first, "
            f"{config.history_start():%Y-%m} (MARKETDATA_HISTORY_START)"
        )
    if not first <= last <= this_month:
        raise ConfigError(f"the months must run forward to this month at most: {first}..{last}")
    return first, last


def chunks(first: date, last: date) -> list[tuple[date, date]]:
    """[first, last] in spans of at most MAX_MONTHS_PER_RUN months."""
    months = [first]
    while months[-1] < last:
        months.append(next_month(months[-1]))
    spans = [months[i : i + MAX_MONTHS_PER_RUN] for i in range(0, len(months), MAX_MONTHS_PER_RUN)]
    return [(span[0], span[-1]) for span in spans]


def plan_runs(
    run_id: str, plan: HistoryBackfillConfig, markets: dict[str, Market]
) -> list[dg.RunRequest]:
    """One ranged run per symbol, bars asset and span of at most 120 months."""
    first, last = month_range(plan)
    wanted = {Timeframe.DAILY: plan.daily, Timeframe.MINUTE: plan.minute}
    specs: Sequence[BarsAsset] = [s for s in ALL_BARS_ASSETS if wanted[s.timeframe]]
    return [
        bars_run(
            spec,
            [start.isoformat(), end.isoformat()],
            [symbol],
            run_key=f"backfill|{run_id}|{spec.name}|{symbol}|{start:%Y-%m}",
            trigger=f"backfill_history {run_id[:8]}",
        )
        for symbol, market in markets.items()
        for spec in specs
        if spec.market is market
        for start, end in chunks(first, last)
    ]


@dg.op(name=OP)
def plan_history_backfill(
    context: dg.OpExecutionContext, config: HistoryBackfillConfig, warehouse: WarehouseResource
) -> None:
    with failing_clearly(), warehouse.connection() as conn:
        markets = registered_markets(conn, config.symbols)
        runs = plan_runs(context.run_id, config, markets)
    months = f"{config.first_month}..{config.last_month or 'this month'}"
    context.log.info(
        f"{len(markets)} symbol(s) x {months}: sensor history_backfill_runs "
        f"requests {len(runs)} run(s), one per symbol and bars asset"
    )


def registered_markets(conn: psycopg.Connection, symbols: Sequence[str]) -> dict[str, Market]:
    """Each symbol's market; a symbol not active in the registry is an error naming it."""
    if not symbols:
        raise ConfigError("symbols: name at least one registered symbol")
    markets: dict[str, Market] = {}
    for raw in symbols:
        try:
            tracked = registry.get(conn, raw)
        except NotFound as error:
            raise NotFound(
                f"{error}: register it with `marketdata symbols add` or the add_symbol job"
            ) from None
        if not tracked.active:
            raise ConfigError(
                f"{tracked.symbol} is removed: add it again with `marketdata symbols add`"
            )
        markets[tracked.symbol] = tracked.asset_class.market
    return markets


@dg.job(
    tags=TAGS,
    description="Backfill the history of the given symbols over the given months: one run "
    "per symbol and bars asset (the sensor history_backfill_runs requests them when this "
    "job succeeds), each fetching the symbol's months in one paged stream. A backfill from "
    "an asset's Materialize dialog makes that many runs only when it picks fewer symbols "
    "than months.",
)
def backfill_history() -> None:
    plan_history_backfill()


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[backfill_history],
    request_jobs=list(REFRESH_JOBS.values()),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When a backfill_history run succeeds, requests its runs: one ranged run per "
    "symbol and bars asset over the months it names.",
)
def history_backfill_runs(
    context: dg.RunStatusSensorContext, warehouse: WarehouseResource
) -> list[dg.RunRequest]:
    run = context.dagster_run
    ops = cast("dict[str, dict]", run.run_config["ops"])
    plan = HistoryBackfillConfig(**ops[OP]["config"])
    with warehouse.connection() as conn:
        markets = registered_markets(conn, plan.symbols)
    return plan_runs(run.run_id, plan, markets)
