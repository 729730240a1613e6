"""The bars assets, from one factory: stock/crypto x daily/minute, partitioned month x symbol."""

import collections
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from functools import cached_property

import dagster as dg
import polars as pl
from pydantic import Field

from marketdata_pipeline.defs.partitions import bars_partitions, month_and_symbol, partition_key
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.pipeline import WindowOutcome, ingest
from marketdata_pipeline.polygon.client import PolygonError
from marketdata_pipeline.quality.coverage import (
    MAX_REJECTION_RATE,
    Coverage,
    coverage,
    rejection_rate,
)

# backfill_policy is marked beta; it is what turns a backfill into one run per symbol.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")

OWNERS = ["team:market-data"]
# Observation metadata the status sensor reads: the provider's words on a month its plan does
# not cover, and why a month's load was refused.
UNAVAILABLE = "unavailable"
REFUSED = "refused"
GROUP = "market_data"
PREVIEW_ROWS = 5
# A run takes at most ten years of months of one symbol (or one month of many symbols):
# bounded work per run, and a backfill of S symbols x M months becomes about S runs.
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
            "warehouse exactly, in one transaction. Bars that break a hard rule (OHLC order, "
            "non-positive or non-finite prices, negative volume, repeated or out-of-window "
            "timestamps, vwap outside [low, high]) are quarantined in `bars_rejected` with "
            "their reasons; soft rules (zero volume, price jumps, volume spikes) only flag."
        )

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


def build_bars_asset(spec: BarsAsset) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.name,
        description=spec.description,
        partitions_def=spec.partitions,
        backfill_policy=dg.BackfillPolicy.multi_run(MAX_PARTITIONS_PER_RUN),
        pool="polygon",
        kinds={"polygon", "polars", "postgres"},
        group_name=GROUP,
        owners=OWNERS,
        check_specs=spec.check_specs(),
        output_required=False,
        metadata={
            "dagster/column_schema": COLUMN_SCHEMA,
            "dagster/table_name": spec.timeframe.table,
        },
    )
    def bars_asset(
        context: dg.AssetExecutionContext,
        config: BarsRunConfig,
        polygon: PolygonResource,
        warehouse: WarehouseResource,
    ) -> Iterator[dg.AssetMaterialization | dg.AssetObservation | dg.AssetCheckResult]:
        # By partition: a month fetched again (its bars came late) counts as its last outcome.
        summaries: dict[str, _Summary] = {}
        refused: dict[str, str] = {}
        yield from _materialize(context, spec, config, polygon, warehouse, summaries, refused)
        yield from _check_results(spec, list(summaries.values()))
        if refused:
            first, *others = refused.values()
            raise dg.Failure(
                description=f"{spec.name}: {len(refused)} month(s) refused, they keep their "
                f"bars: {first}" + (f" (and {len(others)} more)" if others else ""),
                metadata={"refused": "\n".join(refused.values())},
            )

    return bars_asset


def _materialize(
    context: dg.AssetExecutionContext,
    spec: BarsAsset,
    config: BarsRunConfig,
    polygon: PolygonResource,
    warehouse: WarehouseResource,
    summaries: dict[str, _Summary],
    refused: dict[str, str],
) -> Iterator[dg.AssetMaterialization | dg.AssetObservation]:
    """Run the pipeline over the run's months of each symbol: a materialization for each
    month loaded; an observation for each month the provider's plan does not cover, and for
    each month whose load was refused (the status sensor reads both)."""
    source = polygon.source_label()
    if polygon.simulated:
        context.log.warning(f"SIMULATED DATA: bars come from {source}, not from Polygon")
    plan = months_by_symbol(spec, context.partition_keys)
    with polygon.client(warehouse.url()) as client, warehouse.connection() as conn:
        for symbol, months in plan.items():
            context.log.info(f"{symbol}: {len(months)} month(s) {months[0]:%Y-%m}..")
            try:
                for outcome in ingest(
                    client,
                    conn,
                    market=spec.market,
                    timeframe=spec.timeframe,
                    symbol=symbol,
                    months=months,
                    run_id=context.run.run_id,
                    accept_shrink=config.accept_shrink,
                ):
                    key = partition_key(outcome.window.month, symbol)
                    refused.pop(key, None)
                    summaries.pop(key, None)
                    if outcome.unavailable:
                        yield dg.AssetObservation(
                            asset_key=context.asset_key,
                            partition=key,
                            description=f"not covered by the provider's plan ({source})",
                            metadata={UNAVAILABLE: outcome.unavailable, "source": source},
                        )
                    elif outcome.refused:
                        context.log.error(outcome.refused)
                        refused[key] = outcome.refused
                        yield dg.AssetObservation(
                            asset_key=context.asset_key,
                            partition=key,
                            description="load refused: the month keeps its bars",
                            metadata={REFUSED: outcome.refused, "source": source},
                        )
                    else:
                        summary = _summarize(spec, outcome)
                        summaries[key] = summary
                        yield dg.AssetMaterialization(
                            asset_key=context.asset_key,
                            partition=key,
                            description=source,
                            metadata=_metadata(outcome, summary, source, polygon.base_url),
                        )
            except PolygonError as error:
                # Months already loaded stay loaded; the failing month keeps its old bars.
                raise dg.Failure(
                    description=f"{spec.name} {symbol}: {error}",
                    metadata={"symbol": symbol, "loaded_months": len(summaries)},
                ) from None


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
        coverage=coverage(spec.market, spec.timeframe, window.month, window.last_day, valid["ts"]),
    )


def _metadata(
    outcome: WindowOutcome, summary: _Summary, source: str, base_url: str
) -> dict[str, dg.MetadataValue | str | int | float]:
    assert outcome.validation is not None and outcome.load is not None
    valid = outcome.validation.valid
    metadata: dict[str, dg.MetadataValue | str | int | float] = {
        "dagster/row_count": summary.loaded,
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
        check_name="rejection_rate",
        passed=worst_rate <= MAX_REJECTION_RATE,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "worst_rate": _ratio(worst_rate if worst else None, 6),
            "worst_partition": f"{worst.month}|{worst.symbol}" if worst else "(none)",
            "threshold": MAX_REJECTION_RATE,
            "rows_rejected": total_rejected,
            "partitions": len(summaries),
        },
    )
    missing = sorted({(d, s.symbol) for s in summaries for d in s.coverage.missing_days})
    expected = sum(s.coverage.expected_bars for s in summaries)
    present = sum(s.coverage.bars for s in summaries)
    yield dg.AssetCheckResult(
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
