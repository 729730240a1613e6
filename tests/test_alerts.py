"""Alerts end to end: real runs on a test Dagster instance and real PostgreSQL, delivered to a
local webhook receiver (http.server) and a local SMTP server (aiosmtpd)."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from marketdata_pipeline import alerts, config
from marketdata_pipeline.alerts import Alert, AlertKind
from marketdata_pipeline.config import AlertSettings, SmtpSettings
from marketdata_pipeline.defs.admin_jobs import remove_symbol
from marketdata_pipeline.defs.alerting import check_alerts, failed_run_alerts, warehouse_alerts
from marketdata_pipeline.defs.assets import ALL_BARS_ASSETS, bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.splits import stock_splits
from marketdata_pipeline.errors import ConfigError
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse.bootstrap import bootstrap
from tests.conftest import free_port

WEBHOOK_TOKEN = "T0KEN-s3cr3t-webhook-9f8e7d"
SMTP_USER = "alerts"
SMTP_PASSWORD = "smtp-pa55word-zq8"
DB_PASSWORD = "db-pa55word-xk3"
SECRETS = (WEBHOOK_TOKEN, SMTP_PASSWORD, DB_PASSWORD)
UI_URL = "http://dagster.example:3000"
ALERT_VARIABLES = (
    "MARKETDATA_ALERT_WEBHOOK_URL",
    "MARKETDATA_ALERT_SMTP_HOST",
    "MARKETDATA_ALERT_SMTP_PORT",
    "MARKETDATA_ALERT_SMTP_USER",
    "MARKETDATA_ALERT_SMTP_PASSWORD",
    "MARKETDATA_ALERT_SMTP_STARTTLS",
    "MARKETDATA_ALERT_EMAIL_FROM",
    "MARKETDATA_ALERT_EMAIL_TO",
    "MARKETDATA_UI_URL",
    "MARKETDATA_NOW",
)
ASSETS = {a.key.path[-1]: a for a in bars_assets}
FRESHNESS = {spec.name: spec.freshness_check_key for spec in ALL_BARS_ASSETS}

TICKS: list[str] = []  # what every sensor evaluation of this module said
# Alerts the receivers got, per kind, over this module's tests; the last test prints them.
alerts_received: Counter[str] = Counter()
tests_counted: set[str] = set()
EXPECTED_PER_TEST = {
    "test_a_failed_run_of_any_job_alerts_once_with_a_link_to_the_run": {"failed_run": 3},
    "test_an_alert_due_while_no_channel_was_set_is_sent_once_a_channel_is": {"failed_run": 1},
    "test_a_failed_channel_gets_the_alert_next_tick_and_the_other_not_twice": {"failed_run": 1},
    "test_a_failed_error_check_alerts_once_with_a_link_to_the_asset": {
        "failed_check": 1,
        "stale_asset": 1,
    },
    "test_a_stale_asset_alerts_once_until_its_freshness_passes_again": {"stale_asset": 2},
    "test_an_unreachable_warehouse_alerts_once_and_once_when_back": {
        "warehouse_unreachable": 1,
        "warehouse_unreachable resolved": 1,
    },
}


class WebhookReceiver:
    """A Slack-like incoming webhook on 127.0.0.1: records each POST's JSON."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"path": self.path, "json": json.loads(body)})
                # A hostile answer quotes the path, token included: it must not leak further.
                answer = b"ok" if receiver.status == 200 else f"no {self.path}".encode()
                self.send_response(receiver.status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = (
            f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/{WEBHOOK_TOKEN}"
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        return [post["json"]["text"] for post in self.posts]


class Mailbox:
    """aiosmtpd handler: keeps each message it is given."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def labels(self) -> list[str]:
        return [str(message[alerts.KIND_HEADER]) for message in self.messages]


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    assert isinstance(auth_data, LoginPassword)
    ok = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # unhandled: aiosmtpd answers 535 itself


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    # Login over plain SMTP on loopback: the test has no certificate for STARTTLS.
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=authenticate,
        auth_require_tls=False,
    )
    controller.start()
    yield box, controller.port
    controller.stop()


@pytest.fixture(autouse=True)
def no_alert_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the runner's own alert settings must not leak in."""
    for name in ALERT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def configured(
    monkeypatch: pytest.MonkeyPatch, webhook: WebhookReceiver, mailbox: tuple[Mailbox, int]
) -> tuple[WebhookReceiver, Mailbox]:
    box, port = mailbox
    for name, value in {
        "MARKETDATA_ALERT_WEBHOOK_URL": webhook.url,
        "MARKETDATA_ALERT_SMTP_HOST": "127.0.0.1",
        "MARKETDATA_ALERT_SMTP_PORT": str(port),
        "MARKETDATA_ALERT_SMTP_USER": SMTP_USER,
        "MARKETDATA_ALERT_SMTP_PASSWORD": SMTP_PASSWORD,
        "MARKETDATA_ALERT_SMTP_STARTTLS": "0",
        "MARKETDATA_ALERT_EMAIL_FROM": "marketdata@example.com",
        "MARKETDATA_ALERT_EMAIL_TO": "oncall@example.com, data@example.com",
        "MARKETDATA_UI_URL": UI_URL + "/",
    }.items():
        monkeypatch.setenv(name, value)
    return webhook, box


@pytest.fixture
def warehouse_url(warehouse_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("MARKETDATA_HOME", str(tmp_path))
    return warehouse_url


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions("stock_symbols", ["AAPL"])
        yield test_instance


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def materialize(
    instance: dg.DagsterInstance, asset: str, key: str, polygon_url: str
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [ASSETS[asset]],
        instance=instance,
        partition_key=key,
        resources={
            "warehouse": WarehouseResource(),
            "polygon": PolygonResource(
                base_url=polygon_url, retry_attempts=1, retry_max_seconds=2, simulated=True
            ),
        },
        raise_on_error=False,
    )


def run_freshness(instance: dg.DagsterInstance, asset: str) -> bool:
    """Run the asset's freshness check alone, as its schedule does; True if it passed."""
    result = dg.materialize(
        [ASSETS[asset]],
        instance=instance,
        selection=dg.AssetSelection.checks(FRESHNESS[asset]),
        resources={"warehouse": WarehouseResource(), "polygon": PolygonResource()},
    )
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation.passed


def tick(
    sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None, **resources: Any
) -> tuple[str, str | None]:
    """One evaluation, as the daemon runs it: (what the tick says, the next cursor)."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    data = sensor.evaluate_tick(context)
    assert not data.run_requests
    TICKS.append(data.skip_message or "")
    return data.skip_message or "", data.cursor


def received(webhook: WebhookReceiver, mailbox: Mailbox) -> list[str]:
    """The alerts both channels got, as kind labels; each came by webhook and by email."""
    labels = mailbox.labels()
    titles = [text.splitlines()[0] for text in webhook.texts()]
    subjects = [str(m["Subject"]).removeprefix("[marketdata] ") for m in mailbox.messages]
    assert titles == subjects, "each alert went to both channels"
    assert all(post["path"].endswith(WEBHOOK_TOKEN) for post in webhook.posts)
    return labels


def count(request: pytest.FixtureRequest, labels: list[str]) -> None:
    alerts_received.update(labels)
    tests_counted.add(request.node.name)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked: {text!r}"


def all_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def fail_admin_run(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    admin = (
        dg.Definitions(jobs=[remove_symbol], resources={"warehouse": WarehouseResource()})
        .get_job_def("remove_symbol")
        .execute_in_process(
            instance=instance,
            run_config={"ops": {"deactivate_symbol": {"config": {"symbol": "NOPE"}}}},
            raise_on_error=False,
        )
    )
    assert not admin.success
    return admin


def test_a_failed_run_of_any_job_alerts_once_with_a_link_to_the_run(
    warehouse_url, instance, configured, caplog, request
) -> None:
    caplog.set_level(logging.DEBUG)
    webhook, mailbox = configured
    said, cursor = tick(failed_run_alerts, instance, None)  # starts after past failures
    assert said == "started: runs failing from now on are alerted"
    failed = materialize(instance, "stock_daily_bars", "2024-01-01|AAPL", closed_port_url())
    assert not failed.success
    admin = fail_admin_run(instance)
    splits = dg.materialize(
        [stock_splits],
        instance=instance,
        partition_key="AAPL",
        resources={
            "warehouse": WarehouseResource(),
            "polygon": PolygonResource(base_url=closed_port_url(), retry_attempts=1),
        },
        raise_on_error=False,
    )
    assert not splits.success

    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert (
        said == "3 run(s) failed since the last tick: sent 3 alerts (failed_run) to webhook, email"
    )
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == "no run failed since the last tick"

    labels = received(webhook, mailbox)
    assert labels == ["failed_run"] * 3
    bars, removal, split = webhook.texts()
    assert bars.splitlines()[0] == "Bars run failed: stock_daily_bars"
    assert "partition 2024-01-01|AAPL" in bars
    assert f"{UI_URL}/runs/{failed.run_id}" in bars.splitlines()
    assert removal.splitlines()[0] == "Run failed: remove_symbol"
    assert f"Run {admin.run_id} (remove_symbol) failed: " in removal and "NOPE" in removal
    assert removal.splitlines()[-1] == f"{UI_URL}/runs/{admin.run_id}"
    assert split.splitlines()[0] == "Run failed: __ephemeral_asset_job__"
    assert "partition AAPL) failed: stock_splits AAPL: " in split
    message = mailbox.messages[0]
    assert message["To"] == "oncall@example.com, data@example.com"
    body = message.get_body()
    assert body is not None
    content = body.get_content()
    assert (
        f"Run {failed.run_id} (__ephemeral_asset_job__, partition 2024-01-01|AAPL) failed: "
        in content
    )
    assert content.rstrip().endswith(f"{UI_URL}/runs/{failed.run_id}")
    assert_no_secret(*TICKS, *webhook.texts(), message.as_string(), *all_logs(caplog))
    count(request, labels)


def test_an_alert_due_while_no_channel_was_set_is_sent_once_a_channel_is(
    warehouse_url, instance, webhook, mailbox, monkeypatch, request
) -> None:
    box, _ = mailbox
    _, cursor = tick(failed_run_alerts, instance, None)
    admin = fail_admin_run(instance)
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == (
        "1 run(s) failed since the last tick: alerts not configured: "
        "1 alert (failed_run) held until a channel is set"
    )
    said, cursor = tick(failed_run_alerts, instance, cursor)  # still held, nothing new
    assert said.endswith("1 alert (failed_run) held until a channel is set")

    # The webhook is configured ten minutes later: the next tick sends the held alert, once.
    monkeypatch.setenv("MARKETDATA_ALERT_WEBHOOK_URL", webhook.url)
    later = datetime.now(UTC) + timedelta(minutes=10)
    monkeypatch.setenv("MARKETDATA_NOW", later.isoformat())
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == "0 run(s) failed since the last tick: sent 1 alert (failed_run) to webhook"
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == "no run failed since the last tick"
    [text] = webhook.texts()
    assert text.splitlines()[0] == "Run failed: remove_symbol"
    assert f"Run {admin.run_id} (remove_symbol) failed: " in text
    assert "held until a channel took it)" in text.splitlines()[-2]
    assert text.splitlines()[-1] == f"{config.DEFAULT_UI_URL}/runs/{admin.run_id}"
    assert box.messages == []
    count(request, ["failed_run"])


def test_a_failed_channel_gets_the_alert_next_tick_and_the_other_not_twice(
    warehouse_url, instance, configured, request
) -> None:
    webhook, mailbox = configured
    _, cursor = tick(failed_run_alerts, instance, None)
    admin = fail_admin_run(instance)
    webhook.status = 404  # not retried within the tick
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == (
        "1 run(s) failed since the last tick: sent 1 alert (failed_run) to email; "
        "webhook failed 1 of 1: HTTP 404 Not Found: no [hidden]; 1 held for the next tick"
    )
    webhook.status = 200
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == "0 run(s) failed since the last tick: sent 1 alert (failed_run) to webhook"
    said, cursor = tick(failed_run_alerts, instance, cursor)
    assert said == "no run failed since the last tick"
    assert len(webhook.posts) == 2, "the failed post and the one that took it"
    assert mailbox.labels() == ["failed_run"], "the email channel got it once"
    assert webhook.texts()[0] == webhook.texts()[1]
    assert f"Run {admin.run_id} (remove_symbol) failed: " in webhook.texts()[1]
    assert_no_secret(*TICKS)
    count(request, ["failed_run"])


def test_a_failed_error_check_alerts_once_with_a_link_to_the_asset(
    warehouse_url,
    instance,
    configured,
    sim: Simulator,
    server: SimulatorHTTPServer,
    caplog,
    request,
) -> None:
    caplog.set_level(logging.DEBUG)
    webhook, mailbox = configured
    said, cursor = tick(check_alerts, instance, None)
    assert said.startswith("started")
    sim.inject(Faults(bad_ohlc_every=5), "AAPL")  # a fifth of the bars rejected: ERROR
    run = materialize(instance, "stock_daily_bars", "2024-01-01|AAPL", server.url)
    assert run.success
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    rate, days = checks["rejection_rate"], checks["missing_sessions"]
    assert not rate.passed and rate.severity == dg.AssetCheckSeverity.ERROR
    assert not days.passed and days.severity == dg.AssetCheckSeverity.WARN  # WARN: no alert

    said, cursor = tick(check_alerts, instance, cursor)
    # The run evaluated freshness too: the registered symbols' bars are old (stale_asset).
    assert said.endswith("sent 2 alerts (failed_check, stale_asset) to webhook, email"), said
    said, cursor = tick(check_alerts, instance, cursor)
    assert said == "no run finished since the last tick"
    sim.clear_faults()
    assert materialize(instance, "stock_daily_bars", "2024-01-01|AAPL", server.url).success
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("no alert due"), said

    labels = received(webhook, mailbox)
    assert sorted(labels) == ["failed_check", "stale_asset"]
    [text] = [t for t in webhook.texts() if t.startswith("Check failed")]
    assert text.splitlines()[0] == "Check failed: stock_daily_bars rejection_rate (ERROR)"
    assert f"run {run.run_id}" in text and "worst_partition: 2024-01-01|AAPL" in text
    link = f"{UI_URL}/assets/stock_daily_bars?view=checks&checkDetail=rejection_rate"
    assert text.splitlines()[-1] == link
    [email] = [m for m in mailbox.messages if m["X-Marketdata-Alert"] == "failed_check"]
    body = email.get_body()
    assert body is not None and link in body.get_content()
    assert_no_secret(*TICKS, *webhook.texts(), *all_logs(caplog))
    count(request, labels)


def test_a_stale_asset_alerts_once_until_its_freshness_passes_again(
    warehouse_url, instance, configured, request
) -> None:
    webhook, mailbox = configured
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)  # seeds BTC, ETH and SOL: no bars yet, so stale
    _, cursor = tick(check_alerts, instance, None)

    assert not run_freshness(instance, "crypto_daily_bars")
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("sent 1 alert (stale_asset) to webhook, email"), said
    assert not run_freshness(instance, "crypto_daily_bars")
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("no alert due"), "still stale: no second alert"

    with db.connection(warehouse_url) as conn:  # no active crypto symbol: nothing is behind
        conn.execute("UPDATE tracked_symbols SET active = false WHERE asset_class = 'crypto'")
    assert run_freshness(instance, "crypto_daily_bars")
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("no alert due")
    with db.connection(warehouse_url) as conn:
        conn.execute("UPDATE tracked_symbols SET active = true WHERE asset_class = 'crypto'")
    assert not run_freshness(instance, "crypto_daily_bars")
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("sent 1 alert (stale_asset) to webhook, email"), "stale again"

    labels = received(webhook, mailbox)
    assert labels == ["stale_asset", "stale_asset"]
    text = webhook.texts()[0]
    assert text.splitlines()[0] == "Asset stale: crypto_daily_bars"
    assert "stale: BTC (no bars), ETH (no bars), SOL (no bars)" in text
    assert (
        text.splitlines()[-1]
        == f"{UI_URL}/assets/crypto_daily_bars?view=checks&checkDetail=freshness"
    )
    count(request, labels)


def test_a_long_list_is_cut_between_symbols_with_the_count_left_out(
    warehouse_url, instance, configured
) -> None:
    webhook, _ = configured
    with db.connection(warehouse_url) as conn:
        bootstrap(conn)  # 17 stock and ETF symbols, none with bars: all stale
    _, cursor = tick(check_alerts, instance, None)
    assert not run_freshness(instance, "stock_daily_bars")
    said, cursor = tick(check_alerts, instance, cursor)
    assert said.endswith("sent 1 alert (stale_asset) to webhook, email"), said
    [line] = [line for line in webhook.texts()[0].splitlines() if line.startswith("stale: ")]
    listed, more = line.removeprefix("stale: ").split(" ... and ")
    symbols = listed.split(", ")
    assert all(re.fullmatch(r"[A-Z]+ \(no bars\)", symbol) for symbol in symbols), line
    assert "stale_symbols: 17" in webhook.texts()[0].splitlines()
    assert more == f"{17 - len(symbols)} more" and len(symbols) < 17
    assert len(line) <= len("stale: ") + 200 + len(" ... and 17 more")


def test_shorten_cuts_at_an_item_or_a_word_and_counts_the_rest() -> None:
    assert alerts.shorten("short enough", 20) == "short enough"
    names = ", ".join(f"SYM{i}" for i in range(30))
    assert alerts.shorten(names, 20) == "SYM0, SYM1, SYM2 ... and 27 more"
    prose = "the run worker process exited unexpectedly with a signal " * 10
    cut = alerts.shorten(prose, 40)
    assert cut == "the run worker process exited ... and 85 more words"
    assert alerts.shorten("x" * 50, 10) == "xxxxxxxxxx... and 40 more characters"


def test_an_unreachable_warehouse_alerts_once_and_once_when_back(
    database_url, instance, configured, monkeypatch, caplog, request
) -> None:
    caplog.set_level(logging.DEBUG)
    webhook, mailbox = configured
    down = f"postgresql://marketdata:{DB_PASSWORD}@127.0.0.1:{free_port()}/marketdata"
    monkeypatch.setenv("DATABASE_URL", down)
    warehouse = WarehouseResource()
    said, cursor = tick(warehouse_alerts, instance, None, warehouse=warehouse)
    assert said == "Warehouse unreachable: sent 1 alert (warehouse_unreachable) to webhook, email"
    said, cursor = tick(warehouse_alerts, instance, cursor, warehouse=warehouse)
    assert said.startswith("warehouse still unreachable (alerted 20")
    assert "cannot connect to PostgreSQL at 127.0.0.1:" in said

    monkeypatch.setenv("DATABASE_URL", database_url)
    said, cursor = tick(warehouse_alerts, instance, cursor, warehouse=warehouse)
    assert said == (
        "Warehouse reachable again: sent 1 alert (warehouse_unreachable resolved) to webhook, email"
    )
    said, cursor = tick(warehouse_alerts, instance, cursor, warehouse=warehouse)
    assert said == "warehouse reachable"

    labels = received(webhook, mailbox)
    assert labels == ["warehouse_unreachable", "warehouse_unreachable resolved"]
    first = webhook.texts()[0]
    assert "cannot connect to PostgreSQL at 127.0.0.1:" in first
    assert first.splitlines()[-1] == f"{UI_URL}/overview/automation"
    assert_no_secret(
        *TICKS, *webhook.texts(), *(m.as_string() for m in mailbox.messages), *all_logs(caplog)
    )
    count(request, labels)


def test_nothing_configured_sends_nothing_and_the_ticks_say_so(
    warehouse_url, instance, webhook, mailbox, monkeypatch
) -> None:
    box, _ = mailbox
    _, cursor = tick(failed_run_alerts, instance, None)
    failed = materialize(instance, "stock_daily_bars", "2024-01-01|AAPL", closed_port_url())
    assert not failed.success
    said, _ = tick(failed_run_alerts, instance, cursor)
    assert said == (
        "1 run(s) failed since the last tick: alerts not configured: "
        "1 alert (failed_run) held until a channel is set"
    )
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{DB_PASSWORD}@127.0.0.1:{free_port()}/x")
    said, _ = tick(warehouse_alerts, instance, None, warehouse=WarehouseResource())
    assert said == (
        "Warehouse unreachable: alerts not configured: "
        "1 alert (warehouse_unreachable) held until a channel is set"
    )
    assert webhook.posts == [] and box.messages == []
    assert_no_secret(*TICKS)
    assert config.alert_settings() == AlertSettings(None, None, config.DEFAULT_UI_URL)


def test_a_failing_channel_is_one_line_that_names_it_and_hides_its_secret(
    webhook, mailbox, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    box, port = mailbox
    alert = Alert(AlertKind.FAILED_RUN, "Bars run failed: x", "it failed", f"{UI_URL}/runs/1")
    smtp = SmtpSettings("127.0.0.1", port, False, SMTP_USER, SMTP_PASSWORD, "a@b.c", ("d@e.f",))

    webhook.status = 404  # and the body quotes the token
    wrong_password = dataclasses.replace(smtp, password=SMTP_PASSWORD + "x")
    report = alerts.send([alert], AlertSettings(webhook.url, wrong_password, UI_URL))
    assert report.summary() == (
        "1 alert (failed_run) not sent; webhook failed 1 of 1: HTTP 404 Not Found: "
        "no [hidden]; email failed 1 of 1: SMTPAuthenticationError: "
        "(535, b'5.7.8 Authentication credentials invalid'); 1 held for the next tick"
    )
    nobody = alerts.send(
        [alert],
        AlertSettings(
            f"{closed_port_url()}/hooks/{WEBHOOK_TOKEN}",
            dataclasses.replace(smtp, port=free_port()),
            UI_URL,
        ),
    )
    [webhook_error, email_error] = nobody.failures()
    assert webhook_error.startswith("webhook: ConnectError: ")
    assert email_error.startswith("email: ConnectionRefusedError: ")

    webhook.status = 200
    half = alerts.send([alert, alert], AlertSettings(webhook.url, wrong_password, UI_URL))
    assert half.summary() == (
        "sent 2 alerts (failed_run) to webhook; email failed 2 of 2: SMTPAuthenticationError: "
        "(535, b'5.7.8 Authentication credentials invalid'); 2 held for the next tick"
    )
    assert box.messages == []
    httpx_logs = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert httpx_logs and all("[hidden]" in line for line in httpx_logs)
    assert_no_secret(
        report.summary(),
        nobody.summary(),
        half.summary(),
        repr(smtp),
        repr(AlertSettings(webhook.url, smtp, UI_URL)),
        *all_logs(caplog),
    )


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETDATA_ALERT_SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("MARKETDATA_ALERT_EMAIL_TO", "oncall@example.com")
    smtp = config.alert_settings().smtp
    assert smtp is not None and (smtp.port, smtp.starttls, smtp.user) == (25, False, None)
    monkeypatch.setenv("MARKETDATA_ALERT_SMTP_USER", "alerts@example.com")
    monkeypatch.setenv("MARKETDATA_ALERT_SMTP_PASSWORD", SMTP_PASSWORD)
    smtp = config.alert_settings().smtp
    assert smtp is not None and (smtp.port, smtp.starttls) == (587, True)
    assert smtp.sender == "alerts@example.com"

    bad = {
        "MARKETDATA_ALERT_SMTP_PORT": ("0", "MARKETDATA_ALERT_SMTP_PORT must be a port number"),
        "MARKETDATA_ALERT_SMTP_STARTTLS": ("maybe", "MARKETDATA_ALERT_SMTP_STARTTLS must be 1"),
        "MARKETDATA_ALERT_EMAIL_TO": ("oncall", "MARKETDATA_ALERT_EMAIL_TO: 'oncall' is not"),
        "MARKETDATA_UI_URL": ("dagster:3000", "MARKETDATA_UI_URL must be an http(s) URL"),
        "MARKETDATA_ALERT_WEBHOOK_URL": (
            f"hooks.slack.com/services/{WEBHOOK_TOKEN}",
            "MARKETDATA_ALERT_WEBHOOK_URL must be an http(s) URL",
        ),
    }
    for name, (value, message) in bad.items():
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ConfigError, match=re.escape(message)) as error:
                config.alert_settings()
            assert "\n" not in str(error.value)
            assert_no_secret(str(error.value))

    monkeypatch.delenv("MARKETDATA_ALERT_SMTP_HOST")
    with pytest.raises(
        ConfigError, match="MARKETDATA_ALERT_SMTP_USER is set but MARKETDATA_ALERT_SMTP_HOST is not"
    ):
        config.alert_settings()


def test_alerts_received_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    """The figures of the closing note: alerts received per kind by both channels."""
    if tests_counted != set(EXPECTED_PER_TEST):
        pytest.skip("counts only when every alerting test of this module ran")
    expected: Counter[str] = Counter()
    for per_kind in EXPECTED_PER_TEST.values():
        expected.update(per_kind)
    assert alerts_received == expected
    with capsys.disabled():
        print(
            "\nalerts received per kind (each by webhook and by email): "
            + ", ".join(f"{kind} {n}" for kind, n in sorted(alerts_received.items()))
        )
