"""The ingest benchmark, on a small workload: every loader stores exactly the same bars (the
script checks each count and exits non-zero otherwise) and the backfill runs through a real
`dagster dev` instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_DIR


def run_bench(
    script: str, admin_url: str, home: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run scripts/SCRIPT on the suite's server; its output and the figures it wrote."""
    output = home / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "DAGSTER_"))}
    env |= {"DATABASE_URL": admin_url, "MARKETDATA_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, f"scripts/{script}", *args, "--json", str(output)],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(output.read_text())


@pytest.mark.slow
def test_bench_runs_every_loader_and_a_dagster_backfill(pg_admin_url, tmp_path) -> None:
    done, figures = run_bench(
        "bench.py", pg_admin_url, tmp_path, "--symbols", "2", "--months", "3", "--sample", "2000"
    )
    methods = {r["method"]: r for r in figures["results"]}
    assert len(methods) == 12 and all(r["bars_per_second"] > 0 for r in methods.values())
    bars = figures["workload"]["bars"]
    assert methods["pipeline path: fetch, decode, validate, load"]["bars"] == bars > 60_000
    assert methods["one INSERT per row, commit each"]["bars"] == 2000
    # Fewer symbols than months: Dagster makes one ranged run per symbol.
    assert figures["dagster"]["runs"] == 2 and figures["dagster"]["partitions"] == 6
    assert 600_000 < methods["ranged run of SPY, 5 years, own process"]["bars"] < 800_000
    assert {t["name"] for t in figures["targets"]} >= {"pipeline / binary COPY"}
    assert "pipeline / binary COPY" in done.stdout and "MiB" in done.stdout


@pytest.mark.slow
def test_bench_api_measures_every_figure(pg_admin_url, tmp_path) -> None:
    """The read API benchmark on a small workload: each read returns exactly the bars stored
    (the script checks each count and exits non-zero otherwise) and every figure is printed."""
    args = ("--bars", "20000", "--clients", "4", "--requests", "5")
    done, figures = run_bench("bench_api.py", pg_admin_url, tmp_path, *args)
    assert figures["day_json_requests"] == figures["day_arrow_requests"] == 20
    assert all(figures[k] > 0 for k in ("copy_binary_s", "arrow_http_s", "json_http_s"))
    assert set(figures["refusals"]) == {
        "near miss (last character)", "unknown, well-formed", "malformed"
    }  # fmt: skip
    for line in ("Arrow vs the faster COPY TO", "Arrow vs JSON", "p50", "401 for a refused key"):
        assert line in done.stdout
