"""Bars out of the warehouse for consumers: one symbol's range at any kept bar size.

Large reads stream through `COPY (SELECT ...) TO STDOUT`: PostgreSQL sends the rows as it
finds them and each chunk is passed on before the next is read, so a year of minute bars is
never held, and no Python object is built per value (a named cursor's tuples cost about
ten times as much).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.warehouse import pg_binary


class BarSize(StrEnum):
    """What a consumer reads: the two loaded timeframes and the two aggregated from them
    (continuous aggregates on TimescaleDB, views on plain PostgreSQL)."""

    MINUTE = "minute"
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"

    @property
    def relation(self) -> str:
        return f"bars_{self.value}"

    @property
    def span(self) -> str:
        """How long one bar lasts, as a PostgreSQL interval (a stock's trading day is one
        day too: its bar starts at midnight New York)."""
        return {"minute": "1 minute", "hourly": "1 hour", "daily": "1 day", "weekly": "1 week"}[
            self.value
        ]


COLUMNS = ("ts", "open", "high", "low", "close", "volume", "vwap", "trades")
ARROW_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),  # window start
        *((name, pa.float64()) for name in ("open", "high", "low", "close", "volume", "vwap")),
        ("trades", pa.int64()),
    ]
)


@dataclass(frozen=True)
class BarRange:
    """One symbol's bars of one size that overlap [start, end): a week that holds the range's
    first day is in it, though its bar starts before."""

    symbol: str
    size: BarSize
    start: datetime
    end: datetime

    def select(self, *, after: datetime | None = None, limit: int | None = None) -> sql.Composed:
        """The range's SELECT, oldest first, with its values bound client-side (COPY takes
        no server parameters); the symbol was checked against the strict pattern before."""
        return sql.SQL(
            "SELECT {columns} FROM {relation} WHERE symbol = {symbol} "
            "AND ts > {start}::timestamptz - {span}::interval AND ts < {end}{after} "
            "ORDER BY ts{limit}"
        ).format(
            columns=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            relation=sql.Identifier(self.size.relation),
            symbol=sql.Literal(self.symbol),
            start=sql.Literal(self.start),
            span=sql.Literal(self.size.span),
            end=sql.Literal(self.end),
            after=sql.SQL(" AND ts > {}").format(sql.Literal(after)) if after else sql.SQL(""),
            limit=sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL(""),
        )


@dataclass(frozen=True)
class JsonPage:
    bars: str  # a JSON array of bar objects, `ts` in RFC 3339 UTC
    last: datetime | None  # the last bar's start, when more bars follow it


def json_page(
    conn: psycopg.Connection, bars: BarRange, *, after: datetime | None, limit: int
) -> JsonPage:
    """At most `limit` bars of the range after `after`, oldest first, as JSON text built by
    PostgreSQL: a tenth of the time of Python objects, and off the API's event loop. One bar
    more is read to tell whether another page follows."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) > {limit}, max(ts) FILTER (WHERE n <= {limit}), "
            "'[' || coalesce(string_agg(json_build_object("
            """'ts', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), {fields}"""
            ")::text, ',' ORDER BY ts) FILTER (WHERE n <= {limit}), '') || ']' "
            "FROM (SELECT *, row_number() OVER (ORDER BY ts) AS n FROM ({select}) bars) page"
        ).format(
            limit=sql.Literal(limit),
            fields=sql.SQL(", ").join(
                sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(c)) for c in COLUMNS[1:]
            ),
            select=bars.select(after=after, limit=limit + 1),
        )
    ).fetchone()
    assert row is not None
    more, last, text = row
    return JsonPage(bars=text, last=last if more else None)


def csv_chunks(conn: psycopg.Connection, bars: BarRange, *, header: bool) -> Iterator[bytes]:
    """The range as CSV (timestamps `2024-01-02 14:30:00+00` in UTC), chunk by chunk."""
    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER {})").format(
        bars.select(), sql.SQL("true" if header else "false")
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        yield from (bytes(chunk) for chunk in copy)


def arrow_batches(
    conn: psycopg.Connection, bars: BarRange, *, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """The range as Arrow record batches of at most `batch_rows` bars, decoded off a binary
    COPY stream."""
    statement = sql.SQL("COPY (SELECT {} FROM ({}) bars) TO STDOUT WITH (FORMAT binary)").format(
        sql.SQL(pg_binary.FIXED_WIDTH_SELECT), bars.select()
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for records in pg_binary.decode_fixed_width(copy, batch_rows=batch_rows):
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(pg_binary.epoch_us(records["ts"]), ARROW_SCHEMA.field("ts").type),
                    *(pa.array(records[c].astype(np.float64)) for c in COLUMNS[1:6]),
                    pa.array(records["vwap"].astype(np.float64), mask=~records["vwap_present"]),
                    pa.array(records["trades"].astype(np.int64), mask=~records["trades_present"]),
                ],
                schema=ARROW_SCHEMA,
            )


def latest_bars(conn: psycopg.Connection) -> dict[str, dict[str, datetime | None]]:
    """Per asset class and loaded bar size, the start of the newest bar of an active symbol.
    One index probe per symbol, not a scan of the bars."""
    sizes = (BarSize.MINUTE, BarSize.DAILY)
    latest: dict[str, dict[str, datetime | None]] = {c: dict.fromkeys(sizes) for c in AssetClass}
    for size in sizes:
        rows = conn.execute(
            sql.SQL(
                "SELECT t.asset_class, max(newest.ts) FROM tracked_symbols t CROSS JOIN LATERAL "
                "(SELECT max(ts) AS ts FROM {} WHERE symbol = t.symbol) newest "
                "WHERE t.active GROUP BY t.asset_class"
            ).format(sql.Identifier(size.relation))
        ).fetchall()
        for asset_class, newest in rows:
            latest[asset_class][size] = newest
    return latest
