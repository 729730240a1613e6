"""API keys of the old service: raw key shown once, only its SHA-256 stored, every use audited."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from marketdata_pipeline.errors import ConfigError, NotFound

KEY_PREFIX = "mdw_"
# 32 random bytes, URL-safe base64 without padding: 43 characters.
_RAW_KEY = re.compile(r"^mdw_[A-Za-z0-9_-]{43}$")


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_well_formed(raw_key: str) -> bool:
    return bool(_RAW_KEY.fullmatch(raw_key))


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
        "INSERT INTO api_keys (key_hash, name) VALUES (%s, %s) "
        "RETURNING id, name, active, created_at, last_used, last_used_endpoint, request_count",
        (hash_key(raw), _check_name(name)),
    ).fetchone()
    assert row is not None
    return ApiKey(*row), raw


def find_by_name(conn: psycopg.Connection, name: str) -> ApiKey | None:
    row = conn.execute(
        "SELECT id, name, active, created_at, last_used, last_used_endpoint, request_count "
        "FROM api_keys WHERE name = %s ORDER BY id LIMIT 1",
        (name,),
    ).fetchone()
    return ApiKey(*row) if row else None


def get(conn: psycopg.Connection, key_id: int) -> ApiKey:
    row = conn.execute(
        "SELECT id, name, active, created_at, last_used, last_used_endpoint, request_count "
        "FROM api_keys WHERE id = %s",
        (key_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return ApiKey(*row)
