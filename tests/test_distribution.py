"""The distribution: a built wheel carries its migrations and instance config and bootstraps a
fresh database from any directory; every third-party import is a declared dependency."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import PROJECT_DIR

PACKAGE_DIR = PROJECT_DIR / "marketdata_pipeline"


def imported_distributions() -> set[str]:
    """Distributions of the third-party modules the package imports directly."""
    modules: set[str] = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= {*sys.stdlib_module_names, "marketdata_pipeline"}
    owners = metadata.packages_distributions()
    return {_canonical(owners[module][0]) for module in modules}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_imported_package_is_a_declared_dependency() -> None:
    declared = {
        _canonical(Requirement(r).name)
        for r in metadata.requires("marketdata-pipeline") or []
        if "extra ==" not in r
    }
    assert imported_distributions() - declared == set()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(PROJECT_DIR)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("marketdata_pipeline-*.whl"))


def test_the_wheel_ships_the_migrations_and_the_instance_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sql_files = sorted(p.name for p in (PROJECT_DIR / "sql").glob("*.sql"))
    assert sql_files
    assert {f"marketdata_pipeline/sql/{name}" for name in sql_files} <= names
    assert {"marketdata_pipeline/dagster.yaml", "marketdata_pipeline/workspace.yaml"} <= names
    assert not [n for n in names if n.startswith(("tests/", "sql/", "scripts/"))]


@pytest.mark.slow
def test_an_installed_wheel_bootstraps_a_fresh_database_from_another_directory(
    wheel: Path, database_url: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies come from this environment (a path line, so its editable install of
    # the project is not loaded); the package itself comes only from the wheel.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"DATABASE_URL": database_url, "MARKETDATA_HOME": str(tmp_path / "home")}

    def marketdata(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [venv / "bin" / "marketdata", *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    where = subprocess.run(
        [python, "-c", "import marketdata_pipeline; print(marketdata_pipeline.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(site)

    first = marketdata("bootstrap")
    assert first.returncode == 0, first.stderr
    applied = [line for line in first.stdout.splitlines() if line.startswith("applied ")]
    assert len(applied) == len({p.name[:3] for p in (PROJECT_DIR / "sql").glob("*.sql")})
    assert "admin API key" in first.stdout
    status = marketdata("db", "status")
    assert status.returncode == 0, status.stderr
    assert "pending" not in status.stdout
    again = marketdata("bootstrap")
    assert again.returncode == 0 and again.stdout.startswith("already bootstrapped")
