"""`marketdata simulator`: the Polygon-compatible server with synthetic bars."""

from __future__ import annotations

import os
import threading

import click

from marketdata_pipeline.polygon.simulator import Faults, Simulator, serve

# --fault KIND: (field of Faults, its type, value when no "=N" is given)
FAULT_KINDS: dict[str, tuple[str, type, float]] = {
    "rate-limit": ("rate_limited", int, -1),
    "server-error": ("server_errors", int, -1),
    "truncated": ("truncated", int, -1),
    "slow": ("delay_seconds", float, 1.0),
    "not-authorized": ("not_authorized", bool, 1),
    "bad-ohlc": ("bad_ohlc_every", int, 10),
    "repeat-timestamp": ("repeat_timestamp_every", int, 10),
}


def parse_fault(spec: str) -> tuple[str | None, str, object]:
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


@click.command("simulator")
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
def simulator_command(host: str, port: int, faults: tuple[str, ...], cache_pages: int) -> None:
    """Serve a Polygon-compatible aggregates API with synthetic bars (offline work, tests).

    A key is required only when SIMULATOR_API_KEY is set. Bars are synthetic: never load them
    into a warehouse that holds real data.
    """
    sim = Simulator(api_key=os.environ.get("SIMULATOR_API_KEY") or None, cache_pages=cache_pages)
    by_ticker: dict[str | None, dict[str, object]] = {}
    for spec in faults:
        ticker, field, value = parse_fault(spec)
        by_ticker.setdefault(ticker, {})[field] = value
    for ticker, settings in by_ticker.items():
        sim.inject(Faults(**settings), ticker)  # type: ignore[arg-type]
    server = serve(sim, host, port)
    click.echo(f"Polygon simulator (synthetic data) on {server.url}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
