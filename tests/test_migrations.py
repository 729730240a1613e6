"""Migrations on real PostgreSQL: fresh, repeated, concurrent, edited, failing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from marketdata_pipeline.errors import MigrationError
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import migrations
from marketdata_pipeline.warehouse.bootstrap import TABLES, VIEWS
from tests.conftest import LATEST, PROJECT_DIR


def relations(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    ).fetchall()
    return {r[0] for r in rows}


def test_fresh_database_gets_every_table_and_a_checksummed_ledger(database_url: str) -> None:
    with db.connection(database_url) as conn:
        applied = migrations.migrate(conn)
        assert applied == [
            "001_registry_and_keys.sql",
            "002_bars.sql",
            "003_bars_storage.postgres.sql",
            "004_rejected_timeframe_names.sql",
            "005_shared_rate_limit_and_unavailable.sql",
            "006_symbol_beyond_the_plan.sql",
            "007_splits.sql",
            "008_hourly_bars_by_range.postgres.sql",
            "009_api_key_deliveries.sql",
            "010_api_limits_across_processes.sql",
        ]
        assert set(TABLES) | set(VIEWS) <= relations(conn)
        ledger = conn.execute(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
        ).fetchall()
    sql_dir = PROJECT_DIR / "sql"
    assert ledger == [
        (int(name[:3]), name, hashlib.sha256((sql_dir / name).read_bytes()).hexdigest())
        for name in applied
    ]


def test_second_run_applies_nothing_and_changes_nothing(database_url: str) -> None:
    with db.connection(database_url) as conn:
        migrations.migrate(conn)
        before = conn.execute("SELECT * FROM schema_migrations ORDER BY version").fetchall()
        assert migrations.migrate(conn) == []
        after = conn.execute("SELECT * FROM schema_migrations ORDER BY version").fetchall()
    assert before == after


def test_concurrent_runners_serialize_one_applies_the_other_waits(database_url: str) -> None:
    env_cmd = [sys.executable, "-m", "marketdata_pipeline", "db", "migrate"]
    with db.connection(database_url, autocommit=True) as holder:
        # Hold the migration lock so both runners are provably waiting at the same time.
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        runners = [
            subprocess.Popen(
                env_cmd,
                cwd=PROJECT_DIR,
                env={**os.environ, "DATABASE_URL": database_url},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 30
        while _advisory_waiters(holder) < 2:
            assert time.monotonic() < deadline, "runners never reached the lock"
            assert all(r.poll() is None for r in runners), "a runner exited without waiting"
            time.sleep(0.1)
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        outputs = [r.communicate(timeout=60) for r in runners]

    assert [r.returncode for r in runners] == [0, 0], outputs
    stdouts = sorted(out for out, _ in outputs)
    assert stdouts[0].count("applied ") == LATEST
    assert "nothing to apply" in stdouts[1]
    with db.connection(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (LATEST,)


def _advisory_waiters(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return row[0] if row else 0


def test_edited_applied_migration_is_refused_by_name(database_url: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(PROJECT_DIR / "sql", sql_dir)
    with db.connection(database_url) as conn:
        migrations.migrate(conn, sql_dir)
        edited = sql_dir / "002_bars.sql"
        edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
        with pytest.raises(MigrationError, match=r"002_bars\.sql was edited after it was applied"):
            migrations.migrate(conn, sql_dir)


def test_failed_migration_leaves_the_last_good_version(database_url: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(PROJECT_DIR / "sql", sql_dir)
    (sql_dir / f"{LATEST + 1:03d}_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;\n"
    )
    with db.connection(database_url) as conn:
        with pytest.raises(
            MigrationError, match=rf"{LATEST + 1:03d}_broken\.sql failed: .*no_such_table"
        ):
            migrations.migrate(conn, sql_dir)
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (LATEST,)
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)


def test_file_name_that_breaks_the_convention_is_named(tmp_path: Path) -> None:
    (tmp_path / "4_oops.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"4_oops\.sql"):
        migrations.discover(tmp_path, timescaledb=False)


def test_engine_variant_pairs_are_required(tmp_path: Path) -> None:
    (tmp_path / "001_a.timescaledb.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"version 001 needs both"):
        migrations.discover(tmp_path, timescaledb=True)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_missing_or_empty_migrations_folder_is_refused(
    database_url: str, tmp_path: Path, folder: str
) -> None:
    sql_dir = tmp_path / "sql"
    if folder == "empty":
        sql_dir.mkdir()
    with db.connection(database_url) as conn:
        with pytest.raises(MigrationError, match=rf"migrations folder .*sql .*{folder}"):
            migrations.migrate(conn, sql_dir)
        assert relations(conn) == set(), "nothing is created, not even the ledger"


@pytest.mark.parametrize(
    "body",
    [
        "CREATE TABLE half_done (id int);\nCOMMIT;\nSELECT * FROM no_such_table;\n",
        "CREATE TABLE half_done (id int);\ncommit and chain;\n",
        "CREATE TABLE half_done (id int);\nEnd;\n",
        "BEGIN;\nCREATE TABLE half_done (id int);\n",
        "start transaction;\nCREATE TABLE half_done (id int);\n",
        "CREATE TABLE half_done (id int);\nRollback;\n",
        "SAVEPOINT s;\nCREATE TABLE half_done (id int);\nRELEASE SAVEPOINT s;\n",
        "CREATE TABLE half_done (id int);\nrelease s;\n",
        "CREATE TABLE half_done (id int);\nABORT;\n",
        "CREATE TABLE half_done (id int); -- a comment\n/* a /* nested */ one */ COMMIT;\n",
        "SELECT 'a ; literal'; SELECT E'it\\'s; still one'; COMMIT;\n",
    ],
)
def test_a_migration_that_controls_its_transaction_is_refused_before_anything_runs(
    database_url: str, tmp_path: Path, body: str
) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(PROJECT_DIR / "sql", sql_dir)
    with db.connection(database_url) as conn:
        migrations.migrate(conn, sql_dir)
        (sql_dir / f"{LATEST + 1:03d}_fine.sql").write_text("CREATE TABLE fine (id int);\n")
        (sql_dir / f"{LATEST + 2:03d}_commits.sql").write_text(body)
        with pytest.raises(MigrationError) as refused:
            migrations.migrate(conn, sql_dir)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(
            f"migration {LATEST + 2:03d}_commits.sql controls its own transaction ("
        )
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (LATEST,)
        created = conn.execute("SELECT to_regclass('half_done'), to_regclass('fine')").fetchone()
        assert created == (None, None), "not even the migration before it ran"


def test_transaction_words_inside_comments_literals_and_bodies_are_not_statements(
    database_url: str, tmp_path: Path
) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(PROJECT_DIR / "sql", sql_dir)
    (sql_dir / f"{LATEST + 1:03d}_words.sql").write_text(
        "-- COMMIT;\n"
        "/* ROLLBACK; /* nested */ END; */\n"
        'CREATE TABLE words (said text, "commit" int);\n'
        "INSERT INTO words VALUES ('COMMIT; BEGIN;', 1), (E'it\\'s; END', 2),\n"
        "  ($q$ROLLBACK;$q$, 3);\n"
        "CREATE FUNCTION words_count() RETURNS bigint AS $fn$\n"
        "BEGIN\n  RETURN (SELECT count(*) FROM words);\nEND\n$fn$ LANGUAGE plpgsql;\n"
        "CREATE FUNCTION words_first() RETURNS text LANGUAGE sql\n"
        "BEGIN ATOMIC\n  SELECT CASE WHEN true THEN min(said) END FROM words;\nEND;\n"
        "SELECT CASE WHEN count(*) > 0 THEN 1 END FROM words;\n"
    )
    with db.connection(database_url) as conn:
        assert migrations.migrate(conn, sql_dir)[-1] == f"{LATEST + 1:03d}_words.sql"
        assert conn.execute("SELECT words_count()").fetchone() == (3,)
