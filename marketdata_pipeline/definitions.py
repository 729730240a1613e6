"""The Dagster code location: wiring only."""

import os

import dagster as dg

from marketdata_pipeline import config
from marketdata_pipeline.admin_jobs import admin_jobs
from marketdata_pipeline.assets import bars_assets
from marketdata_pipeline.checks import freshness_checks
from marketdata_pipeline.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.schedules import (
    crypto_bars_daily,
    crypto_bars_refresh,
    stock_bars_after_close,
    stock_bars_refresh,
)
from marketdata_pipeline.sensors import backfill_status_sensor, symbol_registry_sensor

defs = dg.Definitions(
    assets=bars_assets,
    asset_checks=freshness_checks,
    jobs=[stock_bars_refresh, crypto_bars_refresh, *admin_jobs],
    schedules=[stock_bars_after_close, crypto_bars_daily],
    sensors=[symbol_registry_sensor, backfill_status_sensor],
    # Each bars run is one step; running it in the run's own process saves a second process
    # start (about 3 s) per run, which dominates a backfill's many short runs.
    executor=dg.in_process_executor,
    resources={
        "warehouse": WarehouseResource(),
        "polygon": PolygonResource(
            # EnvVar keeps the key out of the UI's config view and the event log.
            api_key=dg.EnvVar("POLYGON_API_KEY") if os.environ.get("POLYGON_API_KEY") else None,
            base_url=config.polygon_base_url(),
            max_requests_per_minute=config.max_requests_per_minute(),
            simulated=config.simulated(),
        ),
    },
)
