"""API keys of the old service: raw key shown once, only its SHA-256 stored, every use audited."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from marketdata_pipeline.errors import ConfigError, NotFound

KEY_PREFIX = "mdw_"  # then 32 random bytes, URL-safe base64 without padding
_KEY_LIKE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{8,}")
# api_keys.id is a bigint: a larger id cannot exist, and PostgreSQL refuses it as a parameter
# (NumericValueOutOfRange) instead of finding no row.
MAX_KEY_ID = 2**63 - 1


def redact(text: str) -> str:
    """`text` with anything shaped like a key masked: a client may put its key in a URL."""
    return _KEY_LIKE.sub(KEY_PREFIX + "...", text)


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


_SELECT = (
    "SELECT id, name, active, created_at, last_used, last_used_endpoint, request_count "
    "FROM api_keys"
)
_RETURNING = "RETURNING id, name, active, created_at, last_used, last_used_endpoint, request_count"


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    active: bool
    created_at: datetime
    last_used: datetime | None
    last_used_endpoint: str | None
    request_count: int


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ConfigError("key name must be 1 to 100 characters")
    return name


def create(conn: psycopg.Connection, name: str) -> tuple[ApiKey, str]:
    """Store a new key; returns its record and the raw key, which is never stored or shown again."""
    raw = generate_key()
    row = conn.execute(
        "INSERT INTO api_keys (key_hash, name) VALUES (%s, %s) " + _RETURNING,
        (hash_key(raw), _check_name(name)),
    ).fetchone()
    assert row is not None
    return ApiKey(*row), raw


def find_by_name(conn: psycopg.Connection, name: str) -> ApiKey | None:
    row = conn.execute(f"{_SELECT} WHERE name = %s ORDER BY id LIMIT 1", (name,)).fetchone()
    return ApiKey(*row) if row else None


def _check_id(key_id: int) -> None:
    if not 1 <= key_id <= MAX_KEY_ID:
        raise NotFound(f"no API key with id {key_id}")


def get(conn: psycopg.Connection, key_id: int) -> ApiKey:
    _check_id(key_id)
    row = conn.execute(f"{_SELECT} WHERE id = %s", (key_id,)).fetchone()
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return ApiKey(*row)


def list_keys(conn: psycopg.Connection, *, include_revoked: bool = True) -> list[ApiKey]:
    """Every key's record; the hash is never returned."""
    rows = conn.execute(f"{_SELECT} WHERE active OR %s ORDER BY id", (include_revoked,)).fetchall()
    return [ApiKey(*row) for row in rows]


def _set_active(conn: psycopg.Connection, key_id: int, active: bool) -> ApiKey:
    _check_id(key_id)
    row = conn.execute(
        "UPDATE api_keys SET active = %s WHERE id = %s " + _RETURNING,
        (active, key_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return ApiKey(*row)


def revoke(conn: psycopg.Connection, key_id: int) -> ApiKey:
    return _set_active(conn, key_id, False)


def restore(conn: psycopg.Connection, key_id: int) -> ApiKey:
    return _set_active(conn, key_id, True)


def delete(conn: psycopg.Connection, key_id: int) -> None:
    """Delete a key for good; its audit rows stay, detached from it."""
    _check_id(key_id)
    if not conn.execute("DELETE FROM api_keys WHERE id = %s", (key_id,)).rowcount:
        raise NotFound(f"no API key with id {key_id}")


class KeyRejected(Exception):
    """authenticate() refused a key: unknown (never issued, or deleted) or revoked."""

    def __init__(self, key_id: int | None) -> None:
        super().__init__("invalid API key")
        self.key_id = key_id  # the revoked key's id, for its audit row


def authenticate(conn: psycopg.Connection, raw_key: str) -> ApiKey:
    """The active key whose hash matches, or KeyRejected.

    Every presented key, well-formed or not, costs the same one index lookup of its SHA-256:
    the time to refuse a key says nothing about how close it came to a real one.
    """
    row = conn.execute(f"{_SELECT} WHERE key_hash = %s", (hash_key(raw_key),)).fetchone()
    if row is None:
        raise KeyRejected(None)
    key = ApiKey(*row)
    if not key.active:
        raise KeyRejected(key.id)
    return key


def record_use(
    conn: psycopg.Connection,
    key_id: int | None,
    endpoint: str,
    method: str,
    status_code: int,
    client_address: str | None = None,
) -> None:
    """Audit one request, from `client_address`, and count it on its key when the key was
    accepted (an unknown key's request is audited without a key; a revoked key's against it,
    uncounted)."""
    endpoint = redact(endpoint).replace("\x00", "\ufffd")  # a text column holds no NUL
    with conn.transaction():
        conn.execute(  # a key deleted since it was checked is audited without its id
            "INSERT INTO api_key_audit (key_id, endpoint, method, status_code, client_address) "
            "VALUES ((SELECT id FROM api_keys WHERE id = %s), %s, %s, %s, %s)",
            (key_id, endpoint, method.upper(), status_code, client_address),
        )
        if key_id is not None:
            conn.execute(
                "UPDATE api_keys SET last_used = now(), last_used_endpoint = %s, "
                "request_count = request_count + 1 WHERE id = %s AND active",
                (endpoint, key_id),
            )


@dataclass(frozen=True)
class AuditEntry:
    id: int
    key_id: int | None
    endpoint: str
    method: str
    status_code: int
    timestamp: datetime
    client_address: str | None = None


def audit(
    conn: psycopg.Connection, *, key_id: int | None = None, limit: int = 50, offset: int = 0
) -> list[AuditEntry]:
    """The audit log, newest first."""
    if limit < 1 or offset < 0:
        raise ConfigError("limit must be positive and offset not negative")
    if key_id is not None and not 1 <= key_id <= MAX_KEY_ID:
        raise ConfigError(f"key id must be from 1 to {MAX_KEY_ID}, got {key_id}")
    rows = conn.execute(
        'SELECT id, key_id, endpoint, method, status_code, "timestamp", client_address '
        "FROM api_key_audit "
        'WHERE %s::bigint IS NULL OR key_id = %s ORDER BY "timestamp" DESC, id DESC '
        "LIMIT %s OFFSET %s",
        (key_id, key_id, limit, offset),
    ).fetchall()
    return [AuditEntry(*row) for row in rows]
