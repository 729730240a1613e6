"""A deployment (MARKETDATA_DEPLOYMENT=1): nothing falls back to this machine, and raw keys
reach the operator sealed, through the warehouse, never through a log or a run's disk."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from marketdata_pipeline import config
from marketdata_pipeline.errors import ConfigError
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.connection import psycopg2_url, with_database
from tests.conftest import PROJECT_DIR, run_cli

RAW_KEY = re.compile(r"mdw_[A-Za-z0-9_-]{43}")


def deployed(home: Path, **env: str) -> dict[str, str]:
    return {"MARKETDATA_DEPLOYMENT": "1", "MARKETDATA_HOME": str(home), "DATABASE_URL": "", **env}


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_no_command_falls_back_to_an_embedded_server(tmp_path: Path) -> None:
    for command in (["bootstrap"], ["symbols", "list"], ["keys", "list"], ["serve"], ["ui"]):
        error = one_line(run_cli(*command, env=deployed(tmp_path)))
        assert "MARKETDATA_DEPLOYMENT is set but DATABASE_URL is not" in error, error
    assert not (tmp_path / "pgdata").exists(), "no embedded server was started"


def test_the_code_location_refuses_to_load_without_its_settings(
    database_url: str, tmp_path: Path
) -> None:
    def validate(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dagster", "definitions", "validate",
             "-m", "marketdata_pipeline.definitions"],
            cwd=PROJECT_DIR,
            env={**os.environ, **deployed(tmp_path), "DAGSTER_HOME": str(tmp_path), **env},
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip

    no_database = validate()
    assert no_database.returncode != 0
    assert "MARKETDATA_DEPLOYMENT is set but DATABASE_URL is not" in no_database.stdout
    no_ui = validate(DATABASE_URL=database_url, MARKETDATA_UI_URL="")
    assert no_ui.returncode != 0
    assert "MARKETDATA_DEPLOYMENT is set but MARKETDATA_UI_URL is not" in no_ui.stdout
    assert not (tmp_path / "pgdata").exists()
    ready = validate(DATABASE_URL=database_url, MARKETDATA_UI_URL="https://dagster.example.com")
    assert ready.returncode == 0, ready.stderr


def test_alert_links_name_the_configured_ui(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETDATA_DEPLOYMENT", "1")
    monkeypatch.delenv("MARKETDATA_UI_URL", raising=False)
    with pytest.raises(ConfigError, match="MARKETDATA_UI_URL is not"):
        config.alert_settings()
    monkeypatch.setenv("MARKETDATA_UI_URL", "https://dagster.example.com/")
    assert config.alert_settings().ui_url == "https://dagster.example.com"
    monkeypatch.delenv("MARKETDATA_DEPLOYMENT")
    monkeypatch.delenv("MARKETDATA_UI_URL")
    assert config.alert_settings().ui_url == config.DEFAULT_UI_URL  # one machine: `marketdata ui`


def test_bootstrap_in_a_deployment_seals_the_admin_key_and_reveal_shows_it_once(
    database_url: str, tmp_path: Path
) -> None:
    env = deployed(tmp_path, DATABASE_URL=database_url)
    refused = one_line(run_cli("bootstrap", env=env))
    assert "MARKETDATA_KEY_RECIPIENT is not" in refused, "a key is never printed to a pod's log"
    with db.connection(database_url) as conn:  # refused before it changed anything
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)

    identity = tmp_path / "operator" / "identity"
    made = run_cli("keys", "identity", str(identity), env=env)
    assert made.returncode == 0, made.stderr
    assert identity.stat().st_mode & 0o077 == 0, "the private key is the operator's alone"
    [recipient] = re.findall(r"^MARKETDATA_KEY_RECIPIENT=(mdpub_\S+)$", made.stdout, re.M)
    again = one_line(run_cli("keys", "identity", str(identity), env=env))
    assert "already exists" in again, "an identity is never overwritten"

    env["MARKETDATA_KEY_RECIPIENT"] = recipient
    dagster_db = f"{database_url.rsplit('/', 1)[1]}_dagster"
    env["DAGSTER_PG_URL"] = psycopg2_url(with_database(database_url, dagster_db))
    boot = run_cli("bootstrap", env=env)
    assert boot.returncode == 0, boot.stderr
    assert f"Dagster's instance database {dagster_db} is ready" in boot.stdout
    with db.connection(database_url, autocommit=True) as conn:
        exists = "SELECT count(*) FROM pg_database WHERE datname = %s"
        assert conn.execute(exists, (dagster_db,)).fetchone() == (1,)
        conn.execute(f'DROP DATABASE "{dagster_db}"')
    assert not RAW_KEY.search(boot.stdout + boot.stderr)
    assert "marketdata keys reveal 1" in boot.stdout
    listed = run_cli("keys", "list", env=env)
    assert re.search(r"^1\s+admin\s.*sealed: keys reveal$", listed.stdout, re.M), listed.stdout

    other = tmp_path / "someone-else"
    assert run_cli("keys", "identity", str(other), env=env).returncode == 0
    wrong = one_line(run_cli("keys", "reveal", "1", "--identity", str(other), env=env))
    assert "sealed to " + recipient in wrong and not RAW_KEY.search(wrong)
    missing = one_line(run_cli("keys", "reveal", "1", "--identity", str(tmp_path / "no"), env=env))
    assert "no key identity at" in missing

    shown = run_cli("keys", "reveal", "1", env={**env, "MARKETDATA_KEY_IDENTITY": str(identity)})
    assert shown.returncode == 0, shown.stderr
    [raw] = RAW_KEY.findall(shown.stdout)
    with db.connection(database_url) as conn:
        [(key_hash,)] = conn.execute("SELECT key_hash FROM api_keys WHERE id = 1")
        assert conn.execute("SELECT count(*) FROM api_key_deliveries").fetchone() == (0,)
    assert hashlib.sha256(raw.encode()).hexdigest() == key_hash, "the admin key itself"
    twice = one_line(run_cli("keys", "reveal", "1", "--identity", str(identity), env=env))
    assert "API key 1 has no sealed raw key: revealed already" in twice
