"""The bars assets, from one factory: stock/crypto x daily/minute, partitioned month x symbol."""

import collections
import functools
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from functools import cached_property

import dagster as dg
import polars as pl
import psycopg
from pydantic import Field

from marketdata_pipeline import clock
from marketdata_pipeline.defs.checks import FRESHNESS, FRESHNESS_DESCRIPTION, freshness_result
from marketdata_pipeline.defs.partitions import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    bars_partitions,
    month_and_symbol,
    partition_key,
)
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.domain import Market, Timeframe, Window
from marketdata_pipeline.pipeline import (
    WindowOutcome,
    grouped_saves_requests,
    ingest_grouped,
    ingest_windows,
    new_days,
)
from marketdata_pipeline.polygon.client import PolygonClient, PolygonError, PolygonUnavailable
from marketdata_pipeline.quality.calendars import last_complete_session
from marketdata_pipeline.quality.coverage import (
    MAX_REJECTION_RATE,
    Coverage,
    coverage,
    rejection_rate,
)
from marketdata_pipeline.registry.symbols import active_symbols
from marketdata_pipeline.warehouse.loading import refresh_aggregate

# backfill_policy is marked beta; it lets a backfill put many partitions in one run.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")
# The partition mapping of stock bars onto their symbol's splits is marked beta too.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*MultiToSingleDimension.*")

OWNERS = ["team:market-data"]
# Observation metadata the status sensor reads: the provider's words on a month its plan does
# not cover, why a month's load was refused or its symbol failed, and that a nightly refresh
# found nothing new in a month.
UNAVAILABLE = "unavailable"
REFUSED = "refused"
FAILED = "failed"
UP_TO_DATE = "up_to_date"
GROUP = "market_data"
# A stock symbol's splits: its bars partitions depend on them (a split changes adjusted history).
STOCK_SPLITS = dg.AssetKey("stock_splits")
PREVIEW_ROWS = 5
# A run takes at most ten years of months of one symbol (or one month of many symbols):
# bounded work per run. How Dagster cuts a backfill into runs: README and defs/backfills.py.
MAX_PARTITIONS_PER_RUN = 120

# Descriptions are Markdown in the UI: they start with words, never with ">" (a quote).
_NOT_NULL = dg.TableColumnConstraints(nullable=False)
COLUMN_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn(
            "symbol",
            "text",
            description="Registry symbol (crypto: the base currency).",
            constraints=_NOT_NULL,
        ),
        dg.TableColumn(
            "ts",
            "timestamptz",
            description="Start of the bar's window (Polygon's t), UTC.",
            constraints=_NOT_NULL,
        ),
        dg.TableColumn(
            "open", "double precision", description="Positive and finite.", constraints=_NOT_NULL
        ),
        dg.TableColumn(
            "high",
            "double precision",
            description="At least open, close and low.",
            constraints=_NOT_NULL,
        ),
        dg.TableColumn(
            "low",
            "double precision",
            description="Positive; at most open, close and high.",
            constraints=_NOT_NULL,
        ),
        dg.TableColumn(
            "close", "double precision", description="Positive and finite.", constraints=_NOT_NULL
        ),
        dg.TableColumn(
            "volume",
            "double precision",
            description="Zero or more, finite (fractional for crypto).",
            constraints=_NOT_NULL,
        ),
        dg.TableColumn(
            "vwap",
            "double precision",
            description="Optional; within [low, high], give or take 0.1%.",
        ),
        dg.TableColumn("trades", "bigint", description="Optional; zero or more."),
    ],
    constraints=dg.TableConstraints(other=["primary key (symbol, ts)"]),
)


# When each market's bars must be current: an hour after its nightly refresh starts, when the
# freshness checks run. There is no Dagster freshness policy beside them: a policy judges an
# asset by its latest materialization of any partition, so one symbol loaded would read
# "Passing" while others are stale; the check judges every symbol.
FRESHNESS_DEADLINES = {
    Market.STOCK: ("30 21 * * 1-5", "America/New_York"),
    Market.CRYPTO: ("30 1 * * *", "UTC"),
}

_MARKET_DESCRIPTIONS = {
    Market.STOCK: "US stocks and ETFs (NYSE sessions; minute bars include extended hours)",
    Market.CRYPTO: "crypto pairs against USD, trading 24/7 (days in UTC)",
}


@dataclass(frozen=True)
class BarsAsset:
    market: Market
    timeframe: Timeframe

    @property
    def name(self) -> str:
        return f"{self.market}_{self.timeframe}_bars"

    @cached_property
    def partitions(self) -> dg.MultiPartitionsDefinition:
        # Built once: it is the asset's partitions_def, and runs and the status sensor parse
        # every partition key against it.
        return bars_partitions(self.market)

    @property
    def days_check(self) -> str:
        if self.timeframe is Timeframe.MINUTE:
            return "minute_coverage"
        return "missing_sessions" if self.market.exchange_calendar else "missing_days"

    @property
    def description(self) -> str:
        bars = "Daily" if self.timeframe is Timeframe.DAILY else "One-minute"
        return (
            f"{bars} OHLCV bars from Polygon for {_MARKET_DESCRIPTIONS[self.market]}, "
            f"split-adjusted, in `{self.timeframe.table}`.\n\n"
            "Each partition is one symbol's month. Materializing it fetches the month from "
            "Polygon, validates every bar (Pandera, polars) and replaces the month in the "
            "warehouse exactly, in one transaction; the nightly refresh (config "
            "`new_days_only`) fetches and replaces only the days since the latest stored bar. "
            "Bars that break a hard rule (OHLC order, non-positive or non-finite prices, "
            "negative volume, repeated or out-of-window timestamps, vwap outside [low, high]) "
            "are quarantined in `bars_rejected` with their reasons; soft rules (zero volume, "
            "price jumps, volume spikes) only flag."
        )

    @property
    def deps(self) -> list[dg.AssetDep]:
        """Stock bars: each partition depends on its symbol's splits."""
        if self.market is not Market.STOCK:
            return []
        by_symbol = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")
        return [dg.AssetDep(STOCK_SPLITS, partition_mapping=by_symbol)]

    @property
    def key(self) -> dg.AssetKey:
        return dg.AssetKey(self.name)

    @property
    def freshness_check_key(self) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.key, FRESHNESS)

    def own_check_keys(self) -> list[dg.AssetCheckKey]:
        """The checks of the run's own loads (not the warehouse-wide freshness)."""
        return [s.key for s in self.check_specs() if s.key != self.freshness_check_key]

    def check_specs(self) -> list[dg.AssetCheckSpec]:
        days_description = (
            "Share of the minutes of regular trading hours that have a bar (minutes without "
            "trades have none on Polygon: reported, never failed); days without any bar are "
            "listed."
            if self.timeframe is Timeframe.MINUTE
            else "Warns when a finished session (NYSE calendar) or day (crypto) has no bar."
        )
        return [
            dg.AssetCheckSpec(
                "rejection_rate",
                asset=self.name,
                description=f"Fails (ERROR) when a month rejects more than "
                f"{MAX_REJECTION_RATE:.0%} of its bars.",
            ),
            dg.AssetCheckSpec(self.days_check, asset=self.name, description=days_description),
            dg.AssetCheckSpec(
                FRESHNESS, asset=self.name, description=FRESHNESS_DESCRIPTION, blocking=False
            ),
        ]


ALL_BARS_ASSETS = [BarsAsset(market, timeframe) for market in Market for timeframe in Timeframe]


@dataclass(frozen=True)
class _Summary:
    """What the checks need of a loaded window, without holding its frames."""

    month: date
    symbol: str
    loaded: int
    rejected: int
    reasons: dict[str, int]
    coverage: Coverage


def months_by_symbol(spec: BarsAsset, partition_keys: Sequence[str]) -> dict[str, list[date]]:
    """The run's partition keys as the months of each symbol, both sorted."""
    grouped: dict[str, list[date]] = collections.defaultdict(list)
    for key in partition_keys:
        month, symbol = month_and_symbol(spec.partitions, key)
        grouped[symbol].append(month)
    return {symbol: sorted(months) for symbol, months in sorted(grouped.items())}


class BarsRunConfig(dg.Config):
    accept_shrink: bool = Field(
        default=False,
        description="Load a month even when the fetch would empty it or remove more than half "
        "of its bars. Off, such a month keeps its bars and its partition fails: a provider "
        "glitch looks like that (a delisting or a large correction can too).",
    )
    new_days_only: bool = Field(
        default=False,
        description="Load only each symbol's days from its latest stored bar through the last "
        "complete session, not whole months: the nightly refresh. Daily bars then come from "
        "the grouped daily endpoint (one request per session for all symbols) when that takes "
        "fewer requests than one per symbol.",
    )


def build_bars_asset(spec: BarsAsset) -> dg.AssetsDefinition:
    # A multi-asset that can be subset, so its freshness check runs alone (a run of only that
    # check) as well as after the bars, and is never a skipped step.
    @dg.multi_asset(
        name=spec.name,
        specs=[
            dg.AssetSpec(
                spec.key,
                deps=spec.deps,
                description=spec.description,
                kinds={"polygon", "polars", "postgres"},
                group_name=GROUP,
                owners=OWNERS,
                metadata={
                    "dagster/column_schema": COLUMN_SCHEMA,
                    "dagster/table_name": spec.timeframe.table,
                },
            )
        ],
        partitions_def=spec.partitions,
        backfill_policy=dg.BackfillPolicy.multi_run(MAX_PARTITIONS_PER_RUN),
        pool="polygon",
        check_specs=spec.check_specs(),
        can_subset=True,
    )
    def bars_asset(
        context: dg.AssetExecutionContext,
        config: BarsRunConfig,
        polygon: PolygonResource,
        warehouse: WarehouseResource,
    ) -> Iterator[dg.AssetMaterialization | dg.AssetObservation | dg.AssetCheckResult]:
        run = None
        if spec.key in context.selected_asset_keys:
            run = _Run(context, spec, config, polygon)
            yield from run.materialize(warehouse)
            selected = {key.name for key in context.selected_asset_check_keys}
            for result in _check_results(spec, list(run.summaries.values())):
                if result.check_name in selected:
                    yield result
        if spec.freshness_check_key in context.selected_asset_check_keys:
            with warehouse.connection() as conn:
                now = clock.now()
                yield freshness_result(conn, spec.key, spec.market, spec.timeframe, now)
        if run:
            run.raise_failures()

    return bars_asset


class _Run:
    """One run of a bars asset over its partitions: each symbol's windows fetched, validated
    and loaded, a symbol's failure isolated from the others, and what happened to each
    partition told to Dagster (materialization or observation) as it happens."""

    def __init__(
        self,
        context: dg.AssetExecutionContext,
        spec: BarsAsset,
        config: BarsRunConfig,
        polygon: PolygonResource,
    ) -> None:
        self.context, self.spec, self.config, self.polygon = context, spec, config, polygon
        self.client: PolygonClient | None = None  # while materialize runs
        # By partition: a month fetched again (its bars came late) counts as its last outcome.
        self.summaries: dict[str, _Summary] = {}
        self.refused: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # symbol -> error
        self.provider_down: str | None = None

    @property
    def source(self) -> str:
        return self.polygon.source_label(synthetic=bool(self.client and self.client.synthetic))

    def materialize(
        self, warehouse: WarehouseResource
    ) -> Iterator[dg.AssetMaterialization | dg.AssetObservation]:
        spec, context = self.spec, self.context
        if self.polygon.simulated:
            context.log.warning(f"SIMULATED DATA: bars come from {self.source}, not from Polygon")
        if not (context.has_partition_key or context.has_partition_key_range):
            raise dg.Failure(
                f"{spec.name}: choose partitions (months x symbols) to load; a run without "
                "partitions has nothing to fetch"
            )
        with (
            self.polygon.client(warehouse.url()) as client,
            warehouse.connection(autocommit=True) as conn,
        ):
            _refuse_unregistered(spec, context.run.tags, active_symbols(conn, spec.market))
            months = months_by_symbol(spec, context.partition_keys)
            self.client = client
            if self.config.new_days_only:
                through = last_complete_session(spec.market, clock.now())
                plan = new_days(conn, spec.market, spec.timeframe, months, through)
                yield from self._up_to_date(months, plan, through)
            else:
                plan = {
                    symbol: [Window.of_month(spec.market, spec.timeframe, symbol, m) for m in ms]
                    for symbol, ms in months.items()
                }
            windows = [w for symbol_windows in plan.values() for w in symbol_windows]
            load = functools.partial(
                ingest_windows, run_id=context.run.run_id, accept_shrink=self.config.accept_shrink
            )
            load_grouped = functools.partial(
                ingest_grouped, run_id=context.run.run_id, accept_shrink=self.config.accept_shrink
            )
            if self.config.new_days_only and grouped_saves_requests(windows):
                context.log.info(f"{len(plan)} symbol(s) from the grouped daily endpoint")
                batches = [(list(plan), load_grouped(client, conn, windows))]
            else:
                batches = [
                    ([symbol], load(client, conn, symbol_windows))
                    for symbol, symbol_windows in plan.items()
                ]
            for symbols, outcomes in batches:
                yield from self._ingest(symbols, plan, outcomes)
            if windows:
                self._refresh_aggregate(conn, windows)

    def _refresh_aggregate(self, conn: psycopg.Connection, windows: list[Window]) -> None:
        start, end = min(w.start for w in windows), max(w.end for w in windows)
        try:
            refresh_aggregate(conn, self.spec.timeframe, start, end)
        except psycopg.Error as error:  # the bars are loaded: their aggregate lags, told here
            self.context.log.warning(
                f"the aggregate over {self.spec.name} was not refreshed for {start:%Y-%m-%d}.."
                f"{end:%Y-%m-%d}; the next run over those days refreshes it: {error}"
            )

    def _ingest(
        self,
        symbols: list[str],
        plan: dict[str, list[Window]],
        outcomes: Generator[WindowOutcome, None, None],
    ) -> Iterator[dg.AssetMaterialization | dg.AssetObservation]:
        """One batch's outcomes told; a failure fails the batch's symbols, not the run."""
        if self.provider_down:
            outcomes.close()
            yield from self._fail(symbols, plan, f"not attempted: {self.provider_down}")
            return
        windows = [w for symbol in symbols for w in plan[symbol]]
        self.context.log.info(
            f"{', '.join(symbols[:10])}{', ...' if len(symbols) > 10 else ''}: "
            f"{len(windows)} window(s) from {windows[0].label}"
        )
        try:
            for outcome in outcomes:
                yield self._told(outcome)
        except PolygonUnavailable as error:
            # The provider is down (retries exhausted): the other symbols would each wait out
            # the same retry budget and fail the same way, so they are not attempted.
            self.provider_down = str(error)
            yield from self._fail(symbols, plan, str(error))
        except PolygonError as error:
            yield from self._fail(symbols, plan, str(error))

    def _told(self, outcome: WindowOutcome) -> dg.AssetMaterialization | dg.AssetObservation:
        """What Dagster is told of one window's outcome."""
        key = partition_key(outcome.window.month, outcome.window.symbol)
        self.refused.pop(key, None)
        self.summaries.pop(key, None)
        if outcome.unavailable:
            return self._observation(
                key,
                f"not covered by the provider's plan ({self.source})",
                UNAVAILABLE,
                outcome.unavailable,
            )
        if outcome.refused:
            self.context.log.error(outcome.refused)
            self.refused[key] = outcome.refused
            return self._observation(
                key, "load refused: the month keeps its bars", REFUSED, outcome.refused
            )
        summary = _summarize(self.spec, outcome)
        self.summaries[key] = summary
        return dg.AssetMaterialization(
            asset_key=self.context.asset_key,
            partition=key,
            description=self.source,
            metadata=_metadata(outcome, summary, self.source, self.polygon.base_url),
        )

    def _fail(
        self, symbols: list[str], plan: dict[str, list[Window]], error: str
    ) -> Iterator[dg.AssetObservation]:
        """The symbols' windows not loaded by this run keep their bars and read failed."""
        for symbol in symbols:
            self.failed[symbol] = error
            self.context.log.error(f"{self.spec.name} {symbol}: {error}")
            for window in plan[symbol]:
                key = partition_key(window.month, symbol)
                if key not in self.summaries:
                    yield self._observation(key, "failed: the month keeps its bars", FAILED, error)

    def _up_to_date(
        self, months: dict[str, list[date]], plan: dict[str, list[Window]], through: date
    ) -> Iterator[dg.AssetObservation]:
        for symbol, symbol_months in months.items():
            planned = {w.month for w in plan.get(symbol, ())}
            for month in symbol_months:
                if month not in planned:
                    yield self._observation(
                        partition_key(month, symbol),
                        "up to date: nothing new to load",
                        UP_TO_DATE,
                        f"no day of this month after the latest stored bar through {through}",
                    )

    def _observation(
        self, key: dg.MultiPartitionKey, description: str, name: str, words: str
    ) -> dg.AssetObservation:
        return dg.AssetObservation(
            asset_key=self.context.asset_key,
            partition=key,
            description=description,
            metadata={name: words, "source": self.source},
        )

    def raise_failures(self) -> None:
        """Fail the run, after every symbol had its turn, naming what failed."""
        parts = []
        if self.failed:
            first, error = next(iter(self.failed.items()))
            parts.append(
                f"{len(self.failed)} symbol(s) failed ({', '.join(list(self.failed)[:20])}"
                f"{', ...' if len(self.failed) > 20 else ''}); {first}: {error}"
            )
        if self.refused:
            first_refusal = next(iter(self.refused.values()))
            parts.append(
                f"{len(self.refused)} month(s) refused, they keep their bars: {first_refusal}"
            )
        if parts:
            raise dg.Failure(
                description=f"{self.spec.name}: " + "; ".join(parts),
                metadata={
                    "failed_symbols": "\n".join(f"{s}: {e}" for s, e in self.failed.items())
                    or "none",
                    "refused": "\n".join(self.refused.values()) or "none",
                    "loaded_windows": len(self.summaries),
                },
            )


def _refuse_unregistered(spec: BarsAsset, tags: Mapping[str, str], active: Sequence[str]) -> None:
    """A partition typed into the UI is not a symbol until the registry has it (the registry
    sensor removes it): say so in one line, read from the run's tags, before Dagster resolves
    partitions that may be gone."""
    keys = [tags.get(PARTITION_TAG), tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)]
    named = {key.rsplit("|", 1)[-1] for key in keys if key}
    if unknown := sorted(named - set(active)):
        raise dg.Failure(
            f"{', '.join(unknown)}: not a registered {spec.market} symbol; register it with "
            f"`marketdata symbols add {unknown[0]}` (or the add_symbol job on the launchpad), "
            "then materialize it: a partition added only in the UI is removed by "
            "symbol_registry_sensor"
        )


def _summarize(spec: BarsAsset, outcome: WindowOutcome) -> _Summary:
    assert outcome.validation is not None and outcome.load is not None
    valid, window = outcome.validation.valid, outcome.window
    reasons = (
        outcome.validation.rejected.select(pl.col("reasons").explode())
        .group_by("reasons")
        .len()
        .sort("len", descending=True)
    )
    return _Summary(
        month=window.month,
        symbol=window.symbol,
        loaded=outcome.load.rows_loaded,
        rejected=outcome.load.rows_rejected,
        reasons=dict(reasons.iter_rows()),
        coverage=coverage(
            spec.market, spec.timeframe, window.first_day, window.last_day, valid["ts"]
        ),
    )


def _metadata(
    outcome: WindowOutcome, summary: _Summary, source: str, base_url: str
) -> dict[str, dg.MetadataValue | str | int | float]:
    assert outcome.validation is not None and outcome.load is not None
    valid = outcome.validation.valid
    metadata: dict[str, dg.MetadataValue | str | int | float] = {
        "window": outcome.window.label,
        "dagster/row_count": outcome.load.rows_in_month,
        "rejected_in_month": outcome.load.rejected_in_month,
        "rows_loaded": summary.loaded,
        "rows_rejected": summary.rejected,
        "rows_flagged": outcome.validation.flagged.height,
        "rows_replaced": outcome.load.rows_replaced,
        "rows_received": outcome.validation.received,
        "validation_rate": _ratio(outcome.validation.rate, 6),
        "coverage": _ratio(summary.coverage.ratio, 4),
        "pages": outcome.pages,
        "request_ids": ", ".join(outcome.request_ids) or "(none)",
        "source": source,
        "polygon_base_url": dg.MetadataValue.url(base_url),
    }
    if valid.height:
        metadata["first_bar"] = dg.MetadataValue.timestamp(valid["ts"][0])
        metadata["last_bar"] = dg.MetadataValue.timestamp(valid["ts"][-1])
        metadata["preview"] = dg.MetadataValue.md(_markdown(valid.head(PREVIEW_ROWS)))
    if summary.reasons:
        metadata["rejection_reasons"] = dg.MetadataValue.json(summary.reasons)
    flags = outcome.validation.flagged
    if flags.height:
        counts = flags.select(pl.col("flags").explode()).group_by("flags").len()
        metadata["flags"] = dg.MetadataValue.json(dict(counts.iter_rows()))
    return metadata


def _check_results(spec: BarsAsset, summaries: list[_Summary]) -> Iterator[dg.AssetCheckResult]:
    worst = max(summaries, key=lambda s: rejection_rate(s.loaded, s.rejected), default=None)
    worst_rate = rejection_rate(worst.loaded, worst.rejected) if worst else 0.0
    total_rejected = sum(s.rejected for s in summaries)
    yield dg.AssetCheckResult(
        asset_key=spec.key,
        check_name="rejection_rate",
        passed=worst_rate <= MAX_REJECTION_RATE,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "worst_rate": _ratio(worst_rate if worst else None, 6),
            "worst_partition": f"{worst.month}|{worst.symbol}" if worst and worst_rate else "-",
            "threshold": MAX_REJECTION_RATE,
            "rows_rejected": total_rejected,
            "partitions": len(summaries),
        },
    )
    missing = sorted({(d, s.symbol) for s in summaries for d in s.coverage.missing_days})
    expected = sum(s.coverage.expected_bars for s in summaries)
    present = sum(s.coverage.bars for s in summaries)
    yield dg.AssetCheckResult(
        asset_key=spec.key,
        check_name=spec.days_check,
        passed=spec.timeframe is Timeframe.MINUTE or not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "missing_days": len(missing),
            "missing": ", ".join(f"{d} ({symbol})" for d, symbol in missing[:30]) or "none",
            "coverage": _ratio(present / expected if expected else None, 4),
        },
    )


def _ratio(value: float | None, digits: int) -> dg.MetadataValue:
    """A share as a number, or "-" when there was nothing to measure it on."""
    return (
        dg.MetadataValue.text("-")
        if value is None
        else dg.MetadataValue.float(round(value, digits))
    )


def _markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


bars_assets = [build_bars_asset(spec) for spec in ALL_BARS_ASSETS]
