"""The Dagster daemon's heartbeats, checked from outside the daemon (`marketdata alerts
check-daemon`, from cron): a daemon that stopped cannot report that it stopped."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import dagster as dg

from marketdata_pipeline import alerts, clock, config
from marketdata_pipeline.alerts import Alert, AlertKind
from marketdata_pipeline.errors import ConfigError, first_line

DEFAULT_MAX_AGE_SECONDS = 300
# The check's own state (daemon down since, alerts held), in the Dagster instance's key-value
# store: any host's cron sees the same.
STATE_KEY = "marketdata/alerts/daemon_check"


@dataclass(frozen=True)
class DaemonCheck:
    stale: dict[str, str]  # daemon type -> why it counts as down
    report: alerts.Report

    def line(self) -> str:
        if self.stale:
            said = "Dagster daemon down: " + ", ".join(f"{d} ({w})" for d, w in self.stale.items())
        else:
            said = "Dagster daemon heartbeats are fresh"
        return f"{said}; alerts: {self.report.summary()}"


def _ago(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def stale_daemons(instance: dg.DagsterInstance, max_age_seconds: float) -> dict[str, str]:
    """The daemons the instance needs whose newest heartbeat is older than `max_age_seconds`,
    or missing, with why."""
    now = clock.now().timestamp()
    heartbeats = instance.get_daemon_heartbeats()
    stale = {}
    for daemon in instance.get_required_daemon_types():
        beat = heartbeats.get(daemon)
        if beat is None:
            stale[daemon] = "no heartbeat"
        elif now - beat.timestamp > max_age_seconds:
            stale[daemon] = f"last heartbeat {_ago(now - beat.timestamp)} ago"
    return stale


def check_daemon(instance: dg.DagsterInstance, max_age_seconds: float) -> DaemonCheck:
    """Alert once when the daemon stops heartbeating, once when it is back; send what earlier
    checks held (no channel then, or a channel that failed)."""
    stale = stale_daemons(instance, max_age_seconds)
    storage = instance.daemon_cursor_storage
    raw = storage.get_cursor_values({STATE_KEY}).get(STATE_KEY)
    state = json.loads(raw) if raw else {}
    down_since = state.get("down_since")
    settings = config.alert_settings()
    now = clock.now()
    link = f"{settings.ui_url}/health"
    due = []
    if stale and not down_since:
        listed = ", ".join(f"{daemon} ({why})" for daemon, why in stale.items())
        due.append(
            Alert(
                AlertKind.DAEMON_DOWN,
                title="Dagster daemon down",
                text=alerts.shorten(
                    f"No heartbeat for over {_ago(max_age_seconds)}: {listed}.", 2000
                )
                + "\nSchedules, sensors, queued runs and run monitoring wait until it is back.",
                link=link,
            )
        )
        state["down_since"] = now.isoformat(timespec="seconds")
    elif not stale and down_since:
        due.append(
            Alert(
                AlertKind.DAEMON_DOWN,
                title="Dagster daemon back",
                text=f"Every daemon heartbeats again (down since {down_since}).",
                link=link,
                resolved=True,
            )
        )
        state["down_since"] = None
    pending = [*alerts.held(state.get("pending")), *(alerts.Pending(a, now) for a in due)]
    report, still = alerts.deliver(pending, settings)
    state["pending"] = alerts.to_hold(still)
    storage.set_cursor_values({STATE_KEY: json.dumps(state)})
    return DaemonCheck(stale, report)


def check_daemon_of_this_home(max_age_seconds: float) -> DaemonCheck:
    """`check_daemon` on the instance of DAGSTER_HOME (the daemon's)."""
    if not config.dagster_home():
        raise ConfigError(
            "DAGSTER_HOME is not set: set it (and what its dagster.yaml reads, DAGSTER_PG_URL) "
            "as for the Dagster daemon"
        )
    try:
        instance = dg.DagsterInstance.get()
    except dg.DagsterError as error:  # its dagster.yaml names a setting that is not set
        # Dagster's text is a dump of the config schema; the unset variable is what matters.
        unset = re.search(r'environment variable "(\w+)" which is not set', str(error))
        cause = f"{unset[1]} is not set" if unset else first_line(str(error), type(error).__name__)
        raise ConfigError(
            f"the Dagster instance of DAGSTER_HOME cannot be opened: {cause}"
        ) from None
    with instance:
        return check_daemon(instance, max_age_seconds)
