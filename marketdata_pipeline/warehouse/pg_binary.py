"""PostgreSQL binary COPY encoding of one symbol's bars frame, vectorized with numpy.

Rows are written as fixed-width records grouped by which nullable columns are null, so each
group is one numpy structured array turned into bytes at once: no per-row Python. The symbol
is the same in every row, so its text field has a fixed width too.
"""

from __future__ import annotations

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
