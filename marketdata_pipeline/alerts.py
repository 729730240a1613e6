"""Alerts to the operator, through a Slack-compatible webhook and/or email (SMTP).

Each channel is optional; with none configured nothing is sent and nothing fails. An alert
is held (`Pending`) until every configured channel has taken it: while no channel is set, and
for a channel that failed, which gets it again on the next try (a channel that took it does
not). The caller keeps what is held where every process meets (a sensor's cursor, the Dagster
instance). A channel that fails is reported as one line naming it. The webhook URL (a Slack
webhook URL is a secret) and the SMTP password never appear in a report, a log line or an
exception.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email.message import EmailMessage
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from marketdata_pipeline import clock
from marketdata_pipeline.config import AlertSettings, SmtpSettings

TIMEOUT_SECONDS = 10.0
WEBHOOK_ATTEMPTS = 2
WEBHOOK_RETRY_PAUSE_SECONDS = 2.0
HIDDEN = "[hidden]"
KIND_HEADER = "X-Marketdata-Alert"
MAX_PENDING = 100  # held per holder (a sensor, the daemon check); beyond it the oldest go
LATE_AFTER = timedelta(minutes=2)  # an alert sent later than this says since when it was due


class AlertKind(StrEnum):
    FAILED_RUN = "failed_run"
    FAILED_CHECK = "failed_check"
    STALE_ASSET = "stale_asset"
    WAREHOUSE_UNREACHABLE = "warehouse_unreachable"
    FAILED_TICK = "failed_tick"
    DAEMON_DOWN = "daemon_down"


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    title: str
    text: str
    link: str | None = None
    resolved: bool = False  # the note that the condition is over ("reachable again")

    @property
    def label(self) -> str:
        return f"{self.kind} resolved" if self.resolved else str(self.kind)

    def body(self) -> str:
        return "\n".join(part for part in (self.text, self.link) if part)

    def message(self) -> str:
        return f"{self.title}\n{self.body()}"


def shorten(text: str, limit: int) -> str:
    """`text` within about `limit` characters, cut between items ("a, b, c": comma-separated)
    or else between words, saying how many were left out: "AAPL (no bars), MSFT (no bars)
    ... and 12 more", "the first words ... and 40 more words"."""
    if len(text) <= limit:
        return text
    items, separator, noun = text.split(", "), ", ", ""
    if len(items) < 3:
        items, separator, noun = text.split(), " ", " words"
    kept: list[str] = []
    for item in items:
        if len(separator.join([*kept, item])) > limit and kept:
            break
        kept.append(item)
    if len(kept) == 1 and len(kept[0]) > limit:  # one long word: cut it, never a word-less text
        return f"{kept[0][:limit]}... and {len(text) - limit} more characters"
    return f"{separator.join(kept)} ... and {len(items) - len(kept)} more{noun}"


def redact(text: str, secrets: Iterable[str]) -> str:
    # Longest first, so a secret containing another one is hidden whole.
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


class _HideSecrets(logging.Filter):
    """httpx logs each request's URL at INFO: a webhook URL must not reach a log that way."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message, self.secrets)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


_HTTPX_LOG_FILTER = _HideSecrets()
logging.getLogger("httpx").addFilter(_HTTPX_LOG_FILTER)


class DeliveryError(Exception):
    """The webhook answered with an error status."""


class Channel(Protocol):
    name: str
    secrets: tuple[str, ...]

    def deliver(self, alert: Alert) -> None: ...


class Webhook:
    """POST {"text": ...}: Slack incoming webhooks and their look-alikes (Mattermost,
    Rocket.Chat, Discord's /slack endpoint) take it."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self._url = url
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.secrets: tuple[str, ...] = (url, *((path,) if len(path) > 1 else ()))
        _HTTPX_LOG_FILTER.secrets.update(self.secrets)

    def deliver(self, alert: Alert) -> None:
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                response = httpx.post(
                    self._url, json={"text": alert.message()}, timeout=TIMEOUT_SECONDS
                )
            except httpx.TransportError:
                if attempt == WEBHOOK_ATTEMPTS:
                    raise
            else:
                if response.is_success:
                    return
                if attempt == WEBHOOK_ATTEMPTS or not _worth_retrying(response.status_code):
                    answer = " ".join(response.text.split())[:100]
                    raise DeliveryError(
                        f"HTTP {response.status_code} {response.reason_phrase}"
                        + (f": {answer}" if answer else "")
                    )
            time.sleep(WEBHOOK_RETRY_PAUSE_SECONDS)


def _worth_retrying(status: int) -> bool:
    return status == 429 or status >= 500


class Email:
    name = "email"

    def __init__(self, smtp: SmtpSettings) -> None:
        self._smtp = smtp
        self.secrets: tuple[str, ...] = (smtp.password,) if smtp.password else ()

    def deliver(self, alert: Alert) -> None:
        smtp = self._smtp
        message = EmailMessage()
        message["Subject"] = f"[marketdata] {alert.title}"
        message["From"] = smtp.sender
        message["To"] = ", ".join(smtp.recipients)
        message[KIND_HEADER] = alert.label
        message.set_content(alert.body() + "\n")
        with smtplib.SMTP(smtp.host, smtp.port, timeout=TIMEOUT_SECONDS) as server:
            if smtp.starttls:
                server.starttls(context=ssl.create_default_context())
            if smtp.user and smtp.password:
                server.login(smtp.user, smtp.password)
            server.send_message(message)


def channels(settings: AlertSettings) -> list[Channel]:
    found: list[Channel] = []
    if settings.webhook_url:
        found.append(Webhook(settings.webhook_url))
    if settings.smtp:
        found.append(Email(settings.smtp))
    return found


@dataclass(frozen=True)
class Pending:
    """An alert not yet taken by every configured channel: when it fell due, and the channels
    that took it already."""

    alert: Alert
    due_at: datetime
    took: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, object]:
        alert = self.alert
        return {
            "kind": str(alert.kind),
            "title": alert.title,
            "text": alert.text,
            "link": alert.link,
            "resolved": alert.resolved,
            "due_at": self.due_at.isoformat(),
            "took": sorted(self.took),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Pending:
        link, took = data.get("link"), data.get("took")
        return cls(
            Alert(
                AlertKind(str(data["kind"])),
                str(data["title"]),
                str(data["text"]),
                str(link) if link else None,
                bool(data.get("resolved")),
            ),
            datetime.fromisoformat(str(data["due_at"])),
            frozenset(str(name) for name in took) if isinstance(took, list) else frozenset(),
        )


def held(data: object) -> list[Pending]:
    """The pending alerts of a holder's saved state (a list of `Pending.to_json()`)."""
    return [Pending.from_json(item) for item in data] if isinstance(data, list) else []


def to_hold(pending: Sequence[Pending]) -> list[dict[str, object]]:
    return [item.to_json() for item in pending]


@dataclass
class Report:
    """What became of a batch of alerts; its summary is the text of a sensor's tick."""

    alerts: list[Alert]
    channels: list[str]
    sent: dict[str, int] = field(default_factory=dict)  # channel -> alerts it took
    errors: dict[str, list[str]] = field(default_factory=dict)  # channel -> one line each
    missed: dict[str, int] = field(default_factory=dict)  # channel -> alerts it did not take
    kept: int = 0  # alerts held for the next try
    dropped: int = 0  # the oldest held alerts given up beyond MAX_PENDING

    def failures(self) -> list[str]:
        return [f"{channel}: {line}" for channel, lines in self.errors.items() for line in lines]

    def summary(self) -> str:
        count = len(self.alerts)
        dropped = (
            f"; {self.dropped} older alert(s) dropped (more than {MAX_PENDING} held)"
            if self.dropped
            else ""
        )
        if not count:
            return "no alert due" + dropped
        labels = ", ".join(dict.fromkeys(alert.label for alert in self.alerts))
        alerts = f"{count} alert{'' if count == 1 else 's'} ({labels})"
        if not self.channels:
            return f"alerts not configured: {alerts} held until a channel is set" + dropped
        took_all = [c for c in self.channels if self.sent.get(c, 0) == count]
        said = [f"sent {alerts} to {', '.join(took_all)}"] if took_all else []
        for channel in self.channels:
            if 0 < self.sent.get(channel, 0) < count:
                said.append(f"sent {self.sent[channel]} of {count} to {channel}")
        if not said:
            said.append(f"{alerts} not sent")
        for channel in self.channels:
            if errors := self.errors.get(channel):
                said.append(f"{channel} failed {self.missed[channel]} of {count}: {errors[0]}")
        if self.kept:
            said.append(f"{self.kept} held for the next tick")
        return "; ".join(said) + dropped


def send(alerts: Sequence[Alert], settings: AlertSettings) -> Report:
    """Send alerts that fell due now; what no channel took is lost (see `deliver`)."""
    now = clock.now()
    return deliver([Pending(alert, now) for alert in alerts], settings)[0]


def deliver(pending: Sequence[Pending], settings: AlertSettings) -> tuple[Report, list[Pending]]:
    """Send each pending alert to every configured channel that has not taken it yet; returns
    the report and the alerts still pending (all of them while no channel is configured).
    Never raises for a channel: its failure is in the report, as one line with its secrets
    hidden, and it is not tried again in this call (its alerts wait for the next one)."""
    dropped = max(len(pending) - MAX_PENDING, 0)
    pending = list(pending)[dropped:]
    configured = channels(settings)
    names = [channel.name for channel in configured]
    report = Report([item.alert for item in pending], names, dropped=dropped)
    secrets = [secret for channel in configured for secret in channel.secrets]
    failed: set[str] = set()
    still: list[Pending] = []
    now = clock.now()
    for item in pending:
        alert = item.alert
        text = redact(alert.text, secrets)
        if now - item.due_at > LATE_AFTER:
            text += f"\n(due since {item.due_at:%Y-%m-%d %H:%M} UTC, held until a channel took it)"
        safe = Alert(alert.kind, redact(alert.title, secrets), text, alert.link, alert.resolved)
        took = set(item.took)
        for channel in configured:
            if channel.name in took:
                continue
            if channel.name in failed:
                report.missed[channel.name] += 1
                continue
            try:
                channel.deliver(safe)
            # Whatever a channel raises is reported, never raised: the other channels and the
            # sensor go on. Its text may quote a secret (an httpx error quotes the URL).
            except Exception as error:
                words = str(error) if isinstance(error, DeliveryError) else _describe(error)
                line = " ".join(redact(words, secrets).split())[:300]
                report.errors.setdefault(channel.name, []).append(line)
                report.missed[channel.name] = report.missed.get(channel.name, 0) + 1
                failed.add(channel.name)
            else:
                took.add(channel.name)
                report.sent[channel.name] = report.sent.get(channel.name, 0) + 1
        if not configured or not set(names) <= took:
            still.append(replace(item, took=frozenset(took)))
    report.kept = len(still)
    return report, still


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
