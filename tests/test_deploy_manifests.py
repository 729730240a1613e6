"""The Kubernetes deployment files, checked offline: the read API's and the bootstrap Job's
manifests against Kubernetes' own schemas, the Helm values against dagster.yaml (the same pools,
limits and timeouts as the local instance), and, given Dagster's chart, the values against the
chart's values schema and the chart rendered with them against Kubernetes' schemas."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import referencing
import referencing.jsonschema
import yaml
from dagster._cli.api import grpc_command

from marketdata_pipeline.api.app import PUBLIC_PATHS
from marketdata_pipeline.cli import cli as marketdata_cli
from marketdata_pipeline.cli.serve import serve_command
from tests.conftest import PROJECT_DIR

KUBERNETES_DIR = PROJECT_DIR / "deploy" / "kubernetes"
HELM_VALUES = PROJECT_DIR / "deploy" / "helm" / "values.yaml"
SECRET = "marketdata-secrets"
CONFIG_MAP = "marketdata-config"
# The oldest Kubernetes still in general support and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
# Dagster's chart (`helm pull dagster/dagster --version 1.13.27 --untar`): not in the repo.
CHART_DIR = os.environ.get("DAGSTER_HELM_CHART")
needs_chart = pytest.mark.skipif(
    not CHART_DIR,
    reason="DAGSTER_HELM_CHART names no unpacked dagster/dagster chart (1.13.x); the chart is "
    "not vendored, its code is not ours to commit",
)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        for doc in load_all(path):
            yield f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc


def by_kind(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    return next(doc for doc in found if doc["metadata"]["name"] == name)


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())


def instance() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_DIR / "dagster.yaml").read_text())


def camel(config: dict[str, Any]) -> dict[str, Any]:
    """dagster.yaml's keys as the chart spells them: max_concurrent_runs -> maxConcurrentRuns."""
    return {re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): v for k, v in config.items()}


def user_deployment() -> dict[str, Any]:
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    return deployment


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_kubernetes(version: str) -> None:
    names = []
    for name, doc in manifests():
        kubernetes_validate.validate(doc, version, strict=True)
        names.append(name)
    assert {n.split(":")[1].split("/")[0] for n in names} >= {
        "Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap",
    }  # fmt: skip


def test_the_validator_refuses_a_broken_manifest() -> None:
    """strict=True really refuses what the API server would: a field it does not know, a
    count that is not a number."""
    deployment = by_kind("Deployment", "marketdata-read-api")
    misspelled = copy.deepcopy(deployment)
    only_container(misspelled)["readinessProbes"] = only_container(misspelled)["readinessProbe"]
    not_a_number = copy.deepcopy(deployment)
    not_a_number["spec"]["replicas"] = "three"
    for broken in (misspelled, not_a_number):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_the_read_api_runs_serve_with_options_serve_has() -> None:
    deployment = by_kind("Deployment", "marketdata-read-api")
    assert deployment["spec"]["replicas"] == 3
    container = only_container(deployment)
    assert container["command"] == ["marketdata", "serve"]
    # click refuses an option `serve` does not have (a typo, or --trusted-proxy before it lands)
    params = serve_command.make_context("serve", list(container["args"])).params
    assert (params["host"], params["port"]) == ("0.0.0.0", container["ports"][0]["containerPort"])
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        # the probes send no key: the path must be one the API answers without one
        assert http["path"] in PUBLIC_PATHS
        assert http["port"] == container["ports"][0]["name"]
    service = by_kind("Service", "marketdata-read-api")
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_the_bootstrap_job_runs_a_command_marketdata_has() -> None:
    container = only_container(by_kind("Job", "marketdata-bootstrap"))
    program, command = container["command"]
    assert program == "marketdata" and command == "bootstrap"
    assert isinstance(marketdata_cli, click.Group) and command in marketdata_cli.commands


def test_every_part_gets_the_secret_and_the_same_settings() -> None:
    """The read API and the bootstrap Job read the Secret and the ConfigMap; the code location
    (and so every run) reads the same Secret and the same settings from the Helm values."""
    for kind, name in (("Deployment", "marketdata-read-api"), ("Job", "marketdata-bootstrap")):
        sources = only_container(by_kind(kind, name))["envFrom"]
        assert {"secretRef": {"name": SECRET}} in sources
        assert {"configMapRef": {"name": CONFIG_MAP}} in sources
    deployment = user_deployment()
    assert {"name": SECRET} in deployment["envSecrets"]
    assert deployment["env"] == by_kind("ConfigMap", CONFIG_MAP)["data"]
    assert deployment["env"]["MARKETDATA_DEPLOYMENT"] == "1"
    assert {"name": SECRET} in values()["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]


def test_the_code_location_is_this_project_as_a_user_deployment() -> None:
    deployment = user_deployment()
    dagster = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["dagster"]
    assert deployment["name"] == dagster["code_location_name"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    # what the chart runs: `dagster api grpc -h 0.0.0.0 -p PORT` and these arguments
    args = ["-h", "0.0.0.0", "-p", str(deployment["port"]), *deployment["dagsterApiGrpcArgs"]]
    params = grpc_command.make_context("grpc", args).params
    assert params["module_name"] == dagster["module_name"]


def test_the_helm_values_keep_the_instance_of_dagster_yaml() -> None:
    """The pools, the run limit, the queue and run monitoring as dagster.yaml has them."""
    chart, local = values(), instance()
    daemon = chart["dagsterDaemon"]
    assert chart["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == local["run_coordinator"]["class"]
    assert coordinator["config"]["queuedRunCoordinator"] == camel(
        local["run_coordinator"]["config"]
    )
    assert chart["concurrency"]["enabled"]
    assert chart["concurrency"]["pools"] == camel(local["concurrency"]["pools"])
    assert chart["concurrency"]["runs"] == camel(local["concurrency"]["runs"])
    assert daemon["runMonitoring"] == camel(local["run_monitoring"])
    assert chart["telemetry"] == local["telemetry"]


def test_only_crashed_runs_are_retried() -> None:
    retries = values()["dagsterDaemon"]["runRetries"]
    assert retries["enabled"] and retries["retryOnAssetOrOpFailure"] is False
    assert 1 <= retries["maxRetries"] <= 2


def test_the_instance_and_the_logs_live_outside_the_cluster() -> None:
    chart = values()
    assert chart["postgresql"]["enabled"] is False
    assert chart["generatePostgresqlPasswordSecret"] is False
    assert chart["computeLogManager"]["type"] == "S3ComputeLogManager"
    s3 = chart["computeLogManager"]["config"]["s3ComputeLogManager"]
    assert s3["bucket"] and s3["prefix"] and "endpointUrl" in s3
    # runs upload their compute logs, the webserver reads them: both get the bucket's keys
    storage = {"name": "marketdata-object-storage"}
    assert storage in chart["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    assert storage in chart["dagsterWebserver"]["envSecrets"]


# Given the chart


def merged(defaults: Any, overrides: Any) -> Any:
    """Values as Helm merges them: maps key by key, anything else replaced, null removes."""
    if not (isinstance(defaults, dict) and isinstance(overrides, dict)):
        return overrides
    result = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(defaults.get(key), value)
    return result


def includes(whole: Any, part: Any) -> bool:
    """Whether `whole` says all that `part` says: maps key by key, anything else equal."""
    if isinstance(whole, dict) and isinstance(part, dict):
        return all(key in whole and includes(whole[key], value) for key, value in part.items())
    return bool(whole == part)


def local_kubernetes_definitions() -> Path:
    """Kubernetes' definitions as kubernetes-validate ships them (the chart's schema refers
    to them by a URL, which nothing offline can fetch)."""
    package = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return package / f"v{KUBERNETES_VERSIONS[0]}-local" / "_definitions.json"


REMOTE_DEFINITIONS = re.compile(r"https?://[^\"#]*_definitions\.json#/definitions/")


def offline_schema(text: str) -> str:
    """The chart's values schema with its Kubernetes references pointed at the local copy."""
    local = local_kubernetes_definitions().as_uri()
    return REMOTE_DEFINITIONS.sub(f"{local}#/$defs/", text)


def chart_path() -> Path:
    assert CHART_DIR
    path = Path(CHART_DIR)
    assert (path / "Chart.yaml").is_file(), f"DAGSTER_HELM_CHART={CHART_DIR} has no Chart.yaml"
    return path


@needs_chart
def test_the_values_meet_the_charts_values_schema() -> None:
    path = chart_path()
    chart = yaml.safe_load((path / "Chart.yaml").read_text())
    assert chart["name"] == "dagster" and str(chart["version"]).startswith("1.13.")
    schema = json.loads(offline_schema((path / "values.schema.json").read_text()))
    definitions = json.loads(local_kubernetes_definitions().read_text())
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        local_kubernetes_definitions().as_uri(),
        referencing.jsonschema.DRAFT7.create_resource(definitions),
    )
    full = merged(yaml.safe_load((path / "values.yaml").read_text()), values())
    validator = jsonschema.Draft7Validator(schema, registry=registry)
    assert not [e.message for e in validator.iter_errors(full)]
    broken = merged(full, {"runLauncher": {"type": "K8sLauncher"}})  # no such launcher
    assert not validator.is_valid(broken)


@needs_chart
def test_the_chart_renders_valid_kubernetes_with_the_values(tmp_path: Path) -> None:
    helm = pytest.importorskip("helm_python", reason="rendering needs helm-python-sdk")
    chart = tmp_path / "dagster"
    shutil.copytree(chart_path(), chart)
    for schema in chart.rglob("values.schema.json"):  # Helm checks the values against them
        schema.write_text(offline_schema(schema.read_text()))
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values(), name="dagster", namespace="marketdata")
    docs = [
        doc
        for template, text in rendered.items()
        if not template.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert ("Deployment", "dagster-dagster-user-deployments-marketdata") in kinds
    (config_map,) = [
        doc
        for doc in docs
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-instance")
    ]
    rendered_instance = yaml.safe_load(config_map["data"]["dagster.yaml"])
    local = instance()
    # what dagster.yaml says, the instance the chart builds says too (it may say more)
    for section in ("run_coordinator", "concurrency", "run_monitoring", "telemetry"):
        assert includes(rendered_instance[section], local[section]), section
    assert rendered_instance["run_launcher"]["class"] == "K8sRunLauncher"
    retries = rendered_instance["run_retries"]
    assert retries["enabled"] and retries["retry_on_asset_or_op_failure"] is False
    assert rendered_instance["compute_logs"]["class"] == "S3ComputeLogManager"
    launcher = rendered_instance["run_launcher"]["config"]
    assert SECRET in launcher["env_secrets"]
