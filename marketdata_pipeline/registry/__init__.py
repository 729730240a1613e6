"""What the pipeline tracks: symbols, API keys, per-window backfill state, statistics."""
