"""`marketdata`: the operator's command line. Errors print one line and exit non-zero."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import click

from marketdata_pipeline import apikeys, backfill_state, config, db, embedded, migrations, registry
from marketdata_pipeline import bootstrap as bootstrap_mod
from marketdata_pipeline.errors import ConfigError, MarketdataError
from marketdata_pipeline.warehouse_status import status as warehouse_status

PROJECT_DIR = Path(__file__).resolve().parent.parent


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def cli(verbose: bool) -> None:
    """Operate the market-data warehouse and its Dagster code location."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.group("db")
def db_group() -> None:
    """Migrations and the state of the warehouse."""


@db_group.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations from sql/ (safe to run concurrently)."""
    with db.connection(embedded.warehouse_url()) as conn:
        applied = migrations.migrate(conn)
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("schema up to date: nothing to apply")


@db_group.command("status")
def db_status() -> None:
    """Applied migrations, engine (TimescaleDB or plain PostgreSQL) and row counts."""
    url = embedded.warehouse_url()
    with db.connection(url) as conn:
        report = warehouse_status(conn)
    engine = (
        f"TimescaleDB {report.timescaledb_version}"
        if report.timescaledb_version
        else "PostgreSQL (no TimescaleDB: plain tables and views)"
    )
    click.echo(f"warehouse: {db.describe(url)}")
    click.echo(f"engine:    {engine}")
    click.echo("migrations:")
    for m in report.applied:
        click.echo(f"  {m.version:03d}  {m.name:<40} {m.applied_at:%Y-%m-%d %H:%M:%S}Z")
    for name in report.pending:
        click.echo(f"  ---  {name:<40} pending")
    click.echo("rows:")
    for table, count in report.row_counts.items():
        click.echo(f"  {table:<20} {'(missing)' if count is None else f'{count:>12,}'}")


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (data is kept under MARKETDATA_HOME)."""
    if config.database_url():
        raise ConfigError("DATABASE_URL is set: there is no embedded server to stop")
    stopped = embedded.stop()
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL not running")


@cli.command("bootstrap")
def bootstrap() -> None:
    """Migrate, verify the schema, create the admin API key and seed the default symbols."""
    with db.connection(embedded.warehouse_url()) as conn:
        result = bootstrap_mod.bootstrap(conn)
    _print_bootstrap(result)


def _print_bootstrap(result: bootstrap_mod.BootstrapResult) -> None:
    if not result.changed:
        click.echo("already bootstrapped: schema up to date, admin key exists, symbols seeded")
        return
    for name in result.migrations_applied:
        click.echo(f"applied {name}")
    if result.symbols_added:
        click.echo(f"seeded {len(result.symbols_added)} symbols: {' '.join(result.symbols_added)}")
    if result.admin_key:
        click.echo(f"admin API key (shown once, store it now): {result.admin_key}")


# --fault KIND: (field of simulator.Faults, its type, value when no "=N" is given)
def _warehouse():
    return db.connection(embedded.warehouse_url())


def _table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}Z" if moment else "-"


@cli.group("symbols")
def symbols_group() -> None:
    """The symbol registry (tracked_symbols)."""


@symbols_group.command("add")
@click.argument("symbol")
@click.option(
    "--class", "asset_class", default="stock", show_default=True,
    type=click.Choice(["stock", "etf", "crypto"]),
)  # fmt: skip
def symbols_add(symbol: str, asset_class: str) -> None:
    """Register SYMBOL (a removed one is reactivated)."""
    with _warehouse() as conn:
        added = registry.add(conn, symbol, asset_class)
    click.echo(f"registered {added.symbol} ({added.asset_class})")


@symbols_group.command("list")
@click.option("--class", "asset_class", type=click.Choice(["stock", "etf", "crypto"]))
@click.option("--all", "include_inactive", is_flag=True, help="Include removed symbols.")
def symbols_list(asset_class: str | None, include_inactive: bool) -> None:
    """Active symbols (by class with --class)."""
    with _warehouse() as conn:
        rows = registry.list_symbols(
            conn, asset_class=asset_class, include_inactive=include_inactive
        )
    _table(
        ["SYMBOL", "CLASS", "ACTIVE", "BACKFILL", "LAST BACKFILL", "ERROR"],
        [
            [r.symbol, r.asset_class, "yes" if r.active else "no", r.backfill_status,
             _when(r.last_backfill), r.backfill_error or ""]
            for r in rows
        ],
    )  # fmt: skip


@symbols_group.command("show")
@click.argument("symbol")
def symbols_show(symbol: str) -> None:
    """One symbol and its backfill state per month."""
    with _warehouse() as conn:
        tracked = registry.get(conn, symbol)
        windows = backfill_state.windows(conn, tracked.symbol)
    click.echo(
        f"{tracked.symbol} ({tracked.asset_class}), {'active' if tracked.active else 'removed'}, "
        f"added {_when(tracked.date_added)}, backfill {tracked.backfill_status}"
        + (f": {tracked.backfill_error}" if tracked.backfill_error else "")
    )
    _table(
        ["ASSET", "MONTH", "STATUS", "LOADED", "REJECTED", "FINISHED", "RUN"],
        [
            [w.asset, f"{w.month:%Y-%m}", w.status, w.rows_loaded, w.rows_rejected,
             _when(w.finished_at), w.run_id[:8]]
            for w in windows
        ],
    )  # fmt: skip


@symbols_group.command("remove")
@click.argument("symbol")
def symbols_remove(symbol: str) -> None:
    """Remove SYMBOL: it goes inactive, its bars are kept."""
    with _warehouse() as conn:
        removed = registry.remove(conn, symbol)
    click.echo(f"removed {removed.symbol} (inactive; its bars are kept)")


@cli.group("keys")
def keys_group() -> None:
    """API keys: the raw key is shown once, only its SHA-256 is stored."""


@keys_group.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Create a key for NAME and print it once."""
    with _warehouse() as conn:
        key, raw = apikeys.create(conn, name)
    click.echo(f"created key {key.id} ({key.name}); shown once, store it now:")
    click.echo(raw)


@keys_group.command("list")
def keys_list() -> None:
    """Every key (never its hash)."""
    with _warehouse() as conn:
        keys = apikeys.list_keys(conn)
    _table(
        ["ID", "NAME", "ACTIVE", "CREATED", "LAST USED", "ENDPOINT", "REQUESTS"],
        [
            [k.id, k.name, "yes" if k.active else "revoked", _when(k.created_at),
             _when(k.last_used), k.last_used_endpoint or "", k.request_count]
            for k in keys
        ],
    )  # fmt: skip


def _key_action(action: str, verb: str):
    @keys_group.command(action, help=f"{verb.capitalize()} the key with id KEY_ID.")
    @click.argument("key_id", type=int)
    def command(key_id: int) -> None:
        with _warehouse() as conn:
            getattr(apikeys, action)(conn, key_id)
        click.echo(f"{verb} key {key_id}")

    return command


keys_revoke = _key_action("revoke", "revoked")
keys_restore = _key_action("restore", "restored")
keys_delete = _key_action("delete", "deleted")


@keys_group.command("audit")
@click.option("--key", "key_id", type=int, help="Only this key's uses.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0))
def keys_audit(key_id: int | None, limit: int, offset: int) -> None:
    """The audit log, newest first."""
    with _warehouse() as conn:
        entries = apikeys.audit(conn, key_id=key_id, limit=limit, offset=offset)
    _table(
        ["ID", "KEY", "METHOD", "ENDPOINT", "STATUS", "TIME"],
        [
            [e.id, e.key_id, e.method, e.endpoint, e.status_code, _when(e.timestamp)]
            for e in entries
        ],
    )


@cli.command("stats")
@click.argument("symbol")
def stats(symbol: str) -> None:
    """Bars per timeframe, first and last bar, validation rate and calendar gaps of SYMBOL."""
    with _warehouse() as conn:
        tracked, per_timeframe = registry.stats(conn, symbol)
    click.echo(f"{tracked.symbol} ({tracked.asset_class}), backfill {tracked.backfill_status}")
    _table(
        ["TIMEFRAME", "BARS", "FIRST", "LAST", "VALIDATION", "MISSING DAYS"],
        [
            [s.timeframe, f"{s.bars:,}", _when(s.first_bar), _when(s.last_bar),
             f"{s.validation_rate:.2%}",
             f"{len(s.missing_days)}" + (f" ({', '.join(map(str, s.missing_days[:5]))}"
                                         f"{', ...' if len(s.missing_days) > 5 else ''})"
                                         if s.missing_days else "")]
            for s in per_timeframe
        ],
    )  # fmt: skip


FAULT_KINDS: dict[str, tuple[str, type, float]] = {
    "rate-limit": ("rate_limited", int, -1),
    "server-error": ("server_errors", int, -1),
    "truncated": ("truncated", int, -1),
    "slow": ("delay_seconds", float, 1.0),
    "not-authorized": ("not_authorized", bool, 1),
    "bad-ohlc": ("bad_ohlc_every", int, 10),
    "repeat-timestamp": ("repeat_timestamp_every", int, 10),
}


def _parse_fault(spec: str) -> tuple[str | None, str, object]:
    """`KIND[=N][@TICKER]`, e.g. `rate-limit=3@AAPL`, `slow=2`, `not-authorized@X:BTCUSD`."""
    body, _, ticker = spec.partition("@")
    kind, _, raw = body.partition("=")
    if kind not in FAULT_KINDS:
        raise click.BadParameter(
            f"unknown fault {kind!r}: expected one of {', '.join(FAULT_KINDS)}",
            param_hint="--fault",
        )
    field, kind_type, default = FAULT_KINDS[kind]
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise click.BadParameter(f"{spec!r}: N must be a number", param_hint="--fault") from None
    return ticker or None, field, kind_type(value)


@cli.command("simulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND[=N][@TICKER]",
    help="Inject a fault (repeatable; a count without =N never runs out). "
    f"Kinds: {', '.join(FAULT_KINDS)}.",
)
@click.option(
    "--cache-pages",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Rendered pages kept to answer repeated requests without rebuilding them.",
)
def simulator(host: str, port: int, faults: tuple[str, ...], cache_pages: int) -> None:
    """Serve a Polygon-compatible aggregates API with synthetic bars (offline work, tests).

    A key is required only when SIMULATOR_API_KEY is set. Bars are synthetic: never load them
    into a warehouse that holds real data.
    """
    from marketdata_pipeline.simulator import Faults, Simulator, serve

    sim = Simulator(api_key=os.environ.get("SIMULATOR_API_KEY") or None, cache_pages=cache_pages)
    by_ticker: dict[str | None, dict[str, object]] = {}
    for spec in faults:
        ticker, field, value = _parse_fault(spec)
        by_ticker.setdefault(ticker, {})[field] = value
    for ticker, settings in by_ticker.items():
        sim.inject(Faults(**settings), ticker)  # type: ignore[arg-type]
    server = serve(sim, host, port)
    click.echo(f"Polygon simulator (synthetic data) on {server.url}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


DEMO_DATABASE = "marketdata_demo"


@cli.command("ui")
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster web UI.")
def ui(port: int) -> None:
    """Bootstrap the warehouse and run the Dagster UI and daemon on 127.0.0.1.

    Without POLYGON_API_KEY (and POLYGON_BASE_URL) this is the offline demo: bars come from
    the built-in simulator and go to their own embedded database, `marketdata_demo`.
    """
    import dagster as dg  # here, not at the top: the other commands start without Dagster

    from marketdata_pipeline.sensors import register_symbol_partitions

    env = dict(os.environ)
    simulated = not os.environ.get("POLYGON_API_KEY") and not os.environ.get("POLYGON_BASE_URL")
    if simulated and config.database_url():
        raise ConfigError(
            "POLYGON_API_KEY is not set: the offline demo writes synthetic bars only to its "
            "own embedded database; unset DATABASE_URL or set POLYGON_API_KEY"
        )
    started_embedded = not config.database_url() and not embedded.is_running()
    url = embedded.warehouse_url(DEMO_DATABASE if simulated else "marketdata")
    with db.connection(url) as conn:
        _print_bootstrap(bootstrap_mod.bootstrap(conn))

    dagster_url = env.get("DAGSTER_PG_URL")
    if not dagster_url:
        dagster_db = "dagster_demo" if simulated else "dagster"
        embedded.ensure_database(url, dagster_db)
        dagster_url = db.with_database(url, dagster_db)
    dagster_url = db.psycopg2_url(dagster_url)
    dagster_home = config.marketdata_home() / ("dagster_demo" if simulated else "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    env |= {"DATABASE_URL": url, "DAGSTER_PG_URL": dagster_url, "DAGSTER_HOME": str(dagster_home)}

    server = None
    if simulated:
        from marketdata_pipeline.simulator import Simulator, serve

        server = serve(Simulator(cache_pages=32))
        env |= {"POLYGON_BASE_URL": server.url, "MARKETDATA_SIMULATED": "1"}
        click.echo(
            f"OFFLINE DEMO: no POLYGON_API_KEY, so bars come from the Polygon simulator at "
            f"{server.url} (synthetic data) into the embedded database {DEMO_DATABASE}"
        )
    os.environ.update(env)  # the instance config below and `dagster dev` read the same env
    with dg.DagsterInstance.get() as instance, db.connection(url) as conn:
        added = register_symbol_partitions(instance, conn)
    if added:
        click.echo(f"registered symbol partitions: {added}")

    command = [
        sys.executable, "-m", "dagster", "dev",
        "-w", str(PROJECT_DIR / "workspace.yaml"),
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    click.echo(f"Dagster UI: http://127.0.0.1:{port}  (warehouse {db.describe(url)})")
    try:
        subprocess.run(command, cwd=dagster_home, check=False)
    except KeyboardInterrupt:
        pass
    finally:
        if server:
            server.shutdown()
        if started_embedded:
            embedded.stop()
            click.echo("embedded PostgreSQL stopped")


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="marketdata", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else error.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "marketdata"
        click.echo(f"marketdata: {error.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as error:
        click.echo(f"marketdata: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.Abort:
        click.echo("marketdata: aborted", err=True)
        sys.exit(130)
    except MarketdataError as error:
        click.echo(f"marketdata: error: {error}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
