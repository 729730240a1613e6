"""`GET /v1/bars/{symbol}`: one symbol's bars over a range, as a JSON page or a stream of
CSV, Arrow IPC or Parquet."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

import anyio
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from marketdata_pipeline.api.pool import WarehousePool
from marketdata_pipeline.registry import symbols
from marketdata_pipeline.warehouse import reading
from marketdata_pipeline.warehouse.reading import BarRange, BarSize

JSON_PAGE_DEFAULT = 5_000
JSON_PAGE_MAX = 50_000
_STREAM_CHUNK_BYTES = 1 << 20  # CSV leaves PostgreSQL a row at a time: sent a MiB at a time


class ApiError(Exception):
    """A request the API refuses: its status and one readable line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Format(StrEnum):
    JSON = "json"
    CSV = "csv"
    ARROW = "arrow"
    PARQUET = "parquet"

    @property
    def media_type(self) -> str:
        return {
            Format.JSON: "application/json",
            Format.CSV: "text/csv; charset=utf-8",
            Format.ARROW: "application/vnd.apache.arrow.stream",
            Format.PARQUET: "application/vnd.apache.parquet",
        }[self]


def _choice(request: Request, name: str, kind: type[StrEnum], default: str) -> str:
    raw = request.query_params.get(name, default)
    allowed = [member.value for member in kind]
    if raw not in allowed:
        raise ApiError(400, f"{name} must be one of {', '.join(allowed)}, got {raw[:40]!r}")
    return raw


def _moment(
    name: str, raw: str, midnight: Callable[[date], datetime], *, end: bool = False
) -> datetime:
    """A date (the market day: its start, or for `end` the next day's start) or an RFC 3339
    time with its offset."""
    shown = raw[:40]
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return midnight(day + timedelta(days=1) if end else day)
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            400, f"{name} {shown!r} is neither a date (2024-01-02) nor a time "
            "(2024-01-02T14:30:00Z)",
        ) from None  # fmt: skip
    if moment.tzinfo is None:
        raise ApiError(400, f"{name} {shown!r} has no time zone: add Z or an offset")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class BarsRequest:
    bars: BarRange
    format: Format
    limit: int
    after: datetime | None


def _parse(conn: psycopg.Connection, request: Request) -> BarsRequest:
    size = BarSize(_choice(request, "timeframe", BarSize, "daily"))
    fmt = Format(_choice(request, "format", Format, "json"))
    tracked = symbols.get(conn, request.path_params["symbol"])  # InvalidSymbol, NotFound
    midnight = tracked.asset_class.market.midnight
    params = request.query_params
    if "start" not in params:
        raise ApiError(400, "start is required: a date (2024-01-02) or a time with offset")
    start = _moment("start", params["start"], midnight)
    end = _moment("end", params["end"], midnight, end=True) if "end" in params else None
    end = end or datetime.now(UTC)
    if start >= end:
        raise ApiError(400, f"start {start:%Y-%m-%dT%H:%M:%SZ} is not before end "
                       f"{end:%Y-%m-%dT%H:%M:%SZ}")  # fmt: skip
    after = _moment("after", params["after"], midnight) if "after" in params else None
    limit = JSON_PAGE_DEFAULT
    if "limit" in params:
        if fmt is not Format.JSON:
            raise ApiError(400, f"limit pages JSON only; format={fmt} streams the whole range")
        try:
            limit = int(params["limit"])
        except ValueError:
            shown = params["limit"][:40]
            raise ApiError(400, f"limit must be a whole number, got {shown!r}") from None
        if not 1 <= limit <= JSON_PAGE_MAX:
            raise ApiError(
                400,
                f"limit must be 1 to {JSON_PAGE_MAX:,} bars a JSON page; for larger reads "
                "follow `next`, or ask for format=arrow, csv or parquet",
            )
    return BarsRequest(BarRange(tracked.symbol, size, start, end), fmt, limit, after)


async def respond(request: Request, warehouse: WarehousePool) -> Response:
    if Format(_choice(request, "format", Format, "json")) is Format.JSON:
        return await warehouse.run(_json_page, request)
    asked = await warehouse.run(_parse, request)
    encode = {Format.CSV: _csv, Format.ARROW: _arrow, Format.PARQUET: _parquet}[asked.format]
    return StreamingResponse(
        _stream(warehouse, asked.bars, encode),
        media_type=asked.format.media_type,
        headers={"Content-Disposition": f'attachment; filename="{_filename(asked)}"'},
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _filename(asked: BarsRequest) -> str:
    b = asked.bars
    extension = {Format.CSV: "csv", Format.ARROW: "arrows", Format.PARQUET: "parquet"}
    span = f"{b.start:%Y%m%dT%H%M}_{b.end:%Y%m%dT%H%M}"
    return f"{b.symbol}_{b.size}_{span}.{extension[asked.format]}"


def _json_page(conn: psycopg.Connection, request: Request) -> Response:
    asked = _parse(conn, request)
    page = reading.json_page(conn, asked.bars, after=asked.after, limit=asked.limit)
    more = page.count == asked.limit and page.last
    head = {
        "symbol": asked.bars.symbol,
        "timeframe": asked.bars.size,
        "start": _iso(asked.bars.start),
        "end": _iso(asked.bars.end),
        "next": str(request.url.include_query_params(after=_iso(page.last))) if more else None,
    }
    # The bars arrive as JSON text: spliced in, not decoded and encoded again.
    body = json.dumps(head, separators=(",", ":"))[:-1] + ',"bars":' + page.bars + "}"
    return Response(body, media_type=Format.JSON.media_type)


class _Drain:
    """A write-only file for pyarrow's writers whose bytes are taken as they come."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _csv(conn: psycopg.Connection, bars: BarRange) -> Iterator[bytes]:
    pending: list[bytes] = []
    size = 0
    for chunk in reading.csv_chunks(conn, bars, header=True):
        pending.append(chunk)
        size += len(chunk)
        if size >= _STREAM_CHUNK_BYTES:
            yield b"".join(pending)
            pending, size = [], 0
    yield b"".join(pending)


def _arrow(conn: psycopg.Connection, bars: BarRange) -> Iterator[bytes]:
    sink = _Drain()
    with pa.ipc.new_stream(sink, reading.ARROW_SCHEMA) as writer:
        for batch in reading.arrow_batches(conn, bars):
            writer.write_batch(batch)
            yield sink.take()
    yield sink.take()


def _parquet(conn: psycopg.Connection, bars: BarRange) -> Iterator[bytes]:
    sink = _Drain()
    with pq.ParquetWriter(sink, reading.ARROW_SCHEMA, compression="zstd") as writer:
        for batch in reading.arrow_batches(conn, bars):
            writer.write_batch(batch)  # one row group each
            yield sink.take()
    yield sink.take()


Encoder = Callable[[psycopg.Connection, BarRange], Iterator[bytes]]


async def _stream(
    warehouse: WarehousePool, bars: BarRange, encode: Encoder
) -> AsyncIterator[bytes]:
    """encode(conn, bars)'s chunks, produced in worker threads on one pooled session.

    A client that hangs up ends the COPY (the generator is closed in its thread) and the
    session goes back to the pool clean."""

    def chunks() -> Generator[bytes]:
        with warehouse.session() as conn:
            yield from encode(conn, bars)

    produced = chunks()
    try:
        async for chunk in iterate_in_threadpool(produced):
            if chunk:
                yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(produced.close)
