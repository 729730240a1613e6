"""PostgreSQL binary COPY of bars, both ways, vectorized with numpy.

Writing: rows are fixed-width records grouped by which nullable columns are null, so each
group is one numpy structured array turned into bytes at once: no per-row Python. The symbol
is the same in every row, so its text field has a fixed width too. Reading: see
FIXED_WIDTH_SELECT; PostgreSQL sends a message per row, which is gathered, then decoded a
block at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import polars as pl

COPY_COLUMNS = ("symbol", "ts", "open", "high", "low", "close", "volume", "vwap", "trades")
_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)
_POSTGRES_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
_PRICES = ("open", "high", "low", "close", "volume")
_NULLABLE = {"vwap": ">f8", "trades": ">i8"}


def encode(frame: pl.DataFrame, symbol: str) -> bytes:
    """Binary COPY payload for COPY ... (symbol, ts, open, ..., trades) FROM STDIN."""
    label = symbol.encode()
    values = {
        "ts": (frame["ts"].dt.epoch("ms").to_numpy() - _POSTGRES_EPOCH_MS) * 1000,
        **{c: frame[c].to_numpy() for c in _PRICES},
    }
    present = {c: frame[c].is_not_null().to_numpy() for c in _NULLABLE}
    chunks = [_HEADER]
    for vwap_present in (True, False):
        for trades_present in (True, False):
            mask = (present["vwap"] == vwap_present) & (present["trades"] == trades_present)
            if mask.any():
                group = {"vwap": vwap_present, "trades": trades_present}
                chunks.append(_records(frame, label, values, mask, group))
    chunks.append(_TRAILER)
    return b"".join(chunks)


def _records(
    frame: pl.DataFrame,
    label: bytes,
    values: dict[str, np.ndarray],
    mask: np.ndarray,
    present: dict[str, bool],
) -> bytes:
    fields: list[tuple[str, str]] = [("count", ">i2"), ("symbol_len", ">i4")]
    fields += [("symbol", f"S{len(label)}"), ("ts_len", ">i4"), ("ts", ">i8")]
    for column in _PRICES:
        fields += [(f"{column}_len", ">i4"), (column, ">f8")]
    for column, dtype in _NULLABLE.items():
        fields.append((f"{column}_len", ">i4"))
        if present[column]:
            fields.append((column, dtype))
    records = np.empty(int(mask.sum()), dtype=np.dtype(fields))
    records["count"] = len(COPY_COLUMNS)
    records["symbol_len"] = len(label)
    records["symbol"] = label
    for column, array in values.items():
        records[f"{column}_len"] = 8
        records[column] = array[mask]
    for column in _NULLABLE:
        if present[column]:
            records[f"{column}_len"] = 8
            records[column] = frame[column].to_numpy()[mask]
        else:
            records[f"{column}_len"] = -1
    return records.tobytes()


# Decoding: the read side selects fixed-width fields only (a NULL is sent as a value and a
# presence flag), so every record has one size and a block of them is one numpy array.
FIXED_WIDTH_SELECT = (
    "ts, open, high, low, close, volume, coalesce(vwap, 0), vwap IS NOT NULL, "
    "coalesce(trades, 0), trades IS NOT NULL"
)
_FIXED_RECORD = np.dtype(
    [
        ("count", ">i2"),
        ("ts_len", ">i4"),
        ("ts", ">i8"),
        *((name, dtype) for column in (*_PRICES, "vwap") for name, dtype in
          ((f"{column}_len", ">i4"), (column, ">f8"))),
        ("vwap_present_len", ">i4"),
        ("vwap_present", "?"),
        ("trades_len", ">i4"),
        ("trades", ">i8"),
        ("trades_present_len", ">i4"),
        ("trades_present", "?"),
    ]
)  # fmt: skip
_FIELDS = 10


class MalformedCopy(ValueError):
    pass


def decode_fixed_width(
    chunks: Iterable[bytes | bytearray | memoryview], *, batch_rows: int
) -> Iterator[np.ndarray]:
    """Blocks of at most `batch_rows` records from a binary COPY of FIXED_WIDTH_SELECT."""
    size = _FIXED_RECORD.itemsize
    pending: list[bytes] = []
    pending_bytes = 0
    header_seen = False
    for chunk in chunks:
        if not header_seen:
            if bytes(chunk[: len(_HEADER)]) != _HEADER:
                raise MalformedCopy("not a binary COPY stream without header extensions")
            chunk = chunk[len(_HEADER) :]
            header_seen = True
        pending.append(bytes(chunk))  # a memoryview would hold its libpq buffer
        pending_bytes += len(chunk)
        if pending_bytes >= batch_rows * size:
            buffer = b"".join(pending)
            whole = len(buffer) - len(buffer) % size
            yield _records_of(buffer[:whole])
            pending, pending_bytes = [buffer[whole:]], len(buffer) - whole
    buffer = b"".join(pending)
    if not buffer.endswith(_TRAILER) or (len(buffer) - len(_TRAILER)) % size:
        raise MalformedCopy("binary COPY stream ended inside a record")
    if len(buffer) > len(_TRAILER):
        yield _records_of(buffer[: -len(_TRAILER)])


def _records_of(buffer: bytes) -> np.ndarray:
    records = np.frombuffer(buffer, dtype=_FIXED_RECORD)
    if not (records["count"] == _FIELDS).all():
        raise MalformedCopy(f"binary COPY record without {_FIELDS} fields")
    for field in _FIXED_RECORD.names or ():  # a NULL (-1) or another type shifts the rest
        if field.endswith("_len"):
            value = field.removesuffix("_len")
            if not (records[field] == _FIXED_RECORD[value].itemsize).all():
                raise MalformedCopy(f"binary COPY field {value} is not {_FIXED_RECORD[value]}")
    return records


def epoch_us(postgres_us: np.ndarray) -> np.ndarray:
    """PostgreSQL's timestamptz (microseconds since 2000-01-01) as Unix microseconds."""
    return postgres_us.astype(np.int64) + _POSTGRES_EPOCH_MS * 1000
