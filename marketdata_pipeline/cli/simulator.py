"""`marketdata simulator`: the Polygon-compatible server with synthetic bars."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from datetime import date

import click

from marketdata_pipeline.domain import InvalidSymbol, normalize_symbol
from marketdata_pipeline.errors import ConfigError
from marketdata_pipeline.polygon.simulator import (
    ORDERS,
    PLANS,
    SPACINGS,
    Faults,
    Simulator,
    serve,
)

# --fault KIND: (field of Faults, its type, value when no "=VALUE" is given; None: required)
FAULT_KINDS: dict[str, tuple[str, type, object]] = {
    "rate-limit": ("rate_limited", int, -1),
    "server-error": ("server_errors", int, -1),
    "truncated": ("truncated", int, -1),
    "empty": ("empty_results", int, -1),
    "slow": ("delay_seconds", float, 1.0),
    "not-authorized": ("not_authorized", bool, True),
    "delayed": ("delayed", bool, True),
    "repeat-cursor": ("repeat_cursor", bool, True),
    "echo-key": ("echo_key", bool, True),
    "order": ("order", str, None),
    "bad-ohlc": ("bad_ohlc_every", int, 10),
    "repeat-timestamp": ("repeat_timestamp_every", int, 10),
    "late": ("late_every", int, 10),
    "wrong-types": ("wrong_types_every", int, 10),
    "boolean": ("boolean_every", int, 10),
    "spike": ("spike_every", int, 100),
    "spacing": ("spacing", str, "pretty"),
}
# The values a fault of type str takes.
_CHOICES = {"order": ORDERS, "spacing": SPACINGS}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class StagedSplit:
    """A split the simulator announces after a while, so a revision can be watched."""

    symbol: str
    day: date
    ratio: float
    after_minutes: float

    def stage(self, sim: Simulator) -> None:
        timer = threading.Timer(
            self.after_minutes * 60, sim.split, (self.symbol, self.day, self.ratio)
        )
        timer.daemon = True
        timer.start()


class SplitSpec(click.ParamType):
    """`SYMBOL:DATE:RATIO[@MINUTES]`, e.g. `AAPL:2026-11-18:4@5`: a 4:1 split of AAPL on
    2026-11-18, announced 5 minutes from now (at once without @)."""

    name = "SYMBOL:DATE:RATIO[@MINUTES]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> StagedSplit:
        body, _, after = str(value).partition("@")
        try:
            symbol, day, ratio = body.split(":")
            staged = StagedSplit(
                normalize_symbol(symbol), date.fromisoformat(day), float(ratio), float(after or 0)
            )
        except (ValueError, InvalidSymbol):
            self.fail(f"{value!r} is not SYMBOL:DATE:RATIO[@MINUTES] (e.g. AAPL:2026-11-18:4@5)")
        if not (staged.ratio > 0 and staged.after_minutes >= 0):
            self.fail(f"{value!r}: the ratio is positive and the minutes zero or more")
        return staged


SPLIT = SplitSpec()


def parse_fault(spec: str) -> tuple[str | None, str, object]:
    """`KIND[=VALUE][@TICKER]`, e.g. `rate-limit=3@AAPL`, `slow=2`, `order=desc`,
    `not-authorized@X:BTCUSD`."""
    body, _, ticker = spec.partition("@")
    kind, has_value, raw = body.partition("=")
    if kind not in FAULT_KINDS:
        raise click.BadParameter(
            f"unknown fault {kind!r}: expected one of {', '.join(FAULT_KINDS)}",
            param_hint="--fault",
        )
    field, kind_type, default = FAULT_KINDS[kind]
    if not has_value:
        if default is None:
            raise click.BadParameter(f"{spec!r}: {kind} needs a value", param_hint="--fault")
        return ticker or None, field, default
    return ticker or None, field, _value(spec, kind, kind_type, raw)


def _value(spec: str, kind: str, kind_type: type, raw: str) -> object:
    def bad(expected: str) -> click.BadParameter:
        return click.BadParameter(f"{spec!r}: {kind} takes {expected}", param_hint="--fault")

    if kind_type is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise bad("no value, true or false")
        return raw.lower() in _TRUE
    if kind_type is str:
        if raw not in _CHOICES[kind]:
            raise bad(f"one of {', '.join(_CHOICES[kind])}")
        return raw
    try:
        value = kind_type(raw)
    except ValueError:
        raise bad("a whole number" if kind_type is int else "a number") from None
    if value < 0 and not (kind_type is int and value == -1):
        raise bad("a positive value (or -1: every request)")
    return value


@click.command("simulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND[=VALUE][@TICKER]",
    help="Inject a fault (repeatable; a count without =N never runs out). "
    f"Kinds: {', '.join(FAULT_KINDS)}.",
)
@click.option(
    "--plan",
    type=click.Choice(PLANS),
    default=None,
    help="Play a plan's limits: free is 5 requests a minute per key and 2 years of history.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    type=SPLIT,
    help="A stock split to list and apply to history (repeatable), e.g. AAPL:2026-11-18:4@5: "
    "4:1 on that day, announced in 5 minutes.",
)
@click.option(
    "--cache-pages",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Rendered pages kept to answer repeated requests without rebuilding them.",
)
def simulator_command(
    host: str,
    port: int,
    faults: tuple[str, ...],
    plan: str | None,
    splits: tuple[StagedSplit, ...],
    cache_pages: int,
) -> None:
    """Serve a Polygon-compatible aggregates API with synthetic bars (offline work, tests).

    A key is required only when SIMULATOR_API_KEY is set. Bars are synthetic: never load them
    into a warehouse that holds real data.
    """
    sim = Simulator(
        api_key=os.environ.get("SIMULATOR_API_KEY") or None, cache_pages=cache_pages, plan=plan
    )
    by_ticker: dict[str | None, dict[str, object]] = {}
    for spec in faults:
        ticker, field, value = parse_fault(spec)
        by_ticker.setdefault(ticker, {})[field] = value
    for ticker, settings in by_ticker.items():
        sim.inject(Faults(**settings), ticker)  # type: ignore[arg-type]
    for split in splits:
        split.stage(sim)
    try:
        server = serve(sim, host, port)
    except OSError as error:  # a port in use, a host that does not resolve or is not ours
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None
    # Set before it says it listens, not left to KeyboardInterrupt: polars installs a SIGINT
    # handler of its own, under which Ctrl-C did nothing.
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    click.echo(f"Polygon simulator (synthetic data) on {server.url}")
    while not stopping.wait(0.2):
        pass
    server.shutdown()
    server.server_close()
