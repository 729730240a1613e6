"""`marketdata bootstrap`, the embedded default and the CLI error paths, as run by an operator."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg

from marketdata_pipeline.cli.ui import DEMO_DATABASE
from marketdata_pipeline.config import DEFAULT_SYMBOLS
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from marketdata_pipeline.warehouse.connection import with_database
from tests.conftest import PROJECT_DIR, run_cli

RAW_KEY = re.compile(r"mdw_[A-Za-z0-9_-]{43}")


def test_bootstrap_fresh_then_again_changes_nothing(database_url: str) -> None:
    env = {"DATABASE_URL": database_url}
    first = run_cli("bootstrap", env=env)
    assert first.returncode == 0, first.stderr
    keys = RAW_KEY.findall(first.stdout + first.stderr)
    assert len(keys) == 1, "the admin key is printed exactly once"
    assert "seeded 20 symbols" in first.stdout

    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT name, key_hash FROM api_keys").fetchall()
        rows = conn.execute("SELECT symbol, asset_class FROM tracked_symbols").fetchall()
        [(dump,)] = conn.execute("SELECT row_to_json(k)::text FROM api_keys k").fetchall()
    symbols: dict[str, str] = dict(rows)
    assert stored == [("admin", hashlib.sha256(keys[0].encode()).hexdigest())]
    assert keys[0] not in dump, "only the hash is stored"
    assert symbols == {s.symbol: s.asset_class for s in DEFAULT_SYMBOLS}
    assert symbols["SPY"] == "etf" and symbols["BTC"] == "crypto" and symbols["XYZ"] == "stock"

    second = run_cli("bootstrap", env=env)
    assert second.returncode == 0, second.stderr
    assert "already bootstrapped" in second.stdout
    assert not RAW_KEY.search(second.stdout + second.stderr)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT name, key_hash FROM api_keys").fetchall() == stored
        assert conn.execute("SELECT count(*) FROM tracked_symbols").fetchone() == (20,)


def test_script_calls_the_same_bootstrap(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bootstrap_db.py"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(RAW_KEY.findall(result.stdout)) == 1


def test_unreachable_database_is_one_line_naming_host_and_port_not_password() -> None:
    result = run_cli(
        "db", "status", env={"DATABASE_URL": "postgresql://ops:hunter2secret@127.0.0.1:9/wh"}
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:9" in lines[0]
    assert "hunter2secret" not in result.stderr


def test_malformed_database_url_is_one_line() -> None:
    result = run_cli("db", "migrate", env={"DATABASE_URL": "postgresql://x:pw@host:notaport/db"})
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pw@" not in result.stderr


def test_unknown_command_is_one_line_and_exit_2() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "marketdata: No such command 'frobnicate'. (see 'marketdata --help')"
    ]
    unknown_sub = run_cli("db", "explode")
    assert unknown_sub.returncode == 2
    assert len(unknown_sub.stderr.strip().splitlines()) == 1


def test_embedded_default_starts_reuses_and_stops(tmp_path: Path) -> None:
    env = {"MARKETDATA_HOME": str(tmp_path), "DATABASE_URL": ""}
    first = run_cli("bootstrap", env=env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "pgdata" / "postmaster.pid").exists(), "left running for reuse"
    status = run_cli("db", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert re.search(r"tracked_symbols\s+20", status.stdout)
    stop = run_cli("db", "stop", env=env)
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists()


def test_dagster_definitions_validate(database_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=PROJECT_DIR,
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "DAGSTER_PG_URL": database_url,
            "DAGSTER_HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unset_up_warehouse_is_one_line_not_a_traceback(database_url: str) -> None:
    for command in (["symbols", "list"], ["keys", "list"], ["stats", "AAPL"]):
        result = run_cli(*command, env={"DATABASE_URL": database_url})
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "not set up" in result.stderr and "marketdata bootstrap" in result.stderr


def test_commands_use_the_database_of_the_ui_running_on_their_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["MARKETDATA_HOME"] = str(home)

    def marketdata(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "marketdata_pipeline", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    admin = embedded.start(home)
    try:
        embedded.ensure_database(admin, DEMO_DATABASE)
        with db.connection(with_database(admin, DEMO_DATABASE)) as conn:
            bootstrap(conn)
        embedded.record_ui(DEMO_DATABASE, home)  # as `marketdata ui` does; this pid is alive
        listed = marketdata("symbols", "list")
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == 1 + len(DEFAULT_SYMBOLS)
        refused = marketdata("db", "stop")
        assert refused.returncode == 1 and "stop the UI first" in refused.stderr
        assert embedded.is_running(home)

        embedded.forget_ui(home)  # the UI is gone: commands use `marketdata`, not set up here
        other = marketdata("symbols", "list")
        assert other.returncode == 1 and "not set up" in other.stderr
        stopped = marketdata("db", "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
    finally:
        embedded.stop(home, by_ui=True)
