"""The simulator says what it is on every response, and its bars stay out of real databases:
labelled synthetic, and refused anywhere but the demo's database unless the operator says so."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import dagster as dg
import httpx
import psycopg
import pytest
from psycopg import sql

from marketdata_pipeline import config
from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.domain import Market, Timeframe
from marketdata_pipeline.pipeline import SyntheticRefused, ingest
from marketdata_pipeline.polygon.client import SIMULATOR_HEADER, PolygonClient
from marketdata_pipeline.polygon.simulator import Faults, Simulator, SimulatorHTTPServer, serve
from marketdata_pipeline.warehouse import migrations
from marketdata_pipeline.warehouse.connection import connection, with_database

JANUARY = [date(2024, 1, 1)]


@pytest.fixture
def sim_server() -> Iterator[tuple[Simulator, SimulatorHTTPServer]]:
    sim = Simulator(api_key="pk_sim_key")
    running = serve(sim)
    yield sim, running
    running.shutdown()
    running.server_close()


def load_btc(url: str, base_url: str) -> None:
    with (
        PolygonClient("pk_sim_key", base_url) as client,
        connection(url, autocommit=True) as conn,
    ):
        outcomes = ingest(
            client,
            conn,
            market=Market.CRYPTO,
            timeframe=Timeframe.DAILY,
            symbol="BTC",
            months=JANUARY,
        )
        list(outcomes)


def counts(url: str) -> tuple[int, int]:
    with connection(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM bars_daily), (SELECT count(*) FROM bars_rejected)"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_every_response_of_the_simulator_names_it(sim_server) -> None:
    sim, server = sim_server
    sim.inject(Faults(rate_limited=1), "X:ETHUSD")
    auth = {"Authorization": "Bearer pk_sim_key"}
    answers = [
        httpx.get(
            f"{server.url}/v2/aggs/ticker/X:BTCUSD/range/1/day/2024-01-01/2024-01-31", headers=auth
        ),
        httpx.get(
            f"{server.url}/v2/aggs/ticker/X:ETHUSD/range/1/day/2024-01-01/2024-01-31", headers=auth
        ),
        httpx.get(f"{server.url}/v2/aggs/ticker/X:BTCUSD/range/1/day/2024-01-01/2024-01-31"),
        httpx.get(f"{server.url}/no/such/path", headers=auth),
    ]
    assert [a.status_code for a in answers] == [200, 429, 401, 404]
    assert all(a.headers.get(SIMULATOR_HEADER) == "1" for a in answers)


def test_synthetic_bars_are_refused_in_one_line_outside_the_demo_database(
    migrated_url: str, sim_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POLYGON_BASE_URL pointed at a simulator by hand, nothing else said: nothing loads."""
    monkeypatch.delenv("MARKETDATA_ALLOW_SYNTHETIC")
    _, server = sim_server
    with pytest.raises(SyntheticRefused) as refused:
        load_btc(migrated_url, server.url)
    message = str(refused.value)
    database = psycopg.conninfo.conninfo_to_dict(migrated_url)["dbname"]
    assert "\n" not in message and "pk_sim_key" not in message
    assert f"the demo database marketdata_demo, not {database}" in message
    assert "set MARKETDATA_ALLOW_SYNTHETIC=1" in message
    assert counts(migrated_url) == (0, 0)


def test_the_demo_database_takes_synthetic_bars_unasked(
    pg_admin_url: str, sim_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MARKETDATA_ALLOW_SYNTHETIC")
    _, server = sim_server
    demo = sql.Identifier(config.DEMO_DATABASE)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(demo))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(demo))
    url = with_database(pg_admin_url, config.DEMO_DATABASE)
    try:
        with connection(url) as conn:
            migrations.migrate(conn)
        load_btc(url, server.url)
        assert counts(url) == (31, 0)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(demo))


def test_with_the_opt_in_synthetic_bars_load_and_say_so(
    warehouse_url: str, sim_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configured as Polygon (simulated not set), the run still labels the bars synthetic."""
    monkeypatch.setenv("MARKETDATA_ALLOW_SYNTHETIC", "1")
    _, server = sim_server
    asset = next(a for a in bars_assets if a.key.path[-1] == "crypto_daily_bars")
    polygon = PolygonResource(api_key="pk_sim_key", base_url=server.url)
    assert "synthetic" not in polygon.source_label()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("crypto_symbols", ["BTC"])
        result = dg.materialize(
            [asset],
            instance=instance,
            partition_key="2024-01-01|BTC",
            resources={"warehouse": WarehouseResource(), "polygon": polygon},
        )
    assert result.success
    [materialization] = result.asset_materializations_for_node(asset.node_def.name)
    source = materialization.metadata["source"].value
    assert isinstance(source, str) and "synthetic" in source and server.url in source
    assert counts(warehouse_url) == (31, 0)
