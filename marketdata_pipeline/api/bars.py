"""`GET /v1/bars/{symbol}`: one symbol's bars over a range, as a JSON page or a stream of
CSV, Arrow IPC or Parquet."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

import anyio
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from marketdata_pipeline import clock
from marketdata_pipeline.api.http import ApiError, iso, query_parameters
from marketdata_pipeline.api.pool import BUSY_RETRY_SECONDS, WarehousePool
from marketdata_pipeline.api.shared_limits import SharedLimits
from marketdata_pipeline.registry import symbols
from marketdata_pipeline.registry.api_keys import ApiKey
from marketdata_pipeline.warehouse import reading
from marketdata_pipeline.warehouse.reading import BarRange, BarSize

log = logging.getLogger(__name__)

JSON_PAGE_DEFAULT = 5_000
JSON_PAGE_MAX = 50_000
STREAMS_PER_KEY = 2
STALLED_SECONDS = 60  # a stream whose client reads nothing this long is ended
# A stream holds one of few sessions while its client reads: it must keep this pace, which
# a slow link (about 1.1 Mbit/s) keeps, and end within the cap, so that holding a session
# costs its client 8 MiB a minute and lasts 10 minutes at most. A year of minute bars as
# CSV (69 MiB in the tests) takes 8.6 minutes at the floor, inside the cap.
STREAM_FLOOR_BYTES_PER_MINUTE = 8 * 2**20
STREAM_CAP_SECONDS = 10 * 60
_PACE_GRACE_SECONDS = 5  # for the first bytes to cross the network: no pace is measured in it
_SLICE_BYTES = 64 * 1024
_STREAM_CHUNK_BYTES = 1 << 20  # CSV leaves PostgreSQL a row at a time: sent a MiB at a time
PARAMETERS = ("timeframe", "start", "end", "format", "limit", "after")
JSON_ONLY = ("limit", "after")
DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
# RFC 3339 with its offset, and seconds to the microsecond (what a datetime holds)
TIME_PATTERN = re.compile(
    r"\d{4}-\d{2}-\d{2}T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
)


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


def _choice(params: dict[str, str], name: str, kind: type[StrEnum], default: str) -> str:
    raw = params.get(name, default)
    allowed = [member.value for member in kind]
    if raw not in allowed:
        raise ApiError(400, f"{name} must be one of {', '.join(allowed)}, got {raw[:40]!r}")
    return raw


def _moment(
    name: str, raw: str, midnight: Callable[[date], datetime], *, end: bool = False
) -> datetime:
    """A date (the day's start, or for `end` the next day's start) or an RFC 3339 time with
    its offset: only those forms (the OpenAPI document's patterns), not every form that
    Python's ISO parser takes."""
    shown = raw[:40]
    try:
        if DATE_PATTERN.fullmatch(raw):
            day = date.fromisoformat(raw)
            return midnight(day + timedelta(days=1) if end else day)
        if TIME_PATTERN.fullmatch(raw):
            return datetime.fromisoformat(raw).astimezone(UTC)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}T[\d:.]+", raw, re.ASCII):
            raise ApiError(400, f"{name} {shown!r} has no time zone: add Z or an offset")
        raise ValueError(raw)
    except ValueError:
        # A `+` sent unencoded in a URL arrives as a space.
        hint = " (send a + in a URL as %2B)" if " " in raw else ""
        raise ApiError(
            400, f"{name} {shown!r} is neither a date (2024-01-02) nor a time "
            f"(2024-01-02T14:30:00Z){hint}",
        ) from None  # fmt: skip
    except OverflowError:  # the first or last representable day, shifted past the calendar
        raise ApiError(400, f"{name} {shown!r} is out of range") from None


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


@dataclass(frozen=True)
class BarsRequest:
    bars: BarRange
    format: Format
    limit: int
    after: datetime | None


def _parse(conn: psycopg.Connection, request: Request, params: dict[str, str]) -> BarsRequest:
    size = BarSize(_choice(params, "timeframe", BarSize, "daily"))
    fmt = Format(_choice(params, "format", Format, "json"))
    tracked = symbols.get(conn, request.path_params["symbol"])  # InvalidSymbol, NotFound
    # A date is the market's day; weeks are UTC weeks (Monday 00:00 UTC), so for weekly bars a
    # date is the UTC day, and a week is in the range when one of its days is.
    midnight = _utc_midnight if size is BarSize.WEEKLY else tracked.asset_class.market.midnight
    if "start" not in params:
        raise ApiError(400, "start is required: a date (2024-01-02) or a time with offset")
    start = _moment("start", params["start"], midnight)
    end = _moment("end", params["end"], midnight, end=True) if "end" in params else None
    end = end or clock.now()
    if start >= end:
        raise ApiError(400, f"start {iso(start)} is not before end {iso(end)}")
    after = _moment("after", params["after"], midnight) if "after" in params else None
    if fmt is not Format.JSON and any(name in params for name in JSON_ONLY):
        raise ApiError(400, f"limit and after page JSON only; format={fmt} streams the range")
    limit = JSON_PAGE_DEFAULT
    if "limit" in params:
        raw = params["limit"]
        if not (raw.isascii() and raw.isdigit()):
            raise ApiError(400, f"limit must be a whole number, got {raw[:40]!r}")
        limit = int(raw) if len(raw) <= 9 else 0  # int() refuses 4,300 digits and more
        if not 1 <= limit <= JSON_PAGE_MAX:
            raise ApiError(
                400,
                f"limit must be 1 to {JSON_PAGE_MAX:,} bars a JSON page; for larger reads "
                "follow `next`, or ask for format=arrow, csv or parquet",
            )
    return BarsRequest(BarRange(tracked.symbol, size, start, end), fmt, limit, after)


class Streams:
    """The sessions that streams read on, apart from the short queries' (a slow client holds
    its session while it reads), the limits that count each key's open streams across
    processes (on the sessions of `keys`), and the pace and time that a stream is allowed."""

    def __init__(
        self,
        url: str,
        limits: SharedLimits,
        keys: WarehousePool,
        *,
        sessions: int = 8,
        floor: int = STREAM_FLOOR_BYTES_PER_MINUTE,
        cap: float = STREAM_CAP_SECONDS,
    ) -> None:
        self.warehouse = WarehousePool(url, sessions=sessions, purpose="streams")
        self.limits = limits
        self.keys = keys
        self.floor = floor
        self.cap = cap


async def respond(request: Request, queries: WarehousePool, streams: Streams) -> Response:
    params = query_parameters(request, PARAMETERS)
    if _choice(params, "format", Format, "json") == Format.JSON:
        return await queries.run(_json_page, request, params)
    asked = await queries.run(_parse, request, params)
    key: ApiKey = request.state.api_key
    # The slot is taken before waiting for a session. The session is taken, and the first
    # chunk read, before the response starts: a stream that cannot have one, or whose query
    # fails, is an error, not a 200.
    with anyio.CancelScope(shield=True):  # a slot taken is always given back, cancelled or not
        slot = await streams.keys.run(streams.limits.take, key.id, "stream", STREAMS_PER_KEY)
    if slot is None:
        raise ApiError(
            429,
            f"this key has {STREAMS_PER_KEY} streams open already: retry when one ends",
            headers={"Retry-After": str(BUSY_RETRY_SECONDS)},
        )
    try:
        conn = await streams.warehouse.lease()
    except BaseException:
        await streams.limits.release(streams.keys, slot)
        raise
    encode = {Format.CSV: _csv, Format.ARROW: _arrow, Format.PARQUET: _parquet}[asked.format]
    stream = _LeasedStream(
        streams,
        slot,
        conn,
        encode(conn, asked.bars),
        media_type=asked.format.media_type,
        headers={"Content-Disposition": f'attachment; filename="{_filename(asked)}"'},
    )
    await stream.start()
    return stream


def _filename(asked: BarsRequest) -> str:
    b = asked.bars
    extension = {Format.CSV: "csv", Format.ARROW: "arrows", Format.PARQUET: "parquet"}
    span = f"{b.start:%Y%m%dT%H%M}_{b.end:%Y%m%dT%H%M}"
    return f"{b.symbol}_{b.size}_{span}.{extension[asked.format]}"


def _json_page(conn: psycopg.Connection, request: Request, params: dict[str, str]) -> Response:
    asked = _parse(conn, request, params)
    page = reading.json_page(conn, asked.bars, after=asked.after, limit=asked.limit)
    following = None
    if page.last:  # a path and query of the known parameters: not the Host a client sent
        query = {**params, "after": page.last.isoformat()}
        following = f"{request.url.path}?{urlencode(query)}"
    head = {
        "symbol": asked.bars.symbol,
        "timeframe": asked.bars.size,
        "start": iso(asked.bars.start),
        "end": iso(asked.bars.end),
        "next": following,
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


def _csv(conn: psycopg.Connection, bars: BarRange) -> Generator[bytes]:
    pending: list[bytes] = []
    size = 0
    for chunk in reading.csv_chunks(conn, bars, header=True):
        pending.append(chunk)
        size += len(chunk)
        if size >= _STREAM_CHUNK_BYTES:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


def _arrow(conn: psycopg.Connection, bars: BarRange) -> Generator[bytes]:
    sink = _Drain()
    with pa.ipc.new_stream(sink, reading.ARROW_SCHEMA) as writer:
        for batch in reading.arrow_batches(conn, bars):
            writer.write_batch(batch)
            yield sink.take()
    yield sink.take()


def _parquet(conn: psycopg.Connection, bars: BarRange) -> Generator[bytes]:
    sink = _Drain()
    with pq.ParquetWriter(sink, reading.ARROW_SCHEMA, compression="zstd") as writer:
        for batch in reading.arrow_batches(conn, bars):
            writer.write_batch(batch)  # one row group each
            yield sink.take()
    yield sink.take()


class _Cut(Exception):
    """A stream's client is too slow, or the stream ran too long: it is ended."""


class _LeasedStream(StreamingResponse):
    """A stream that owns a warehouse session and one of its key's stream slots, and gives
    both back however it ends: finished, failed, its client gone before the first byte, or
    cut: its client reading nothing for STALLED_SECONDS, or slower than the floor, or the
    stream running past the cap."""

    def __init__(
        self,
        streams: Streams,
        slot: int,
        conn: psycopg.Connection,
        chunks: Generator[bytes],
        **kwargs: Any,
    ) -> None:
        self._lease = (streams, slot, conn, chunks)  # its slot was taken already
        self._first = b""
        super().__init__(self._chunks(), **kwargs)

    async def start(self) -> None:
        """Read the first chunk: the query runs, or fails, before the response starts."""
        chunks = self._lease[3]
        try:
            self._first = await anyio.to_thread.run_sync(next, chunks, b"")
        except BaseException:
            await self._end()
            raise

    async def _chunks(self) -> AsyncIterator[bytes]:
        first, self._first = self._first, b""  # not held for the rest of the stream
        yield first
        del first
        async for chunk in iterate_in_threadpool(self._lease[3]):
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streams = self._lease[0]
        started = time.monotonic()
        sent = 0

        async def send_in_time(message: Message) -> None:
            nonlocal sent
            through = sent + len(message.get("body", b""))
            # Each byte is due when the floor's pace reaches it: a client that read fast
            # before may read slowly for a while, but only for as long as it read ahead.
            now = time.monotonic()
            limits = [
                (STALLED_SECONDS, f"its client read nothing for {STALLED_SECONDS} s"),
                (started + streams.cap - now, f"it ran for {streams.cap:g} s"),
            ]
            if through > sent:
                due = started + _PACE_GRACE_SECONDS + through * 60 / streams.floor
                why = f"its client read slower than {streams.floor:,} bytes a minute"
                limits.append((due - now, why))
            wait, why = min(limits)
            with anyio.move_on_after(max(wait, 0)) as in_time:
                if wait > 0:
                    await send(message)
            if in_time.cancelled_caught or wait <= 0:
                raise _Cut(why)
            sent = through

        async def send_in_slices(message: Message) -> None:
            # A chunk goes out a slice at a time: a stream cut mid-chunk leaves no more than
            # a slice in the connection's buffer, not the rest of the chunk.
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= _SLICE_BYTES:
                await send_in_time(message)
                return
            more = message.get("more_body", False)
            body = memoryview(body)  # slices of it are not copies
            for at in range(0, len(body), _SLICE_BYTES):
                last = at + _SLICE_BYTES >= len(body)
                await send_in_time(
                    {
                        "type": "http.response.body",
                        "body": body[at : at + _SLICE_BYTES],
                        "more_body": more or not last,
                    }
                )

        try:
            await super().__call__(scope, receive, send_in_slices)
        except _Cut as cut:
            log.warning("a stream was cut after %s bytes: %s", f"{sent:,}", cut)
        finally:
            await self._end()

    async def _end(self) -> None:
        streams, slot, conn, chunks = self._lease
        with anyio.CancelScope(shield=True):
            # The slot first: its key may open another stream while the COPY ends.
            await streams.limits.release(streams.keys, slot)
            try:  # a COPY cut short is ended, and the session left clean
                await anyio.to_thread.run_sync(chunks.close)
            finally:
                await streams.warehouse.give_back(conn)
