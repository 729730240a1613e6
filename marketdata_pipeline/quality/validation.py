"""Validation of bars with Pandera's polars API: hard rules reject a bar, soft rules flag it.

Validation is lazy: every failure of every row is collected in one pass, so a rejected bar
carries all of its reasons, not just the first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

from marketdata_pipeline.domain import BAR_SCHEMA

PRICES = ("open", "high", "low", "close")
VWAP_TOLERANCE = 0.001  # relative: Polygon rounds vwap to 4 decimals, prices can be sub-cent
RECENT_BARS = 30  # soft rules compare a bar with the symbol's previous 30 bars
PRICE_JUMP_FACTOR = 1.5  # close above 1.5x the recent high, or below the recent low / 1.5
VOLUME_SPIKE_FACTOR = 50.0  # volume above 50x the recent median

_ROW = "_row"


def _price(name: str) -> pl.Expr:
    # NaN counts as missing: its row is rejected as "is null or NaN", not again by relations.
    return pl.col(name).fill_nan(None)


def _frame_check(name: str, rule: pl.Expr) -> pa.Check:
    # Nulls are reported once, by the column's own not-null rule, not again by every relation.
    return pa.Check(lambda data: data.lazyframe.select(rule.fill_null(True)), name=name)


def _column_check(failure: str, rule: Callable[[pl.Expr], pl.Expr]) -> pa.Check:
    """A column rule; `failure` completes "<column> ..." in a rejected bar's reasons."""
    return pa.Check(
        lambda data: data.lazyframe.select(rule(pl.col(data.key)).fill_null(True)), name=failure
    )


def _price_column() -> pa.Column:
    return pa.Column(
        pl.Float64,
        nullable=False,
        checks=[
            _column_check("is infinite", lambda c: c.is_finite() | c.is_nan()),
            _column_check("is not positive", lambda c: c > 0),
        ],
    )


def hard_schema(window_start: datetime, window_end: datetime) -> pa.DataFrameSchema:
    """Rules whose failure rejects a bar. The window is [window_start, window_end)."""
    vwap_low = _price("low") * (1 - VWAP_TOLERANCE)
    vwap_high = _price("high") * (1 + VWAP_TOLERANCE)
    return pa.DataFrameSchema(
        {
            "ts": pa.Column(
                BAR_SCHEMA["ts"],
                nullable=False,
                unique=True,
                checks=[
                    _column_check(
                        f"outside the window [{window_start:%Y-%m-%d %H:%M}Z, "
                        f"{window_end:%Y-%m-%d %H:%M}Z)",
                        lambda ts: (ts >= window_start) & (ts < window_end),
                    )
                ],
            ),
            **{price: _price_column() for price in PRICES},
            "volume": pa.Column(
                pl.Float64, nullable=False, checks=_column_check("is negative", lambda c: c >= 0)
            ),
            "vwap": pa.Column(pl.Float64, nullable=True),
            "trades": pa.Column(
                pl.Int64, nullable=True, checks=_column_check("is negative", lambda c: c >= 0)
            ),
            _ROW: pa.Column(pl.UInt32),
        },
        checks=[
            _frame_check("high below open", _price("high") >= _price("open")),
            _frame_check("high below close", _price("high") >= _price("close")),
            _frame_check("high below low", _price("high") >= _price("low")),
            _frame_check("low above open", _price("low") <= _price("open")),
            _frame_check("low above close", _price("low") <= _price("close")),
            _frame_check(
                "vwap outside [low, high]",
                _price("vwap").is_null() | _price("vwap").is_between(vwap_low, vwap_high),
            ),
        ],
        strict=True,
        name="bars (hard rules)",
    )


SOFT_SCHEMA = pa.DataFrameSchema(
    {
        "volume": pa.Column(pl.Float64, checks=_column_check("is zero", lambda c: c != 0)),
    },
    checks=[
        _frame_check(
            "price jump far outside the recent range",
            pl.col("close").is_between(
                pl.col("_recent_low") / PRICE_JUMP_FACTOR,
                pl.col("_recent_high") * PRICE_JUMP_FACTOR,
            ),
        ),
        _frame_check(
            "volume spike far above the recent median",
            pl.col("volume") <= pl.col("_recent_volume") * VOLUME_SPIKE_FACTOR,
        ),
    ],
    name="bars (soft rules)",
)


@dataclass(frozen=True)
class Validation:
    valid: pl.DataFrame  # BAR_SCHEMA, sorted by ts: the rows to load
    rejected: pl.DataFrame  # BAR_SCHEMA + reasons: list[str]
    flagged: pl.DataFrame  # ts + flags: list[str], rows of `valid` that a soft rule flagged

    @property
    def rate(self) -> float:
        """Share of received bars that passed; 1.0 when none were received."""
        total = self.valid.height + self.rejected.height
        return self.valid.height / total if total else 1.0


def validate(frame: pl.DataFrame, window_start: datetime, window_end: datetime) -> Validation:
    """Split a window's raw bars into valid rows and rejected rows with every reason."""
    numbered = frame.select(BAR_SCHEMA.names()).with_row_index(_ROW)
    reasons = _failures(hard_schema(window_start, window_end), numbered)
    rejected = numbered.join(reasons, on=_ROW, how="inner").sort(_ROW).drop(_ROW)
    valid = numbered.join(reasons, on=_ROW, how="anti").drop(_ROW).sort("ts")
    return Validation(valid, rejected, _flags(valid))


def _flags(valid: pl.DataFrame) -> pl.DataFrame:
    context = valid.with_row_index(_ROW).with_columns(
        _recent_low=pl.col("low").shift(1).rolling_min(RECENT_BARS, min_samples=1),
        _recent_high=pl.col("high").shift(1).rolling_max(RECENT_BARS, min_samples=1),
        _recent_volume=pl.col("volume").shift(1).rolling_median(RECENT_BARS, min_samples=5),
    )
    flags = _failures(SOFT_SCHEMA, context).rename({"reasons": "flags"})
    return context.select(_ROW, "ts").join(flags, on=_ROW, how="inner").drop(_ROW).sort("ts")


def _failures(schema: pa.DataFrameSchema, frame: pl.DataFrame) -> pl.DataFrame:
    """Row number -> list of reasons, for rows that failed any rule of `schema`."""
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as errors:
        cases = errors.failure_cases.filter(pl.col("index").is_not_null())
        described = cases.select(
            pl.col("index").cast(pl.UInt32).alias(_ROW),
            pl.when(pl.col("column").is_null() | (pl.col("schema_context") == "DataFrameSchema"))
            .then(pl.col("check"))
            .when(pl.col("check") == "not_nullable")
            .then(pl.format("{} is null or NaN", pl.col("column")))
            .when(pl.col("check") == "field_uniqueness")
            .then(pl.lit("repeated timestamp"))
            .otherwise(pl.format("{} {}", pl.col("column"), pl.col("check")))
            .alias("reasons"),
        )
        return described.unique().group_by(_ROW).agg(pl.col("reasons").sort())
    return pl.DataFrame(schema={_ROW: pl.UInt32, "reasons": pl.List(pl.String)})
