"""Market data pipeline: Polygon bars, validated, in a TimescaleDB warehouse, driven by Dagster."""
