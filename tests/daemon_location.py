"""A small code location for the tests that run a real Dagster daemon: the daily stock bars
of AAPL in January 2024, requested once by a sensor, and a sensor that always fails."""

import os

import dagster as dg

from marketdata_pipeline.defs.assets import bars_assets
from marketdata_pipeline.defs.resources import PolygonResource, WarehouseResource

DAILY = next(a for a in bars_assets if a.key.path[-1] == "stock_daily_bars")
KEY = "2024-01-01|AAPL"
bars_job = dg.define_asset_job("aapl_daily_bars", selection=[DAILY.key])


@dg.sensor(job=bars_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def launch_once() -> dg.RunRequest:
    return dg.RunRequest(run_key="once", partition_key=KEY)


@dg.sensor(minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def broken_sensor() -> dg.SkipReason:
    raise RuntimeError("broken on purpose")


defs = dg.Definitions(
    assets=[DAILY],
    jobs=[bars_job],
    sensors=[launch_once, broken_sensor],
    executor=dg.in_process_executor,
    resources={
        "warehouse": WarehouseResource(),
        "polygon": PolygonResource(
            base_url=os.environ.get("POLYGON_BASE_URL", "http://127.0.0.1:9"),
            retry_attempts=1,
            simulated=True,
        ),
    },
)
