"""The Dagster code location: wiring only."""

import os

import dagster as dg

from marketdata_pipeline import config
from marketdata_pipeline.resources import PolygonResource, WarehouseResource

defs = dg.Definitions(
    resources={
        "warehouse": WarehouseResource(),
        "polygon": PolygonResource(
            # EnvVar keeps the key out of the UI's config view and the event log.
            api_key=dg.EnvVar("POLYGON_API_KEY") if os.environ.get("POLYGON_API_KEY") else None,
            base_url=config.polygon_base_url(),
            max_requests_per_minute=config.max_requests_per_minute(),
        ),
    },
)
