"""The GraphQL half of scripts/docker_trial.sh: launch a backfill and the add_symbol job
through the webserver, wait for every run, check that each ran in a container of its own and
succeeded, and print the figures. Only the standard library: it runs on the host's Python.

Its settings come from the script's environment: UI_URL, DOCKER_SOCK, LABEL, SYMBOLS,
PARTITION_KEYS, NEW_SYMBOL, BUILD_SECONDS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

UI_URL = os.environ["UI_URL"]
DOCKER = ["/usr/bin/docker", "-H", f"unix://{os.environ['DOCKER_SOCK']}"]
SYMBOLS = os.environ["SYMBOLS"].split()
PARTITION_KEYS = os.environ["PARTITION_KEYS"].split()
NEW_SYMBOL = os.environ["NEW_SYMBOL"]
BACKFILL_ASSET = "stock_daily_bars"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
QUIET_SECONDS = 75  # no new run for this long (two registry sensor ticks): all runs are in
TIMEOUT_SECONDS = 1800
STARTED = time.monotonic()

LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
PARTITIONS = """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
  ... on AssetNode { partitionKeysByDimension { name partitionKeys } } } }"""
LAUNCH_BACKFILL = """mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
LAUNCH_RUN = """mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""
RUNS = """{ runsOrError { ... on Runs { results {
  runId jobName status creationTime startTime endTime tags { key value } } } } }"""
BACKFILL = """query ($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status timestamp endTimestamp } } }"""


def say(message: str) -> None:
    print(f"{datetime.now().astimezone():%H:%M:%S} {message}", flush=True)


def graphql(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{UI_URL}/graphql", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.load(response)
    if answer.get("errors"):
        raise SystemExit(f"GraphQL error: {answer['errors'][0].get('message')}")
    data: dict[str, Any] = answer["data"]
    return data


def wait_for(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := check():
                return result
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


RELOAD = """mutation { reloadRepositoryLocation(repositoryLocationName: "marketdata") {
  __typename } }"""
LOAD_TIMEOUT_SECONDS = 180


def location_loaded() -> bool:
    """The location loaded; while the code server is still starting the webserver holds a
    load error, so it is asked to reload until the timeout."""
    entries = graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
    [entry] = [e for e in entries if e["name"] == "marketdata"]
    loaded = entry["locationOrLoadError"]
    if loaded and loaded["__typename"] == "PythonError":
        if time.monotonic() - STARTED > LOAD_TIMEOUT_SECONDS:
            raise SystemExit(f"the code location failed to load: {loaded['message']}")
        graphql(RELOAD)
        return False
    return bool(loaded and loaded["__typename"] == "RepositoryLocation")


def symbol_partitions() -> list[str]:
    node = graphql(PARTITIONS, {"key": {"path": [BACKFILL_ASSET]}})["assetNodeOrError"]
    dimensions = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
    return list(dimensions.get("symbol", []))


def runs() -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = graphql(RUNS)["runsOrError"]["results"]
    for run in results:
        run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
    return results


def container(container_id: str) -> dict[str, Any]:
    out = subprocess.run(
        [*DOCKER, "inspect", container_id], check=True, capture_output=True, text=True
    ).stdout
    inspected: dict[str, Any] = json.loads(out)[0]
    return inspected


def docker_time(value: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as a POSIX timestamp."""
    head, _, fraction = value.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + float(f"0.{fraction or 0}")


def main() -> int:
    wait_for("the webserver and the code location", location_loaded)
    say("the webserver has loaded the code location from the code server")
    wait_for(
        f"the registry sensor to register {SYMBOLS}",
        lambda: set(SYMBOLS) <= set(symbol_partitions()),
        timeout=180,
    )
    say(f"the registry sensor registered the partitions {symbol_partitions()}")

    params = {"assetSelection": [{"path": [BACKFILL_ASSET]}], "partitionNames": PARTITION_KEYS}
    launched = graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        raise SystemExit(f"launchPartitionBackfill: {launched}")
    backfill_id = launched["backfillId"]
    say(f"backfill {backfill_id}: {BACKFILL_ASSET} over {' '.join(PARTITION_KEYS)}")

    selector = {
        "repositoryLocationName": "marketdata",
        "repositoryName": "__repository__",
        "jobName": "add_symbol",
    }
    config = {"ops": {"register_symbol": {"config": {"symbol": NEW_SYMBOL}}}}
    added = graphql(LAUNCH_RUN, {"params": {"selector": selector, "runConfigData": config}})
    if added["launchRun"]["__typename"] != "LaunchRunSuccess":
        raise SystemExit(f"launchRun add_symbol: {added['launchRun']}")
    say(f"add_symbol {NEW_SYMBOL}: run {added['launchRun']['run']['runId']}")

    # Every run: the backfill's, the admin job's, and those the registry sensor makes of
    # each new symbol (its history, its splits), until no run is left and none comes.
    deadline = time.monotonic() + TIMEOUT_SECONDS
    last_count, last_change = -1, time.monotonic()
    while True:
        current = runs()
        if len(current) != last_count:
            last_count, last_change = len(current), time.monotonic()
        pending = [r for r in current if r["status"] not in FINISHED]
        backfill = graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        quiet = time.monotonic() - last_change > QUIET_SECONDS
        if not pending and backfill["status"] != "REQUESTED" and quiet:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {len(pending)} run(s) not finished")
        time.sleep(2)

    rows, problems = [], []
    containers = set()
    for run in sorted(current, key=lambda r: r["creationTime"]):
        container_id = run["tags"].get("docker/container_id")
        if not container_id:
            problems.append(f"run {run['runId']} has no container")
            continue
        inspected = container(container_id)
        containers.add(container_id)
        labels = inspected["Config"]["Labels"]
        if labels.get("dagster/run_id") != run["runId"]:
            problems.append(f"container {container_id[:12]} is not run {run['runId']}'s")
        if run["status"] != "SUCCESS" or inspected["State"]["ExitCode"] != 0:
            problems.append(
                f"run {run['runId']} ({run['jobName']}): {run['status']}, its container "
                f"exited {inspected['State']['ExitCode']}"
            )
        created = docker_time(inspected["Created"])
        container_started = docker_time(inspected["State"]["StartedAt"])
        rows.append(
            {
                "run": run["runId"][:8],
                "job": run["jobName"],
                "partitions": _partitions(run["tags"]),
                "status": run["status"],
                "queued -> container created": created - run["creationTime"],
                "created -> started": container_started - created,
                "container started -> RUN_START": (run["startTime"] or 0) - container_started,
                "run created -> RUN_START": (run["startTime"] or 0) - run["creationTime"],
                "RUN_START -> end": (run["endTime"] or 0) - (run["startTime"] or 0),
                "backfill": run["tags"].get("dagster/backfill") == backfill_id,
            }
        )
    if len(containers) != len(current):
        problems.append(f"{len(current)} runs in {len(containers)} containers")

    print()
    print(f"image build: {os.environ.get('BUILD_SECONDS', '?')} s")
    print(
        f"{'run':<9} {'job':<22} {'partitions':<34} {'status':<7} {'queue+launch':>12} "
        f"{'create+start':>12} {'boot':>6} {'start-up':>8} {'wall':>6}"
    )
    for row in rows:
        print(
            f"{row['run']:<8}{'*' if row['backfill'] else ' '} {row['job']:<22.22} "
            f"{row['partitions']:<34.34} {row['status']:<7.7} "
            f"{row['queued -> container created']:>11.1f}s "
            f"{row['created -> started']:>11.1f}s "
            f"{row['container started -> RUN_START']:>5.1f}s "
            f"{row['run created -> RUN_START']:>7.1f}s {row['RUN_START -> end']:>5.1f}s"
        )
    print("* the backfill's runs. queue+launch: the run's creation -> its container's Created;")
    print("create+start: Created -> State.StartedAt (docker inspect); boot: -> RUN_START (the")
    print("run worker up, the code location loaded); start-up: the run's creation -> RUN_START;")
    print("wall: RUN_START -> the run's end.")
    backfill = graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
    mine = [r for r in current if r["tags"].get("dagster/backfill") == backfill_id]
    if mine:
        last_end = max(r["endTime"] or 0 for r in mine)
        print(
            f"backfill {backfill_id}: {backfill['status']}, {len(mine)} runs, "
            f"{last_end - backfill['timestamp']:.1f} s from its launch to its last run's end"
        )
    else:
        problems.append("the backfill made no run")
    startups = sorted(r["run created -> RUN_START"] for r in rows)
    in_containers = sorted(
        r["created -> started"] + r["container started -> RUN_START"] for r in rows
    )
    if startups:
        first = min(r["creationTime"] for r in current)
        last = max(r["endTime"] or 0 for r in current)
        print(
            f"{len(rows)} runs in {len(containers)} containers, {last - first:.0f} s from the "
            f"first run's creation to the last one's end; start-up (run created -> RUN_START) "
            f"min {startups[0]:.1f} s, median {startups[len(startups) // 2]:.1f} s, max "
            f"{startups[-1]:.1f} s; of it in the container (created -> RUN_START) median "
            f"{in_containers[len(in_containers) // 2]:.1f} s"
        )
    if NEW_SYMBOL not in symbol_partitions():
        problems.append(f"{NEW_SYMBOL} (add_symbol) has no partition")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("OK: every run ran in a container of its own and succeeded" if not problems else "")
    return 1 if problems else 0


def _partitions(tags: dict[str, str]) -> str:
    start, end = (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    )
    if start and end:
        return f"{start}..{end}" if start != end else start
    return tags.get("dagster/partition", "-")


if __name__ == "__main__":
    sys.exit(main())
