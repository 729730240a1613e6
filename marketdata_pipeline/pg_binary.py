"""PostgreSQL binary COPY encoding of a bars frame, vectorized with numpy.

Rows are written as fixed-width records grouped by which nullable columns are null, so each
group is one numpy structured array turned into bytes at once: no per-row Python.
"""

from __future__ import annotations

import numpy as np
import polars as pl

COPY_COLUMNS = ("ts", "open", "high", "low", "close", "volume", "vwap", "trades")
_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)
_POSTGRES_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
_NULLABLE = {"vwap": ">f8", "trades": ">i8"}


def encode(frame: pl.DataFrame) -> bytes:
    """Binary COPY payload for COPY ... (ts, open, high, low, close, volume, vwap, trades)."""
    ts_us = (frame["ts"].dt.epoch("ms").to_numpy() - _POSTGRES_EPOCH_MS) * 1000
    values = {
        "ts": ts_us,
        **{c: frame[c].to_numpy() for c in ("open", "high", "low", "close", "volume")},
    }
    present = {c: frame[c].is_not_null().to_numpy() for c in _NULLABLE}
    chunks = [_HEADER]
    for vwap_present in (True, False):
        for trades_present in (True, False):
            mask = (present["vwap"] == vwap_present) & (present["trades"] == trades_present)
            if mask.any():
                chunks.append(
                    _records(frame, values, mask, {"vwap": vwap_present, "trades": trades_present})
                )
    chunks.append(_TRAILER)
    return b"".join(chunks)


def _records(
    frame: pl.DataFrame, values: dict[str, np.ndarray], mask: np.ndarray, present: dict[str, bool]
) -> bytes:
    fields: list[tuple[str, str]] = [("count", ">i2"), ("ts_len", ">i4"), ("ts", ">i8")]
    for column in ("open", "high", "low", "close", "volume"):
        fields += [(f"{column}_len", ">i4"), (column, ">f8")]
    for column, dtype in _NULLABLE.items():
        fields.append((f"{column}_len", ">i4"))
        if present[column]:
            fields.append((column, dtype))
    records = np.empty(int(mask.sum()), dtype=np.dtype(fields))
    records["count"] = len(COPY_COLUMNS)
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
