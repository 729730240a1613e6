"""The Dagster code location: wiring only."""

import dagster as dg

from marketdata_pipeline.resources import WarehouseResource

defs = dg.Definitions(
    resources={
        "warehouse": WarehouseResource(),
    },
)
