-- Plain PostgreSQL storage: the same names as the TimescaleDB variant, as views.
-- Buckets are computed in UTC whatever the session's time zone, as time_bucket does.

CREATE INDEX bars_minute_ts ON bars_minute (ts);
CREATE INDEX bars_daily_ts ON bars_daily (ts);

CREATE VIEW bars_hourly AS
SELECT symbol,
       date_trunc('hour', ts, 'UTC')           AS ts,
       (array_agg(open ORDER BY ts))[1]        AS open,
       max(high)                               AS high,
       min(low)                                AS low,
       (array_agg(close ORDER BY ts DESC))[1]  AS close,
       sum(volume)                             AS volume,
       sum(vwap * volume) / nullif(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
       sum(trades)::bigint                     AS trades
FROM bars_minute
GROUP BY symbol, date_trunc('hour', ts, 'UTC');

CREATE VIEW bars_weekly AS
SELECT symbol,
       date_trunc('week', ts, 'UTC')           AS ts,
       (array_agg(open ORDER BY ts))[1]        AS open,
       max(high)                               AS high,
       min(low)                                AS low,
       (array_agg(close ORDER BY ts DESC))[1]  AS close,
       sum(volume)                             AS volume,
       sum(vwap * volume) / nullif(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
       sum(trades)::bigint                     AS trades
FROM bars_daily
GROUP BY symbol, date_trunc('week', ts, 'UTC');
