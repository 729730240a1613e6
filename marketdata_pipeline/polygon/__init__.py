"""The provider: Polygon's aggregates client, its request limit, and an offline simulator."""
