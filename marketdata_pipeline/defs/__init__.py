"""Everything that imports Dagster: resources, partitions, assets, checks, schedules, sensors
and admin jobs, wiring the core together. Nothing here fetches, validates or loads by itself."""
