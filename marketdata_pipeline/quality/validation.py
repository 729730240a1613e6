"""Validation of bars with Pandera's polars API: hard rules reject a bar, soft rules flag it.

Validation is lazy: every failure of every row is collected in one pass, so a rejected bar
carries all of its reasons, not just the first. Values the client could not decode (a
boolean price, an integer beyond int64) arrive as `defects` and reject their bar too.

Soft rules compare a bar with bars of the same part of the day: a minute at the open with
earlier opens, not with the quiet minutes before it, because real volume is U-shaped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors

from marketdata_pipeline import clock
from marketdata_pipeline.domain import BAR_SCHEMA, Market, Timeframe, Window

PRICES = ("open", "high", "low", "close")
VWAP_TOLERANCE = 0.001  # relative: Polygon rounds vwap to 4 decimals, prices can be sub-cent
RECENT_BARS = 30  # price jumps: a close against the symbol's previous 30 bars
PRICE_JUMP_FACTOR = 1.5  # close above 1.5x the recent high, or below the recent low / 1.5
VOLUME_SPIKE_FACTOR = 50.0  # volume above 50x the median of the same part of the day
SLOT_MINUTES = 30  # minute bars are compared within half-hours of the market's day
SLOT_BARS = 60  # the median of the previous 60 bars of a slot (two days of a busy half-hour)
SLOT_MIN_BARS = 10  # fewer earlier bars in the slot: no spike judgement

_ROW = "_row"
_REPEATED = "repeated timestamp"


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


def hard_schema(
    window_start: datetime, window_end: datetime, fetched_at: datetime
) -> pa.DataFrameSchema:
    """Rules whose failure rejects a bar. The window is [window_start, window_end); no bar
    may start after `fetched_at`, when the provider answered."""
    vwap_low = _price("low") * (1 - VWAP_TOLERANCE)
    vwap_high = _price("high") * (1 + VWAP_TOLERANCE)
    return pa.DataFrameSchema(
        {
            "symbol": pa.Column(pl.String, nullable=False),
            "ts": pa.Column(
                BAR_SCHEMA["ts"],
                nullable=False,
                checks=[
                    _column_check(
                        f"outside the window [{window_start:%Y-%m-%d %H:%M}Z, "
                        f"{window_end:%Y-%m-%d %H:%M}Z)",
                        lambda ts: (ts >= window_start) & (ts < window_end),
                    ),
                    _column_check(
                        f"starts after the fetch ({fetched_at:%Y-%m-%d %H:%M:%S}Z)",
                        lambda ts: ts <= fetched_at,
                    ),
                ],
            ),
            **{price: _price_column() for price in PRICES},
            "volume": pa.Column(
                pl.Float64,
                nullable=False,
                checks=[
                    _column_check("is infinite", lambda c: c.is_finite() | c.is_nan()),
                    _column_check("is negative", lambda c: c >= 0),
                ],
            ),
            "vwap": pa.Column(pl.Float64, nullable=True),
            "trades": pa.Column(
                pl.Int64, nullable=True, checks=_column_check("is negative", lambda c: c >= 0)
            ),
            _ROW: pa.Column(pl.UInt32),
        },
        checks=[
            _frame_check(
                _REPEATED, ~pl.struct("symbol", "ts").is_duplicated() | pl.col("ts").is_null()
            ),
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
            "volume spike far above the median of its part of the day",
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
    def received(self) -> int:
        return self.valid.height + self.rejected.height

    @property
    def rate(self) -> float | None:
        """Share of received bars that passed; None when none were received."""
        return self.valid.height / self.received if self.received else None


def validate(frame: pl.DataFrame, window: Window, fetched_at: datetime | None = None) -> Validation:
    """Split a window's raw bars into valid rows and rejected rows with every reason."""
    frame = frame.with_columns(symbol=pl.lit(window.symbol, pl.String()))
    return validate_symbols(frame, [window], fetched_at)[window.symbol]


def validate_symbols(
    frame: pl.DataFrame, windows: Sequence[Window], fetched_at: datetime | None = None
) -> dict[str, Validation]:
    """`validate` for the windows of many symbols over the same days, their bars in one frame
    with a `symbol` column: one pass of the rules for all, since Pandera's cost per pass
    (about 40 ms) outweighs a few bars of each symbol."""
    window = windows[0]
    fetched_at = fetched_at or clock.now()
    defects = frame["defects"] if "defects" in frame.columns else None
    numbered = frame.select("symbol", *BAR_SCHEMA.names()).with_row_index(_ROW)
    reasons = _failures(hard_schema(window.start, window.end, fetched_at), numbered)
    if defects is not None:
        reasons = _with_defects(reasons, defects)
    rejected = numbered.join(reasons, on=_ROW, how="inner").sort(_ROW).drop(_ROW)
    valid = numbered.join(reasons, on=_ROW, how="anti").drop(_ROW).sort("symbol", "ts")
    flagged = _flags(valid, window.market, window.timeframe)
    symbols = [w.symbol for w in windows]
    return {
        symbol: Validation(
            *(
                part.filter(pl.col("symbol") == symbol).drop("symbol")
                for part in (valid, rejected, flagged)
            )
        )
        for symbol in symbols
    }


def _with_defects(reasons: pl.DataFrame, defects: pl.Series) -> pl.DataFrame:
    """Add each row's decoding defects to its reasons; a value that could not be decoded is
    named by its defect, not again as null."""
    found = defects.to_frame("reason").with_row_index(_ROW).explode("reason").drop_nulls("reason")
    undecoded = found.select(_ROW, pl.col("reason").str.extract(r"^(\w+) ").alias("column"))
    schema_reasons = reasons.explode("reasons").rename({"reasons": "reason"})
    schema_reasons = schema_reasons.join(
        undecoded.with_columns(pl.format("{} is null or NaN", "column").alias("reason")),
        on=[_ROW, "reason"],
        how="anti",
    )
    return (
        pl.concat([found, schema_reasons], how="diagonal")
        .group_by(_ROW)
        .agg(pl.col("reason").unique().sort().alias("reasons"))
        .with_columns(pl.col(_ROW).cast(pl.UInt32))
    )


def _flags(valid: pl.DataFrame, market: Market, timeframe: Timeframe) -> pl.DataFrame:
    """symbol, ts and flags of the valid bars (sorted by symbol and ts) a soft rule flags:
    each symbol's bars are compared with its own earlier bars only."""
    if timeframe is Timeframe.MINUTE:
        local = pl.col("ts").dt.convert_time_zone(market.zone.key)
        slot = (local.dt.hour().cast(pl.Int32) * 60 + local.dt.minute()) // SLOT_MINUTES
    else:
        slot = pl.lit(0)
    context = valid.with_row_index(_ROW).with_columns(
        _recent_low=pl.col("low").shift(1).rolling_min(RECENT_BARS, min_samples=1).over("symbol"),
        _recent_high=pl.col("high").shift(1).rolling_max(RECENT_BARS, min_samples=1).over("symbol"),
        _recent_volume=pl.col("volume")
        .shift(1)
        .rolling_median(SLOT_BARS, min_samples=SLOT_MIN_BARS)
        .over("symbol", slot),
    )
    flags = _failures(SOFT_SCHEMA, context).rename({"reasons": "flags"})
    return (
        context.select(_ROW, "symbol", "ts")
        .join(flags, on=_ROW, how="inner")
        .drop(_ROW)
        .sort("symbol", "ts")
    )


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
            .otherwise(pl.format("{} {}", pl.col("column"), pl.col("check")))
            .alias("reasons"),
        )
        return described.unique().group_by(_ROW).agg(pl.col("reasons").sort())
    return pl.DataFrame(schema={_ROW: pl.UInt32, "reasons": pl.List(pl.String)})
