"""Thin Dagster resources over the core: configuration in, core objects out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from marketdata_pipeline.config import POLYGON_OFFICIAL_BASE_URL
from marketdata_pipeline.polygon.client import PolygonClient, RetryPolicy
from marketdata_pipeline.warehouse import embedded
from marketdata_pipeline.warehouse.connection import connection as open_connection
from marketdata_pipeline.warehouse.request_limit import SharedRequestLimit


class WarehouseResource(dg.ConfigurableResource):
    """The PostgreSQL / TimescaleDB warehouse.

    The URL is read from DATABASE_URL when the resource is used, not stored in its config, so
    a password never shows in the UI's resource view; unset, the embedded server is used.
    """

    def url(self) -> str:
        return embedded.warehouse_url()

    @contextmanager
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        """A session; with `autocommit`, each transaction block commits as it ends (loads,
        which tell Dagster a window is loaded only once it is committed)."""
        with open_connection(self.url(), autocommit=autocommit) as conn:
            yield conn


class PolygonResource(dg.ConfigurableResource):
    """Polygon's aggregates API (or the offline simulator at `base_url`)."""

    api_key: str | None = Field(
        default=None, description="Sent only as `Authorization: Bearer`; use EnvVar."
    )
    base_url: str = Field(default=POLYGON_OFFICIAL_BASE_URL, description="Polygon's base URL.")
    max_requests_per_minute: int | None = Field(
        default=None,
        description="The key's request limit (5 on the free plan), shared by every process "
        "of the deployment through the warehouse.",
    )
    retry_attempts: int = Field(default=6, description="Attempts per request (429, 5xx).")
    retry_max_seconds: float = Field(
        default=120.0, description="Give up on a request after this long, retries included."
    )
    simulated: bool = Field(
        default=False, description="True when base_url is the offline simulator (synthetic bars)."
    )

    def source_label(self, synthetic: bool = False) -> str:
        """What the bars' metadata names as their source; `synthetic` when the client found
        the simulator's header, whatever base_url and `simulated` say."""
        if self.simulated or synthetic:
            return f"Polygon simulator at {self.base_url} (synthetic bars)"
        return f"Polygon at {self.base_url}"

    def client(self, warehouse_url: str) -> PolygonClient:
        """A client whose requests count against the key's limit in the warehouse."""
        limit = (
            SharedRequestLimit(warehouse_url, self.api_key, self.max_requests_per_minute)
            if self.max_requests_per_minute
            else None
        )
        return PolygonClient(
            self.api_key,
            self.base_url,
            rate_limiter=limit,
            retry=RetryPolicy(
                max_attempts=self.retry_attempts, max_total_seconds=self.retry_max_seconds
            ),
        )
