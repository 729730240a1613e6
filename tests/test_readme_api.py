"""The read API's README snippets, run as written against a real `marketdata serve` with a
real key and loaded bars: only the server's address differs (a free port, not 8000)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from marketdata_pipeline.domain import AssetClass
from marketdata_pipeline.registry import api_keys, symbols
from marketdata_pipeline.warehouse.connection import connection
from tests.conftest import PROJECT_DIR
from tests.test_read_api import api_server

README_ORIGIN = "http://127.0.0.1:8000"


def _snippets(language: str) -> list[str]:
    """The fenced blocks of `language` in the README's section on the read API, before its
    costs (whose block runs the benchmark)."""
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme.split("## The read API", 1)[1].split("### What it costs", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_the_read_api_snippets_of_the_readme_run_as_written(
    migrated_url: str, tmp_path: Path
) -> None:
    with connection(migrated_url) as conn:
        symbols.add(conn, "AAPL", AssetClass.STOCK)
        symbols.add(conn, "BTC", AssetClass.CRYPTO)
        conn.execute(
            "INSERT INTO bars_minute SELECT 'AAPL', ts, 100, 101, 99, 100.5, 1000, 100.2, 10 "
            "FROM generate_series('2024-06-03 13:30+00'::timestamptz, "
            "'2024-06-07 19:59+00', '1 minute') ts "
            "WHERE (ts AT TIME ZONE 'UTC')::time BETWEEN '13:30' AND '19:59'"
        )
        conn.execute(
            "INSERT INTO bars_daily SELECT 'BTC', ts, 40000, 41000, 39000, 40500, 12.5, NULL, "
            "NULL FROM generate_series('2024-01-01'::timestamptz, '2024-03-31', '1 day') ts"
        )
        key = api_keys.create(conn, "readme")[1]
    [shell] = _snippets("bash")
    [python] = _snippets("python")
    env = {**os.environ, "MARKETDATA_KEY": key}
    with api_server(migrated_url, tmp_path / "serve.log") as server:
        curl = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", shell.replace(README_ORIGIN, server.url)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        checks = "\nassert bars.height == len(frame) == 5 * 390, (bars.height, len(frame))\n"
        py = subprocess.run(
            [sys.executable, "-c", python.replace(README_ORIGIN, server.url) + checks],
            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
        )  # fmt: skip
    assert curl.returncode == 0, curl.stderr
    csv, json_page = curl.stdout.split("\n{", 1)
    assert csv.splitlines()[0] == "ts,open,high,low,close,volume,vwap,trades"
    assert len(csv.splitlines()) == 1 + 5 * 390, "a header and the five sessions' minutes"
    assert (
        json_page.startswith('"symbol":"BTC","timeframe":"daily"') and json_page.count('"ts"') == 91
    )
    assert py.returncode == 0, py.stderr
    assert key not in server.log.read_text()
