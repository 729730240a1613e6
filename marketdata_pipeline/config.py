"""Settings read from the environment, in one place, with the defaults of DESIGN.md."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import limits
from limits import RateLimitItem

from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.errors import ConfigError

# The provider renamed itself Massive; https://api.polygon.io still answers.
POLYGON_OFFICIAL_BASE_URL = "https://api.massive.com"
DEFAULT_HISTORY_START = date(2020, 1, 1)
_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_path(name: str) -> Path:
    """A file or folder kept at the project's top level and shipped in the wheel (`sql`,
    `dagster.yaml`): inside the package when installed, beside it in a source checkout."""
    installed = _PACKAGE_DIR / name
    return installed if installed.exists() else _PACKAGE_DIR.parent / name


def marketdata_home() -> Path:
    return Path(os.environ.get("MARKETDATA_HOME") or ".marketdata").resolve()


def dagster_home() -> str | None:
    """The Dagster instance's home (DAGSTER_HOME), as the daemon and the UI have it."""
    return os.environ.get("DAGSTER_HOME") or None


def database_url() -> str | None:
    """The configured warehouse URL, or None for the embedded default."""
    return os.environ.get("DATABASE_URL") or None


def deployed() -> bool:
    """MARKETDATA_DEPLOYMENT=1 (the container image sets it): parts run on machines of their
    own, so nothing may fall back to this machine (the embedded server, a UI on 127.0.0.1)."""
    return _flag("MARKETDATA_DEPLOYMENT", default=False)


def check_deployment() -> None:
    """In a deployment, refuse to start without what only the operator can name."""
    if not deployed():
        return
    if not _env("DATABASE_URL"):
        raise _unset_in_deployment(
            "DATABASE_URL", "a deployment has no embedded PostgreSQL: set it to the warehouse's URL"
        )
    alert_settings()


def _unset_in_deployment(name: str, why: str) -> ConfigError:
    return ConfigError(f"MARKETDATA_DEPLOYMENT is set but {name} is not: {why}")


def polygon_base_url() -> str:
    return (os.environ.get("POLYGON_BASE_URL") or POLYGON_OFFICIAL_BASE_URL).rstrip("/")


def max_requests_per_minute() -> int | None:
    raw = os.environ.get("POLYGON_MAX_REQUESTS_PER_MINUTE")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"POLYGON_MAX_REQUESTS_PER_MINUTE must be a positive integer, got {raw!r}"
        ) from None
    if value <= 0:
        raise ConfigError(f"POLYGON_MAX_REQUESTS_PER_MINUTE must be positive, got {value}")
    return value


def history_start() -> date:
    """First month of the partitions; always the first day of a month."""
    raw = os.environ.get("MARKETDATA_HISTORY_START")
    if not raw:
        return DEFAULT_HISTORY_START
    try:
        parsed = date.fromisoformat(raw if len(raw) > 7 else f"{raw}-01")
    except ValueError:
        raise ConfigError(
            f"MARKETDATA_HISTORY_START must be a date like 2020-01 or 2020-01-01, got {raw!r}"
        ) from None
    return parsed.replace(day=1)


@dataclass(frozen=True)
class SeedSymbol:
    symbol: str
    asset_class: AssetClass


DEFAULT_SYMBOLS: tuple[SeedSymbol, ...] = (
    *(
        SeedSymbol(s, AssetClass.STOCK)
        for s in (
            *("AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX"),
            *("AMD", "INTC", "PYPL", "XYZ", "ROKU", "MSTR", "SOFI"),  # Block: XYZ since 2025-01
        )
    ),
    *(SeedSymbol(s, AssetClass.ETF) for s in ("SPY", "QQQ")),
    *(SeedSymbol(s, AssetClass.CRYPTO) for s in ("BTC", "ETH", "SOL")),
)


# The offline demo's own database: the only one that takes synthetic bars unless told.
DEMO_DATABASE = "marketdata_demo"


def synthetic_allowed() -> bool:
    """MARKETDATA_ALLOW_SYNTHETIC=1: the operator's word that synthetic bars (the simulator's)
    may go into a database other than the demo's (tests and benchmarks say it)."""
    return _flag("MARKETDATA_ALLOW_SYNTHETIC", default=False)


def simulated() -> bool:
    """True when bars come from the offline simulator (set by `marketdata ui` without a key)."""
    return os.environ.get("MARKETDATA_SIMULATED", "") == "1"


# `marketdata serve`: where it listens, and what each API key may ask of it.
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8000
DEFAULT_API_RATE_LIMIT = "600/minute"


def api_rate_limit(raw: str | None = None) -> RateLimitItem:
    """A key's request limit: `raw`, else MARKETDATA_API_RATE_LIMIT, else 600 a minute."""
    raw = raw or os.environ.get("MARKETDATA_API_RATE_LIMIT") or DEFAULT_API_RATE_LIMIT
    try:
        limit = limits.parse(raw)
    except ValueError:
        limit = None
    if limit is None or limit.amount < 1:
        raise ConfigError(
            f"API rate limit must read like 600/minute or 10 per second, got {raw[:40]!r}"
        )
    return limit


# What `marketdata ui` serves by default; MARKETDATA_UI_URL when the UI is elsewhere.
DEFAULT_UI_URL = "http://127.0.0.1:3000"
_EMAIL_VARIABLES = (
    "MARKETDATA_ALERT_SMTP_PORT",
    "MARKETDATA_ALERT_SMTP_USER",
    "MARKETDATA_ALERT_SMTP_PASSWORD",
    "MARKETDATA_ALERT_SMTP_STARTTLS",
    "MARKETDATA_ALERT_EMAIL_FROM",
    "MARKETDATA_ALERT_EMAIL_TO",
)


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    starttls: bool
    user: str | None
    password: str | None = field(repr=False)  # a secret: never in a message or a repr
    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go: a channel left unset is off, and with none set nothing is sent."""

    webhook_url: str | None = field(repr=False)  # Slack webhook URLs are secrets
    smtp: SmtpSettings | None
    ui_url: str


def alert_settings() -> AlertSettings:
    webhook_url = _env("MARKETDATA_ALERT_WEBHOOK_URL")
    if webhook_url and not _is_http_url(webhook_url):
        raise ConfigError(
            "MARKETDATA_ALERT_WEBHOOK_URL must be an http(s) URL (its value is a secret: not shown)"
        )
    ui_url = _env("MARKETDATA_UI_URL")
    if ui_url is None:
        if deployed():  # 127.0.0.1 is the reader's own machine, not the UI's
            raise _unset_in_deployment("MARKETDATA_UI_URL", "set it to the UI's address")
        ui_url = DEFAULT_UI_URL
    if not _is_http_url(ui_url):
        raise ConfigError(f"MARKETDATA_UI_URL must be an http(s) URL, got {ui_url!r}")
    return AlertSettings(webhook_url=webhook_url, smtp=_smtp_settings(), ui_url=ui_url.rstrip("/"))


def _smtp_settings() -> SmtpSettings | None:
    host = _env("MARKETDATA_ALERT_SMTP_HOST")
    if not host:
        # Email settings without a server would silently send nothing.
        for name in _EMAIL_VARIABLES:
            if _env(name):
                raise ConfigError(f"{name} is set but MARKETDATA_ALERT_SMTP_HOST is not")
        return None
    user = _env("MARKETDATA_ALERT_SMTP_USER")
    password = _env("MARKETDATA_ALERT_SMTP_PASSWORD")
    if bool(user) != bool(password):
        raise ConfigError(
            "MARKETDATA_ALERT_SMTP_USER and MARKETDATA_ALERT_SMTP_PASSWORD go together: "
            "set both or neither"
        )
    # A login is sent over STARTTLS unless told otherwise (a trusted relay on port 25).
    starttls = _flag("MARKETDATA_ALERT_SMTP_STARTTLS", default=bool(user))
    port = _port("MARKETDATA_ALERT_SMTP_PORT", default=587 if starttls else 25)
    recipients = tuple(
        address.strip()
        for address in (_env("MARKETDATA_ALERT_EMAIL_TO") or "").split(",")
        if address.strip()
    )
    if not recipients:
        raise ConfigError(
            "MARKETDATA_ALERT_EMAIL_TO must list at least one address (comma-separated) "
            "when MARKETDATA_ALERT_SMTP_HOST is set"
        )
    sender = _env("MARKETDATA_ALERT_EMAIL_FROM") or (
        user if user and "@" in user else f"marketdata@{socket.gethostname()}"
    )
    for name, address in (
        *(("MARKETDATA_ALERT_EMAIL_TO", r) for r in recipients),
        ("MARKETDATA_ALERT_EMAIL_FROM", sender),
    ):
        if "@" not in address or any(c.isspace() for c in address):
            raise ConfigError(f"{name}: {address!r} is not an email address")
    return SmtpSettings(
        host=host,
        port=port,
        starttls=starttls,
        user=user,
        password=password,
        sender=sender,
        recipients=recipients,
    )


def _env(name: str) -> str | None:
    return (os.environ.get(name) or "").strip() or None


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _flag(name: str, *, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true or false), got {raw!r}")


def _port(name: str, *, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name} must be a port number from 1 to 65535, got {port}")
    return port
