"""Shared fixtures: a real PostgreSQL started by the suite, fresh databases, PGlite TimescaleDB."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import polars as pl
import psycopg
import pytest
from psycopg import sql

from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.domain import BAR_SCHEMA, Timeframe
from marketdata_pipeline.polygon.simulator import Simulator, SimulatorHTTPServer, serve
from marketdata_pipeline.registry import symbols
from marketdata_pipeline.warehouse import embedded, migrations
from marketdata_pipeline.warehouse.connection import connection, with_database

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The tests load simulator bars into databases of their own, not the demo's: they say so, as an
# operator would, for this process and every one it starts (a test of the refusal unsets it).
os.environ["MARKETDATA_ALLOW_SYNTHETIC"] = "1"
PGLITE_DIR = Path(__file__).resolve().parent / "pglite"
# The shipped migrations' latest version: a test's own files come after it.
LATEST = max(int(path.name[:3]) for path in (PROJECT_DIR / "sql").glob("*.sql"))


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the whole run, from the same wheel as the embedded default."""
    home = tmp_path_factory.mktemp("pgserver")
    url = embedded.start(home)
    yield url
    embedded.stop(home)


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A new, empty database on the suite's server; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """A new database with every migration applied."""
    with connection(database_url) as conn:
        migrations.migrate(conn)
    return database_url


@pytest.fixture
def warehouse_url(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated database with the default symbols registered (a bars run loads only
    registered symbols), which Dagster's WarehouseResource uses (through DATABASE_URL)."""
    with connection(migrated_url) as conn:
        symbols.seed(conn, DEFAULT_SYMBOLS)
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    return migrated_url


@pytest.fixture
def migrated_conn(migrated_url: str) -> Iterator[psycopg.Connection]:
    """A session on a new database with every migration applied, in autocommit: each load
    commits on its own, as in a run, whatever the test reads between loads."""
    with connection(migrated_url, autocommit=True) as conn:
        yield conn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run `marketdata ARGS` in a subprocess, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "marketdata_pipeline", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=PROJECT_DIR,
    )


@pytest.fixture(scope="module")
def timescaledb_url() -> Iterator[str]:
    """PGlite with TimescaleDB on a loopback port (npm packages installed on first use)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are not installed: the TimescaleDB (PGlite) engine needs them")
    if not (PGLITE_DIR / "node_modules" / "@unni-craftsman" / "pglite").exists():
        subprocess.run(
            [npm, "install", "--legacy-peer-deps", "--no-package-lock", "--no-audit", "--no-fund"],
            cwd=PGLITE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    port = free_port()
    process = subprocess.Popen(
        [node, "server.mjs", str(port)],
        cwd=PGLITE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening" not in line:
            pytest.fail(f"PGlite TimescaleDB did not start: {line}{process.stdout.read()}")
        url = f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable"
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorHTTPServer]:
    """The simulator on a real loopback socket."""
    running = serve(sim)
    yield running
    running.shutdown()
    running.server_close()


def bars_frame(bars: dict) -> pl.DataFrame:
    """Simulator columns (Polygon's short names) as the client's typed frame."""
    return pl.DataFrame(
        {
            "ts": pl.Series(bars["t"]).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            "open": bars["o"],
            "high": bars["h"],
            "low": bars["l"],
            "close": bars["c"],
            "volume": bars["v"],
            "vwap": bars["vw"],
            "trades": bars["n"],
        },
        schema=BAR_SCHEMA,
    )


def read_bars(
    conn: psycopg.Connection, timeframe: Timeframe, symbol: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """The stored bars of [start, end), oldest first, in the client's frame schema."""
    rows = conn.execute(
        sql.SQL(
            "SELECT ts, open, high, low, close, volume, vwap, trades FROM {} "
            "WHERE symbol = %s AND ts >= %s AND ts < %s ORDER BY ts"
        ).format(sql.Identifier(timeframe.table)),
        (symbol, start, end),
    ).fetchall()
    return pl.DataFrame(rows, schema=BAR_SCHEMA, orient="row")
