"""Alerts to the operator, through a Slack-compatible webhook and/or email (SMTP).

Each channel is optional; with none configured nothing is sent and nothing fails. A channel
that fails is reported as one line naming it. The webhook URL (a Slack webhook URL is a
secret) and the SMTP password never appear in a report, a log line or an exception.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from marketdata_pipeline.config import AlertSettings, SmtpSettings

TIMEOUT_SECONDS = 10.0
WEBHOOK_ATTEMPTS = 2
WEBHOOK_RETRY_PAUSE_SECONDS = 2.0
HIDDEN = "[hidden]"
KIND_HEADER = "X-Marketdata-Alert"


class AlertKind(StrEnum):
    FAILED_RUN = "failed_run"
    FAILED_CHECK = "failed_check"
    STALE_ASSET = "stale_asset"
    WAREHOUSE_UNREACHABLE = "warehouse_unreachable"


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


@dataclass
class Report:
    """What became of a batch of alerts; its summary is the text of a sensor's tick."""

    alerts: list[Alert]
    channels: list[str]
    sent: dict[str, int] = field(default_factory=dict)  # channel -> alerts it took
    errors: dict[str, list[str]] = field(default_factory=dict)  # channel -> one line each

    def failures(self) -> list[str]:
        return [f"{channel}: {line}" for channel, lines in self.errors.items() for line in lines]

    def summary(self) -> str:
        count = len(self.alerts)
        if not count:
            return "no alert due"
        labels = ", ".join(dict.fromkeys(alert.label for alert in self.alerts))
        alerts = f"{count} alert{'' if count == 1 else 's'} ({labels})"
        if not self.channels:
            return f"alerts not configured: nothing sent ({alerts} due)"
        took_all = [c for c in self.channels if self.sent.get(c, 0) == count]
        said = [f"sent {alerts} to {', '.join(took_all)}" if took_all else f"{alerts} not sent"]
        for channel in self.channels:
            if errors := self.errors.get(channel):
                said.append(f"{channel} failed {len(errors)} of {count}: {errors[0]}")
        return "; ".join(said)


def send(alerts: Sequence[Alert], settings: AlertSettings) -> Report:
    """Send each alert to every configured channel. Never raises for a channel: its failure
    is in the report, as one line with the channel's secrets hidden."""
    configured = channels(settings)
    report = Report(list(alerts), [channel.name for channel in configured])
    secrets = [secret for channel in configured for secret in channel.secrets]
    for alert in alerts:
        safe = Alert(
            alert.kind,
            redact(alert.title, secrets),
            redact(alert.text, secrets),
            alert.link,
            alert.resolved,
        )
        for channel in configured:
            try:
                channel.deliver(safe)
            # Whatever a channel raises is reported, never raised: the other channels and the
            # sensor go on. Its text may quote a secret (an httpx error quotes the URL).
            except Exception as error:
                words = str(error) if isinstance(error, DeliveryError) else _describe(error)
                line = " ".join(redact(words, secrets).split())[:300]
                report.errors.setdefault(channel.name, []).append(line)
            else:
                report.sent[channel.name] = report.sent.get(channel.name, 0) + 1
    return report


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
