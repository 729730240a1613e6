"""The bars assets, from one factory: stock/crypto x daily/minute, partitioned month x symbol."""

import collections
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import dagster as dg
import polars as pl

from marketdata_pipeline import quality
from marketdata_pipeline.ingest import TIMESPANS, WindowOutcome, ingest, next_month
from marketdata_pipeline.partitions import bars_partitions
from marketdata_pipeline.polygon import PolygonError
from marketdata_pipeline.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.warehouse import BAR_TABLES

# backfill_policy is marked beta; it is what turns a backfill into one run per symbol.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")

OWNERS = ["team:market-data"]
GROUP = "market_data"
PREVIEW_ROWS = 5
# A run takes at most ten years of months of one symbol (or one month of many symbols):
# bounded work per run, and a backfill of S symbols x M months becomes about S runs.
MAX_PARTITIONS_PER_RUN = 120

COLUMN_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("symbol", "text", description="Registry symbol (crypto: base currency)."),
        dg.TableColumn("ts", "timestamptz", description="Window start of the bar (Polygon t)."),
        dg.TableColumn("open", "double precision", description="> 0, finite."),
        dg.TableColumn("high", "double precision", description=">= open, close and low."),
        dg.TableColumn("low", "double precision", description="<= open, close and high; > 0."),
        dg.TableColumn("close", "double precision", description="> 0, finite."),
        dg.TableColumn("volume", "double precision", description=">= 0 (crypto: fractional)."),
        dg.TableColumn("vwap", "double precision", description="Optional; within [low, high]."),
        dg.TableColumn("trades", "bigint", description="Optional; >= 0."),
    ],
    constraints=dg.TableConstraints(other=["primary key (symbol, ts)", "ts unique per symbol"]),
)


@dataclass(frozen=True)
class BarsAsset:
    asset_class: str  # "stock" (stocks and ETFs) | "crypto"
    timeframe: str  # "daily" | "minute"

    @property
    def name(self) -> str:
        return f"{self.asset_class}_{self.timeframe}_bars"

    @property
    def table(self) -> str:
        return BAR_TABLES[TIMESPANS[self.timeframe]]

    @property
    def days_check(self) -> str:
        if self.timeframe == "minute":
            return "minute_coverage"
        return "missing_days" if self.asset_class == "crypto" else "missing_sessions"

    @property
    def description(self) -> str:
        bars = "Daily" if self.timeframe == "daily" else "One-minute"
        market = (
            "crypto pairs against USD, trading 24/7 (days in UTC)"
            if self.asset_class == "crypto"
            else "US stocks and ETFs (NYSE sessions; minute bars include extended hours)"
        )
        return (
            f"{bars} OHLCV bars from Polygon for {market}, split-adjusted, in `{self.table}`.\n\n"
            "Each partition is one symbol's month. Materializing it fetches the month from "
            "Polygon, validates every bar (Pandera, polars) and replaces the month in the "
            "warehouse exactly, in one transaction. Bars that break a hard rule (OHLC order, "
            "non-positive or non-finite prices, negative volume, repeated or out-of-window "
            "timestamps, vwap outside [low, high]) are quarantined in `bars_rejected` with "
            "their reasons; soft rules (zero volume, price jumps, volume spikes) only flag."
        )


ALL_BARS_ASSETS = [
    BarsAsset(asset_class, timeframe)
    for asset_class in ("stock", "crypto")
    for timeframe in ("daily", "minute")
]


def months_by_symbol(partition_keys: list[str]) -> dict[str, list[date]]:
    """`2024-01-01|AAPL` keys (dimensions in name order: month, symbol) -> months per symbol."""
    grouped: dict[str, list[date]] = collections.defaultdict(list)
    for key in partition_keys:
        month, symbol = key.split("|")
        grouped[symbol].append(date.fromisoformat(month))
    return {symbol: sorted(months) for symbol, months in sorted(grouped.items())}


def partition_key(month: date, symbol: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"month": month.isoformat(), "symbol": symbol})


def build_bars_asset(spec: BarsAsset) -> dg.AssetsDefinition:
    checks = [
        dg.AssetCheckSpec(
            "rejection_rate",
            asset=spec.name,
            description=f"Fails (ERROR) when a month rejects more than "
            f"{quality.MAX_REJECTION_RATE:.0%} of its bars.",
        ),
        dg.AssetCheckSpec(
            spec.days_check,
            asset=spec.name,
            description=(
                "Share of expected minutes present (missing minutes are normal on Polygon: "
                "reported, never failed); days without any bar are listed."
                if spec.timeframe == "minute"
                else "Warns when a finished session (NYSE calendar) or day (crypto) has no bar."
            ),
        ),
    ]

    @dg.asset(
        name=spec.name,
        description=spec.description,
        partitions_def=bars_partitions(spec.asset_class),
        backfill_policy=dg.BackfillPolicy.multi_run(MAX_PARTITIONS_PER_RUN),
        pool="polygon",
        kinds={"polygon", "polars", "postgres"},
        group_name=GROUP,
        owners=OWNERS,
        check_specs=checks,
        output_required=False,
        metadata={"dagster/column_schema": COLUMN_SCHEMA, "dagster/table_name": spec.table},
    )
    def bars_asset(
        context: dg.AssetExecutionContext, polygon: PolygonResource, warehouse: WarehouseResource
    ) -> Iterator[dg.AssetMaterialization | dg.AssetCheckResult]:
        source = polygon.source_label()
        if polygon.simulated:
            context.log.warning(f"SIMULATED DATA: bars come from {source}, not from Polygon")
        plan = months_by_symbol(list(context.partition_keys))
        summaries: list[_Summary] = []
        with polygon.client() as client, warehouse.connection() as conn:
            for symbol, months in plan.items():
                context.log.info(f"{symbol}: {len(months)} month(s) {months[0]:%Y-%m}..")
                try:
                    for outcome in ingest(
                        client,
                        conn,
                        asset_class=spec.asset_class,
                        timeframe=spec.timeframe,
                        symbol=symbol,
                        months=months,
                        run_id=context.run.run_id,
                    ):
                        summary = _summarize(spec, outcome)
                        summaries.append(summary)
                        yield dg.AssetMaterialization(
                            asset_key=context.asset_key,
                            partition=partition_key(outcome.window.month, symbol),
                            description=source,
                            metadata=_metadata(outcome, summary, source, polygon.base_url),
                        )
                except PolygonError as error:
                    # Months already loaded stay loaded; the failing month keeps its old bars.
                    raise dg.Failure(
                        description=f"{spec.name} {symbol}: {error}",
                        metadata={"symbol": symbol, "loaded_months": len(summaries)},
                    ) from None
        yield from _check_results(spec, summaries)

    return bars_asset


@dataclass(frozen=True)
class _Summary:
    """What the checks need of a loaded window, without holding its frames."""

    key: str
    loaded: int
    rejected: int
    reasons: dict[str, int]
    coverage: quality.Coverage


def _summarize(spec: BarsAsset, outcome: WindowOutcome) -> _Summary:
    valid, window = outcome.validation.valid, outcome.window
    reasons = (
        outcome.validation.rejected.select(pl.col("reasons").explode())
        .group_by("reasons")
        .len()
        .sort("len", descending=True)
    )
    return _Summary(
        key=f"{window.month}|{window.symbol}",
        loaded=outcome.load.rows_loaded,
        rejected=outcome.load.rows_rejected,
        reasons=dict(reasons.iter_rows()),
        coverage=quality.coverage(
            spec.asset_class,
            spec.timeframe,
            window.month,
            next_month(window.month) - timedelta(days=1),
            valid["ts"],
        ),
    )


def _metadata(
    outcome: WindowOutcome, summary: _Summary, source: str, base_url: str
) -> dict[str, dg.MetadataValue | str | int | float]:
    valid = outcome.validation.valid
    metadata: dict[str, dg.MetadataValue | str | int | float] = {
        "dagster/row_count": summary.loaded,
        "rows_loaded": summary.loaded,
        "rows_rejected": summary.rejected,
        "rows_flagged": outcome.validation.flagged.height,
        "rows_replaced": outcome.load.rows_replaced,
        "validation_rate": dg.MetadataValue.float(round(outcome.validation.rate, 6)),
        "coverage": dg.MetadataValue.float(round(summary.coverage.ratio, 4)),
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
    worst = max(summaries, key=lambda s: quality.rejection_rate(s.loaded, s.rejected), default=None)
    worst_rate = quality.rejection_rate(worst.loaded, worst.rejected) if worst else 0.0
    total_rejected = sum(s.rejected for s in summaries)
    yield dg.AssetCheckResult(
        check_name="rejection_rate",
        passed=worst_rate <= quality.MAX_REJECTION_RATE,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "worst_rate": dg.MetadataValue.float(round(worst_rate, 6)),
            "worst_partition": worst.key if worst else "(none)",
            "threshold": quality.MAX_REJECTION_RATE,
            "rows_rejected": total_rejected,
            "partitions": len(summaries),
        },
    )
    missing = sorted({(s.key, d) for s in summaries for d in s.coverage.missing_days})
    expected = sum(s.coverage.expected_bars for s in summaries)
    present = sum(s.coverage.bars for s in summaries)
    yield dg.AssetCheckResult(
        check_name=spec.days_check,
        passed=spec.timeframe == "minute" or not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "missing_days": len(missing),
            "missing": ", ".join(f"{d} ({k.split('|')[1]})" for k, d in missing[:30]) or "none",
            "coverage": dg.MetadataValue.float(round(present / expected, 4) if expected else 1.0),
        },
    )


def _markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


bars_assets = [build_bars_asset(spec) for spec in ALL_BARS_ASSETS]
