"""`marketdata serve`: the read API over the warehouse, for the API keys' holders."""

from __future__ import annotations

import ipaddress
import os
import socket

import click
import pyarrow as pa
import uvicorn

from marketdata_pipeline import config
from marketdata_pipeline.api.app import OPENAPI_PATH, create_app
from marketdata_pipeline.api.bars import STREAM_CAP_SECONDS, STREAM_FLOOR_BYTES_PER_MINUTE
from marketdata_pipeline.api.protocol import MAX_HEAD_BYTES, JsonErrorsH11
from marketdata_pipeline.errors import ConfigError
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.connection import connection, describe
from marketdata_pipeline.warehouse.migrations import pending


@click.command("serve")
@click.option("--host", default=config.DEFAULT_API_HOST, show_default=True)
@click.option(
    "--port", default=config.DEFAULT_API_PORT, show_default=True, type=click.IntRange(1, 65535)
)
@click.option(
    "--socket-fd",
    type=int,
    hidden=True,
    help="A socket already listening on --host:--port (`marketdata ui` binds it before it "
    "starts anything, so a port in use stops it at once).",
)
@click.option(
    "--rate-limit",
    help="Requests each API key may make, like 600/minute or 20 per second "
    f"[default: MARKETDATA_API_RATE_LIMIT, else {config.DEFAULT_API_RATE_LIMIT}].",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="A network of the proxies in front (repeatable): from them only, X-Forwarded-For "
    "names the client [default: MARKETDATA_API_TRUSTED_PROXIES, comma-separated, else none].",
)
@click.option(
    "--stream-floor",
    default=STREAM_FLOOR_BYTES_PER_MINUTE,
    show_default=True,
    type=click.IntRange(1),
    help="Bytes a minute a stream's client must read, or the stream is cut.",
)
@click.option(
    "--stream-cap",
    default=STREAM_CAP_SECONDS,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a stream may last, or it is cut.",
)
def serve_command(
    host: str,
    port: int,
    socket_fd: int | None,
    rate_limit: str | None,
    trusted_proxies: tuple[str, ...],
    stream_floor: int,
    stream_cap: float,
) -> None:
    """Serve the read-only HTTP API: bars, symbols, stats, health, usage (X-API-Key)."""
    limit = config.api_rate_limit(rate_limit)
    proxies = trusted_networks(trusted_proxies)
    # Streams encode their Arrow and Parquet chunks on whichever worker thread is free, and
    # mimalloc (pyarrow's default) keeps freed memory in each thread's own heap: under load
    # a year of Parquet raised the peak by 57 MiB. The system allocator gives it back (3.7).
    pa.set_memory_pool(pa.system_memory_pool())
    url = embedded.warehouse_url()
    with connection(url) as conn:  # a clear error now rather than a 503 on every request
        if waiting := pending(conn):
            raise click.ClickException(
                f"the warehouse has {len(waiting)} migration(s) pending: run `marketdata bootstrap`"
            )
    listening = socket.socket(fileno=socket_fd) if socket_fd is not None else listen(host, port)
    click.echo(
        f"read API: http://{host}:{port}/v1 (document {OPENAPI_PATH}; warehouse {describe(url)}; "
        f"{limit} per key)"
    )
    # Clients are whoever connects, unless they connect through a trusted proxy: an
    # X-Forwarded-For believed from anyone would let a client pick the address its refused
    # keys are counted against. uvicorn's ProxyHeadersMiddleware takes the right-most address
    # of the header that is not a trusted proxy's.
    app = create_app(url, limit, stream_floor=stream_floor, stream_cap=stream_cap)
    settings = uvicorn.Config(
        app,
        log_level="warning",
        proxy_headers=bool(proxies),
        forwarded_allow_ips=[str(network) for network in proxies] or None,
        timeout_graceful_shutdown=10,  # open streams do not hold a shutdown up
        http=JsonErrorsH11,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    uvicorn.Server(settings).run(sockets=[listening])


def trusted_networks(given: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of --trusted-proxy, else of MARKETDATA_API_TRUSTED_PROXIES; each one
    checked here, since uvicorn takes a malformed one for a host name and trusts nothing."""
    source = "--trusted-proxy"
    if not given:
        source = "MARKETDATA_API_TRUSTED_PROXIES"
        given = tuple(p for p in os.environ.get(source, "").split(",") if p.strip())
    networks = []
    for raw in given:
        try:
            networks.append(ipaddress.ip_network(raw.strip()))
        except ValueError as bad:
            raise ConfigError(
                f"{source} {raw.strip()[:60]!r} is not a network like 10.0.0.0/8 or an "
                f"address: {bad}"
            ) from None
    return networks


def listen(host: str, port: int, what: str = "") -> socket.socket:
    """A socket bound to host:port, or a one-line error naming them: bound here, not by the
    server, so a port in use stops a command before it announces or starts anything."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot listen on {host}:{port}{what}: {reason}") from None
    listening.listen(2048)
    return listening
