"""`marketdata ui`: bootstrap the warehouse, then run the Dagster UI and daemon.

Dagster is imported inside the command, so the other commands start without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from marketdata_pipeline import config
from marketdata_pipeline.cli.common import print_bootstrap
from marketdata_pipeline.cli.serve import listen
from marketdata_pipeline.cli.simulator import SPLIT, StagedSplit
from marketdata_pipeline.errors import ConfigError, MarketdataError
from marketdata_pipeline.polygon.simulator import Simulator, SimulatorHTTPServer, serve
from marketdata_pipeline.registry import key_delivery
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from marketdata_pipeline.warehouse.connection import (
    connection,
    describe,
    psycopg2_url,
    with_database,
)

DEMO_DATABASE = config.DEMO_DATABASE


@click.command("ui")
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster web UI.")
@click.option(
    "--api-port",
    default=config.DEFAULT_API_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the read API (`marketdata serve`) started beside the UI.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    type=SPLIT,
    help="Offline demo only: a stock split the simulator announces, e.g. AAPL:2026-11-18:4@5 "
    "(4:1, in 5 minutes), to watch a revision: materialize stock_splits afterwards.",
)
def ui_command(port: int, api_port: int, splits: tuple[StagedSplit, ...]) -> None:
    """Bootstrap the warehouse and run the Dagster UI and daemon on 127.0.0.1, and the read
    API beside them.

    Without POLYGON_API_KEY (and POLYGON_BASE_URL) this is the offline demo: bars come from
    the built-in simulator and go to their own embedded database, `marketdata_demo`.
    """
    config.check_deployment()
    simulated = not os.environ.get("POLYGON_API_KEY") and not os.environ.get("POLYGON_BASE_URL")
    if simulated and config.database_url():
        raise ConfigError(
            "POLYGON_API_KEY is not set: the offline demo writes synthetic bars only to its "
            "own embedded database; unset DATABASE_URL or set POLYGON_API_KEY"
        )
    if ui := embedded.running_ui():
        raise ConfigError(f"a Dagster UI (pid {ui.pid}) already runs on this MARKETDATA_HOME")
    if splits and not simulated:
        raise ConfigError("--split stages a split in the offline demo's simulator only")
    # Both ports before anything starts: the read API's socket is bound here and handed to
    # its process, which cannot then fail on it; the UI's is only tried (`dagster dev` binds
    # it itself), and a UI that still fails to start stops everything below.
    api_socket = listen("127.0.0.1", api_port, " (the read API, --api-port)")
    listen("127.0.0.1", port, " (the Dagster UI, --port)").close()
    # Resolved once, here: Dagster's processes start in the Dagster home, where a relative
    # MARKETDATA_HOME would name another folder.
    os.environ["MARKETDATA_HOME"] = str(config.marketdata_home())
    on_embedded = not config.database_url()  # read now: the UI's env sets DATABASE_URL below
    started_embedded = on_embedded and not embedded.is_running()
    database = DEMO_DATABASE if simulated else embedded.DEFAULT_DATABASE
    server: SimulatorHTTPServer | None = None
    children: list[subprocess.Popen[bytes]] = []
    # A service manager stops the UI with SIGTERM: shut down as on Ctrl-C. SIGINT is set
    # again too: polars installs its own handler, which restarts the waits below, so a SIGINT
    # sent to this process alone (not from a terminal, to the group) changed nothing.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        url = embedded.warehouse_url(database)
        with connection(url) as conn:
            print_bootstrap(bootstrap(conn, key_delivery.configured_recipient()))
        if on_embedded:
            embedded.record_ui(database)  # other commands on this home now use this database
        dagster_home = _dagster_instance(url, simulated)
        server = _start_demo_simulator(splits) if simulated else None
        _register_symbol_partitions(url)
        ui_url = f"http://127.0.0.1:{port}"
        os.environ.setdefault("MARKETDATA_UI_URL", ui_url)  # the alerts' links point here
        _seal_launchpad_keys_to_this_home()
        click.echo(f"Dagster UI: {ui_url}  (warehouse {describe(url)})")
        if on_embedded:
            click.echo(
                f"While it runs, `marketdata` commands with MARKETDATA_HOME="
                f"{config.marketdata_home()} use the {database} database; psql: {url}"
            )
        # Each child leads a process group of its own (in this session), so that whatever
        # it starts (the webserver, daemon and code servers of `dagster dev`) stops with it.
        children.append(
            subprocess.Popen(
                [
                    sys.executable, "-m", "dagster", "dev",
                    "-w", str(config.shipped_path("workspace.yaml")),
                    "-h", "127.0.0.1", "-p", str(port),
                ],
                cwd=dagster_home,
                process_group=0,
            )
        )  # fmt: skip
        children.append(
            subprocess.Popen(
                [
                    sys.executable, "-m", "marketdata_pipeline", "serve",
                    "--port", str(api_port), "--socket-fd", str(api_socket.fileno()),
                ],
                pass_fds=[api_socket.fileno()],
                process_group=0,
            )
        )  # fmt: skip
        api_socket.close()  # the API's process holds it now
        _supervise(children)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(children)
        api_socket.close()
        if server:
            server.shutdown()
        embedded.forget_ui()
        if started_embedded:
            embedded.stop(by_ui=True)
            click.echo("embedded PostgreSQL stopped")


_NAMES = ("the Dagster UI (dagster dev)", "the read API (marketdata serve)")


def _supervise(children: list[subprocess.Popen[bytes]]) -> None:
    """Wait until Ctrl-C (KeyboardInterrupt) or until a child ends: `dagster dev` ends when its
    webserver or daemon does (a port taken meanwhile, say), and a UI without one is no UI."""
    while True:
        for name, child in zip(_NAMES, children, strict=True):
            code = child.poll()
            if code is not None:
                raise MarketdataError(
                    f"{name} stopped (exit code {code}; its error is above): everything stopped"
                )
        time.sleep(0.5)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    """Stop the children and their process groups: SIGINT first (each shuts down cleanly on
    it, as on Ctrl-C, which no longer reaches them from the terminal), SIGKILL after 30 s;
    then anything of their groups still there (a code server left behind)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _seal_launchpad_keys_to_this_home() -> None:
    """Without MARKETDATA_KEY_RECIPIENT, keys the launchpad makes are sealed to this home's
    own identity (made on first start), which `marketdata keys reveal` reads by default."""
    if key_delivery.configured_recipient() is not None:
        return
    path = key_delivery.identity_path()
    identity = (
        key_delivery.load_identity(path) if path.exists() else key_delivery.create_identity(path)
    )
    os.environ[key_delivery.RECIPIENT_VARIABLE] = key_delivery.public_text(identity.recipient)


def _dagster_instance(url: str, simulated: bool) -> Path:
    """Set up the Dagster home (instance config, storage URL) in this process's environment,
    which the instance below and `dagster dev` both read; returns the home."""
    dagster_url = os.environ.get("DAGSTER_PG_URL")
    if not dagster_url:
        dagster_db = "dagster_demo" if simulated else "dagster"
        embedded.ensure_database(url, dagster_db)
        dagster_url = with_database(url, dagster_db)
    dagster_home = config.marketdata_home() / ("dagster_demo" if simulated else "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config.shipped_path("dagster.yaml"), dagster_home / "dagster.yaml")
    os.environ.update(
        {
            "DATABASE_URL": url,
            "DAGSTER_PG_URL": psycopg2_url(dagster_url),
            "DAGSTER_HOME": str(dagster_home),
        }
    )
    return dagster_home


def _start_demo_simulator(splits: tuple[StagedSplit, ...]) -> SimulatorHTTPServer:
    sim = Simulator(cache_pages=32)
    for split in splits:
        split.stage(sim)
        click.echo(
            f"the simulator announces a {split.ratio:g}:1 split of {split.symbol} on "
            f"{split.day} in {split.after_minutes:g} minute(s)"
        )
    server = serve(sim)
    os.environ.update({"POLYGON_BASE_URL": server.url, "MARKETDATA_SIMULATED": "1"})
    click.echo(
        f"OFFLINE DEMO: no POLYGON_API_KEY, so bars come from the Polygon simulator at "
        f"{server.url} (synthetic data) into the embedded database {DEMO_DATABASE}"
    )
    return server


def _register_symbol_partitions(url: str) -> None:
    """Partitions for the registry's symbols before the UI opens, so a backfill can be
    launched before the registry sensor's first tick."""
    import dagster as dg

    from marketdata_pipeline.defs.sensors import register_symbol_partitions

    with dg.DagsterInstance.get() as instance, connection(url) as conn:
        added = register_symbol_partitions(instance, conn)
    if added:
        click.echo(f"registered symbol partitions: {added}")
