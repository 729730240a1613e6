-- TimescaleDB storage: hypertables, compression segmented by symbol, continuous aggregates.
-- Chunks: a week of minute bars (about 5k rows per stock symbol) and a year of daily bars keep
-- a few hundred symbols' recent chunks well inside memory.

CREATE EXTENSION IF NOT EXISTS timescaledb;

SELECT create_hypertable('bars_minute', by_range('ts', INTERVAL '7 days'));
SELECT create_hypertable('bars_daily', by_range('ts', INTERVAL '365 days'));

-- Reloading a window deletes and inserts; compressed chunks accept that, but the recent past
-- is reloaded most (schedules, split adjustments), so only older chunks are compressed.
ALTER TABLE bars_minute SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'symbol',
    timescaledb.compress_orderby = 'ts DESC'
);
ALTER TABLE bars_daily SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'symbol',
    timescaledb.compress_orderby = 'ts DESC'
);
SELECT add_compression_policy('bars_minute', INTERVAL '60 days');
SELECT add_compression_policy('bars_daily', INTERVAL '730 days');

-- Real-time aggregates (materialized_only = false) so a query sees bars loaded since the last
-- refresh, as the plain views of the PostgreSQL variant do.
CREATE MATERIALIZED VIEW bars_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT symbol,
       time_bucket(INTERVAL '1 hour', ts) AS ts,
       first(open, ts)                     AS open,
       max(high)                           AS high,
       min(low)                            AS low,
       last(close, ts)                     AS close,
       sum(volume)                         AS volume,
       sum(vwap * volume) / nullif(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
       sum(trades)::bigint                 AS trades
FROM bars_minute
GROUP BY symbol, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW bars_weekly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT symbol,
       time_bucket(INTERVAL '1 week', ts) AS ts,
       first(open, ts)                     AS open,
       max(high)                           AS high,
       min(low)                            AS low,
       last(close, ts)                     AS close,
       sum(volume)                         AS volume,
       sum(vwap * volume) / nullif(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
       sum(trades)::bigint                 AS trades
FROM bars_daily
GROUP BY symbol, time_bucket(INTERVAL '1 week', ts)
WITH NO DATA;

SELECT add_continuous_aggregate_policy('bars_hourly',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes');
SELECT add_continuous_aggregate_policy('bars_weekly',
    start_offset => INTERVAL '5 weeks', end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL '6 hours');
