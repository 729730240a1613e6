"""The Compose deployment (deploy/docker), offline: the instance config against Dagster's,
and the files agreeing with each other, so that a run container gets what a run needs.
scripts/docker_trial.sh runs it for real. (Not against the Compose spec's schema: it is in
no package we can install, and its code is not ours to commit.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from tests.conftest import PROJECT_DIR

DEPLOY = PROJECT_DIR / "deploy" / "docker"
# The parts that run the project's code: all but TimescaleDB.
APP_SERVICES = ("bootstrap", "code-server", "webserver", "daemon", "read-api")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    compose: dict[str, Any] = load(DEPLOY / "compose.yaml")
    return compose


@pytest.fixture(scope="module")
def instance(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch_module.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://u@db:5432/dagster")
    config, _ = dagster_instance_config(str(DEPLOY))  # refuses what Dagster's schema does
    return dict(config)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_part_runs_the_one_image_after_the_bootstrap(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    assert services["bootstrap"]["command"] == ["marketdata", "bootstrap"]
    for name in set(APP_SERVICES) - {"bootstrap"}:
        condition = services[name]["depends_on"]["bootstrap"]["condition"]
        assert condition == "service_completed_successfully", name
    # Runs are started from the image the code server names.
    assert services["code-server"]["environment"]["DAGSTER_CURRENT_IMAGE"] in images


def test_the_run_launcher_hands_each_run_what_it_needs(
    compose: dict[str, Any], instance: dict[str, Any]
) -> None:
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    config = launcher["config"]
    daemon = compose["services"]["daemon"]
    # DockerRunLauncher copies each variable from the daemon's environment and refuses to
    # launch a run when one is unset.
    assert set(config["env_vars"]) <= set(daemon["environment"])
    for needed in ("DATABASE_URL", "DAGSTER_PG_URL", "POLYGON_API_KEY", "MARKETDATA_UI_URL"):
        assert needed in config["env_vars"]
    assert config["network"] in {n["name"] for n in compose["networks"].values()}
    [volume] = config["container_kwargs"]["volumes"]
    name, path = volume.split(":")
    assert name in {v["name"] for v in compose["volumes"].values() if v and "name" in v}
    assert path == instance["compute_logs"]["config"]["base_dir"]
    for part in ("webserver", "daemon"):  # they start and stop run containers
        mounts = compose["services"][part]["volumes"]
        assert "/var/run/docker.sock:/var/run/docker.sock" in mounts
        assert f"dagster-storage:{path}" in mounts


def test_the_run_launcher_config_is_dagster_dockers(instance: dict[str, Any]) -> None:
    import dagster_docker
    from dagster._config import process_config

    result = process_config(
        dagster_docker.DockerRunLauncher.config_type(), instance["run_launcher"]["config"]
    )
    assert result.success, result.errors


def test_the_instance_keeps_the_repos_queue_pools_and_monitoring(
    instance: dict[str, Any],
) -> None:
    shipped, _ = dagster_instance_config(str(PROJECT_DIR))
    for key in ("storage", "run_coordinator", "concurrency", "run_monitoring"):
        assert instance[key] == shipped[key], key
    retries = instance["run_retries"]
    assert retries["enabled"] is True
    assert retries["retry_on_asset_or_op_failure"] is False  # crashed runs only


def test_the_instance_storage_url_names_psycopg2(compose: dict[str, Any]) -> None:
    """SQLAlchemy 2.1 takes a plain postgresql:// URL to psycopg 3, on which every daemon
    loop of dagster-postgres fails (`NOTIFY run_events, $1`)."""
    for name in APP_SERVICES:
        url = compose["services"][name]["environment"]["DAGSTER_PG_URL"]
        assert url.startswith("postgresql+psycopg2://"), name
        assert url.endswith("@timescaledb:5432/dagster")
    # `marketdata bootstrap` creates it: it is on the warehouse's server.
    assert compose["services"]["bootstrap"]["environment"]["DATABASE_URL"].endswith(
        "@timescaledb:5432/marketdata"
    )


def test_the_workspace_names_the_code_server(compose: dict[str, Any]) -> None:
    [entry] = load(DEPLOY / "workspace.yaml")["load_from"]
    server = entry["grpc_server"]
    assert server["location_name"] == "marketdata"
    command = compose["services"]["code-server"]["command"]
    assert server["host"] in compose["services"]
    assert f"--port={server['port']}" in command
    assert "--location-name=marketdata" in command
    assert "--module-name=marketdata_pipeline.definitions" in command
    assert any(arg.startswith("--fixed-server-id=") for arg in command)


def test_env_example_lists_every_variable_and_no_secret(compose: dict[str, Any]) -> None:
    used = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    lines = (DEPLOY / "env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert used == set(example)
    for secret in ("POSTGRES_PASSWORD", "POLYGON_API_KEY", "MARKETDATA_ALERT_WEBHOOK_URL"):
        assert example[secret] == ""
    ignored = (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert "deploy/docker/.env" in ignored
