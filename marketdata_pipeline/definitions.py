"""The Dagster code location `marketdata`: assembles what `defs/` wires from the core."""

import os

import dagster as dg

from marketdata_pipeline import config
from marketdata_pipeline.defs.admin_jobs import admin_jobs
from marketdata_pipeline.defs.alerting import alert_sensors
from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.backfills import backfill_history, history_backfill_runs
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource
from marketdata_pipeline.defs.schedules import FRESHNESS_JOBS, REFRESH_JOBS, SCHEDULES
from marketdata_pipeline.defs.sensors import backfill_status_sensor, symbol_registry_sensor
from marketdata_pipeline.defs.splits import (
    split_revision_sensor,
    stock_splits,
    stock_splits_daily,
    stock_splits_refresh,
)
from marketdata_pipeline.registry import key_delivery


@dg.definitions
def defs() -> dg.Definitions:
    # A deployment's code server refuses to load, in one line, without the settings it needs,
    # rather than fail run by run (or start an empty embedded warehouse).
    config.check_deployment()
    key_delivery.configured_recipient()
    return dg.Definitions(
        assets=[*bars_assets, stock_splits],
        jobs=[
            *REFRESH_JOBS.values(),
            *FRESHNESS_JOBS.values(),
            stock_splits_refresh,
            *admin_jobs,
            backfill_history,
        ],
        schedules=[*SCHEDULES, stock_splits_daily],
        sensors=[
            symbol_registry_sensor,
            backfill_status_sensor,
            split_revision_sensor,
            history_backfill_runs,
            *alert_sensors,
        ],
        # Each bars run is one step; running it in the run's own process saves a second
        # process start (about 3 s) per run, which dominates a backfill's many short runs.
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
