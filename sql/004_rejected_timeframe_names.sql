-- One name per timeframe: the quarantine says 'daily', as the assets and the bars tables do.

ALTER TABLE bars_rejected DROP CONSTRAINT bars_rejected_timeframe_check;
UPDATE bars_rejected SET timeframe = 'daily' WHERE timeframe = 'day';
ALTER TABLE bars_rejected ADD CONSTRAINT bars_rejected_timeframe_check
    CHECK (timeframe IN ('daily', 'minute'));
