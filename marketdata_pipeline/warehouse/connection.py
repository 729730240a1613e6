"""Connections to the warehouse: UTC sessions, and errors that never show a password."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from marketdata_pipeline.errors import ConfigError, DatabaseUnavailable

CONNECT_TIMEOUT_SECONDS = 5


def with_database(url: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def psycopg2_url(url: str) -> str:
    """The URL naming the psycopg2 driver, for Dagster's instance storage.

    SQLAlchemy 2.1 picks psycopg 3 for a plain postgresql:// URL, and the Dagster webserver
    then fails every storage query with "the connection is closed"; dagster-postgres is built
    on psycopg2.
    """
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgresql", "postgres") else url


def check_unambiguous(url: str) -> None:
    """Refuse a URL whose password holds an unencoded '@' or '/'.

    libpq ends the credentials at the first '@' and the host at the first '/', so in
    `postgresql://user:p@ss/w0rd@host/db` it connects to host "ss" and database
    "w0rd@host/db", and with `user:se/cret@host` to host "user", port "se": every message
    would then show part of the password. After the scheme a well-formed URL has at most one
    '@', before any '/'. The message echoes no part of the URL.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in ("postgresql", "postgres"):
        return  # a key=value conninfo string: libpq parses it without this ambiguity
    at = rest.find("@")
    slash = rest.find("/")
    if rest.count("@") > 1 or (at >= 0 and 0 <= slash < at):
        raise ConfigError(
            "DATABASE_URL is ambiguous (not shown): percent-encode '@', '/' and ':' in its "
            "user name and password, as %40, %2F and %3A"
        )


def describe(url: str) -> str:
    """Host and port of a URL, for messages: never the user's password.

    An ambiguous URL is refused first, so the host and port shown are the ones the user
    wrote, not fragments of a password.
    """
    check_unambiguous(url)
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError("DATABASE_URL is not a valid PostgreSQL connection URL") from None
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    where = f"{host}:{port}" if not str(host).startswith("/") else f"socket {host}"
    return f"{where}, database {params['dbname']}" if params.get("dbname") else where


def _reason(error: psycopg.OperationalError) -> str:
    """The last, most specific clause of libpq's message (it names no password)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unknown error"
    return first_line.rsplit("failed: ", 1)[-1]


def _set_utc(conn: psycopg.Connection) -> None:
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """One session in UTC, or DatabaseUnavailable naming host and port."""
    where = describe(url)
    try:
        # No server-side prepared statements: poolers (PgBouncer in transaction mode) and
        # PGlite's single shared session would see one connection's names from another.
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS, prepare_threshold=None)
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {where}: {_reason(error)}"
        ) from None
    _set_utc(conn)
    conn.autocommit = autocommit
    return conn


@contextmanager
def connection(url: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    """A session that commits when the block ends cleanly and rolls back when it raises."""
    conn = connect(url, autocommit=autocommit)
    try:
        yield conn
        if not conn.closed:
            conn.commit()
    finally:
        conn.close()
