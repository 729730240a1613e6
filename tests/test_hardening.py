"""Races and hostile input, on real PostgreSQL and real `marketdata` processes.

Concurrent first commands on a fresh embedded home, concurrent adds of one symbol, key ids
beyond bigint, symbols that upper-case into ASCII, and DATABASE_URLs whose password would
otherwise show in an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from marketdata_pipeline.domain import (
    AssetClass,
    InvalidSymbol,
    Market,
    Timeframe,
    Window,
    empty_bars,
)
from marketdata_pipeline.errors import AlreadyExists, ConfigError, MarketdataError, NotFound
from marketdata_pipeline.registry import api_keys
from marketdata_pipeline.registry import symbols as registry
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from marketdata_pipeline.warehouse.loading import replace_window
from tests.conftest import PROJECT_DIR, run_cli


@pytest.fixture
def url(database_url: str) -> str:
    with db.connection(database_url) as conn:
        bootstrap(conn)
    return database_url


def marketdata(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `marketdata ARGS` without waiting for it (run_cli waits)."""
    return subprocess.Popen(
        [sys.executable, "-m", "marketdata_pipeline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=PROJECT_DIR,
    )


def in_threads(count: int, work: Callable[[], object]) -> list[object]:
    """Run `work` in `count` threads released together; each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work()
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


# 1. Two first commands at once on a fresh embedded home


def test_concurrent_ensure_database_all_succeed(pg_admin_url: str) -> None:
    names = [f"t_race_{uuid.uuid4().hex[:10]}" for _ in range(3)]
    try:
        for name in names:
            results = in_threads(8, partial(embedded.ensure_database, pg_admin_url, name))
            assert results == [None] * 8, [repr(r) for r in results if r is not None]
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "separate_temp_dirs",
    [False, True],
    ids=["one-environment", "each-its-own-TMPDIR"],  # pgserver's own lock lives in TMPDIR
)
def test_two_first_commands_on_a_fresh_home_both_succeed(
    tmp_path: Path, separate_temp_dirs: bool
) -> None:
    home = tmp_path / "home"
    env = {"MARKETDATA_HOME": str(home), "DATABASE_URL": ""}
    try:
        processes = []
        for name in ("a", "b"):
            own = dict(env)
            if separate_temp_dirs:
                (tmp_path / name).mkdir(mode=0o700)  # platformdirs ignores a looser one
                own |= {"TMPDIR": str(tmp_path / name), "XDG_RUNTIME_DIR": str(tmp_path / name)}
            processes.append(marketdata("db", "migrate", env=own))
        outcomes = [(p.wait(timeout=180), *p.communicate()) for p in processes]
        for code, _, stderr in outcomes:
            assert code == 0, stderr
        applied = [stdout for _, stdout, _ in outcomes if "applied" in stdout]
        assert len(applied) == 1, "the migrations are applied once"
    finally:
        stop = run_cli("db", "stop", env=env)
        assert stop.returncode == 0, stop.stderr
    assert not (home / "pgdata" / "postmaster.pid").exists()


# 2. Concurrent adds of one new symbol


def lock_waiters(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_lock_waiters(url: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while lock_waiters(url) < count:
        assert time.monotonic() < deadline, f"{count} sessions never queued on the table lock"
        time.sleep(0.05)


class HeldInserts:
    """Lets SELECTs (and SELECT ... FOR UPDATE) on tracked_symbols run but holds every INSERT,
    so both adds get past any check before either inserts: the race, every time."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        self.conn.execute("LOCK TABLE tracked_symbols IN SHARE MODE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def test_concurrent_adds_of_one_symbol_one_wins_one_already_exists(url: str) -> None:
    for symbol in ("RACE", "RACE.B", "RACEC"):
        held = HeldInserts(url)
        try:
            outcome: list[object] = []

            def add(symbol: str = symbol, outcome: list[object] = outcome) -> None:
                try:
                    with db.connection(url) as conn:
                        outcome.append(registry.add(conn, symbol, AssetClass.STOCK))
                except Exception as error:
                    outcome.append(error)

            threads = [threading.Thread(target=add) for _ in range(2)]
            for thread in threads:
                thread.start()
            wait_for_lock_waiters(url, 2)
        finally:
            held.release()
        for thread in threads:
            thread.join(timeout=60)
        added = [o for o in outcome if isinstance(o, registry.TrackedSymbol)]
        refused = [o for o in outcome if not isinstance(o, registry.TrackedSymbol)]
        assert [a.symbol for a in added] == [symbol], outcome
        assert len(refused) == 1 and isinstance(refused[0], AlreadyExists), outcome
        assert str(refused[0]) == f"symbol {symbol} is already registered (as stock)"


def test_concurrent_cli_adds_print_one_line(url: str) -> None:
    env = {"DATABASE_URL": url}
    held = HeldInserts(url)
    try:
        processes = [marketdata("symbols", "add", "racecli", env=env) for _ in range(2)]
        wait_for_lock_waiters(url, 2)
    finally:
        held.release()
    outcomes = sorted((p.wait(timeout=60), *p.communicate()) for p in processes)
    (won, won_out, _), (lost, lost_out, lost_err) = outcomes
    assert won == 0 and won_out.strip() == "registered RACECLI (stock)"
    assert lost == 1 and lost_out == ""
    assert lost_err.strip().splitlines() == [
        "marketdata: error: symbol RACECLI is already registered (as stock)"
    ]


def test_reactivating_concurrently_is_also_one_already_exists(url: str) -> None:
    with db.connection(url) as conn:
        registry.remove(conn, "XYZ")

    def add() -> registry.TrackedSymbol:
        with db.connection(url) as conn:
            return registry.add(conn, "XYZ", AssetClass.STOCK)

    results = in_threads(2, add)
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "TrackedSymbol"]


# 3. Key ids beyond bigint

HUGE_ID = "99999999999999999999"


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "revoke", HUGE_ID),
        ("keys", "restore", HUGE_ID),
        ("keys", "delete", HUGE_ID),
        ("keys", "audit", "--key", HUGE_ID),
        ("keys", "revoke", str(2**63)),
        ("keys", "delete", "0"),
    ],
)
def test_key_ids_beyond_bigint_are_a_usage_error(url: str, args: tuple[str, ...]) -> None:
    result = run_cli(*args, env={"DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "not in the range 1<=x<=9223372036854775807" in lines[0]


def test_core_refuses_key_ids_beyond_bigint(url: str) -> None:
    with db.connection(url) as conn:
        for action in (api_keys.get, api_keys.revoke, api_keys.restore, api_keys.delete):
            for key_id in (2**63, int(HUGE_ID), -(2**63) - 1):
                with pytest.raises(NotFound, match=f"no API key with id {key_id}"):
                    action(conn, key_id)
        with pytest.raises(ConfigError, match="key id must be from 1 to 9223372036854775807"):
            api_keys.audit(conn, key_id=2**63)
        assert api_keys.get(conn, 1).name == "admin", "the session is still usable"
        with pytest.raises(NotFound):
            api_keys.revoke(conn, 2**63 - 1)  # the largest bigint: in range, no such key


# 4. Characters that upper-case into ASCII

LOOKALIKES = [
    "\u00dfQ",  # sharp s: upper() gives "SSQ"
    "\ufb01T",  # the fi ligature: "FIT"
    "\u0131bm",  # dotless i: "IBM"
    "\u017fpy",  # long s: "SPY"
    "\uff21\uff21\uff30\uff2c",  # full-width AAPL
    "AAP\u212a",  # the Kelvin sign, which lower() would turn into "k"
]


@pytest.mark.parametrize("symbol", LOOKALIKES)
def test_symbols_that_upper_case_into_ascii_are_refused(url: str, symbol: str) -> None:
    with db.connection(url) as conn:
        before = conn.execute("SELECT count(*) FROM tracked_symbols").fetchone()
        with pytest.raises(InvalidSymbol) as refused:
            registry.add(conn, symbol, AssetClass.STOCK)
        assert str(refused.value) == (
            f"invalid symbol {symbol!r}: expected 1-12 letters, digits or '.', "
            "starting with a letter"
        )
        assert conn.execute("SELECT count(*) FROM tracked_symbols").fetchone() == before


def test_cli_refuses_symbols_that_upper_case_into_ascii(url: str) -> None:
    for symbol in LOOKALIKES:
        result = run_cli("symbols", "add", symbol, env={"DATABASE_URL": url})
        assert result.returncode == 2, result.stdout  # a bad argument
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"marketdata: error: invalid symbol {symbol!r}: expected 1-12 letters, digits "
            "or '.', starting with a letter"
        ]
    # and plain ASCII, with spaces around it, still works
    assert run_cli("symbols", "add", " ibm ", env={"DATABASE_URL": url}).stdout.strip() == (
        "registered IBM (stock)"
    )


# 5. A password with an unencoded '@' or '/' never shows


def fragments(secret: str) -> set[str]:
    """Every piece of the password of three characters or more."""
    return {secret[i:j] for i in range(len(secret)) for j in range(i + 3, len(secret) + 1)}


@pytest.mark.parametrize(
    ("database_url", "password"),
    [
        ("postgresql://user:p@ss/w0rd@127.0.0.1:5999/db", "p@ss/w0rd"),
        ("postgresql://user:se/cret@localhost:1/db", "se/cret"),
        ("postgresql://user:hunt@er2@127.0.0.1:5999/db", "hunt@er2"),
        ("postgres://ops:x/y@zq9@db.internal:5432/wh", "x/y@zq9"),
        ("postgresql://ops:k3y/v4l?q@127.0.0.1:5999/wh", "k3y/v4l?q"),
    ],
)
def test_password_with_unencoded_at_or_slash_never_shows(database_url: str, password: str) -> None:
    result = run_cli("db", "status", env={"DATABASE_URL": database_url})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert len(output.strip().splitlines()) == 1, output
    assert "percent-encode '@', '/' and ':'" in output
    assert "Traceback" not in output
    # "ss" is where libpq took the host of the first URL to be: never as a host or port
    for fragment in {"p@ss", '"ss"', "ss:", "w0rd", "se/cret", "cret", *fragments(password)}:
        assert fragment not in output, (fragment, output)


def test_ambiguous_url_is_refused_before_connecting_and_well_formed_ones_pass() -> None:
    with pytest.raises(ConfigError, match="ambiguous"):
        db.connect("postgresql://user:p@ss/w0rd@127.0.0.1:5999/db")
    assert (
        db.describe("postgresql://user:p%40ss%2Fw0rd@127.0.0.1:5999/db")
        == "127.0.0.1:5999, database db"
    )
    assert db.describe("postgresql://user:pa:ss@db.internal/wh") == "db.internal:5432, database wh"
    assert (
        db.describe("postgresql:///wh?host=/run/postgresql")
        == "socket /run/postgresql, database wh"
    )
    assert db.describe("host=db.internal port=6000 password=a@b/c") == "db.internal:6000"


def test_a_window_is_never_loaded_inside_an_open_transaction(migrated_url: str) -> None:
    """A load nested in a caller's transaction would be a savepoint, committed only with it:
    a window told loaded could vanish. It is refused, and nothing is written."""
    window = Window.of_month(Market.STOCK, Timeframe.DAILY, "AAPL", date(2024, 1, 1))
    with db.connection(migrated_url) as conn:
        conn.execute("SELECT 1")  # the session is now inside a transaction
        with pytest.raises(MarketdataError, match="loads in its own transaction"):
            replace_window(conn, window, empty_bars(), empty_bars())
        conn.rollback()
        [(logged,)] = conn.execute("SELECT count(*) FROM loaded_months").fetchall()
    assert logged == 0
