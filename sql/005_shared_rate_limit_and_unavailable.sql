-- Requests sent to Polygon, per API key: the rate limit that every process of a deployment
-- (run workers, sensors, the CLI) shares. The key is named by a prefix of its SHA-256.
CREATE TABLE polygon_requests (
    key_id  text        NOT NULL,
    sent_at timestamptz NOT NULL
);

CREATE INDEX polygon_requests_key_time ON polygon_requests (key_id, sent_at);

-- A month the provider's plan does not cover is `unavailable`, not a failure.
ALTER TABLE backfill_state DROP CONSTRAINT backfill_state_status_check;
ALTER TABLE backfill_state ADD CONSTRAINT backfill_state_status_check
    CHECK (status IN ('pending', 'in_progress', 'completed', 'failed', 'unavailable'));
