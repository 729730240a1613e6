-- Symbols the pipeline tracks and the API keys of the old service, with their audit trail.

CREATE TABLE tracked_symbols (
    symbol          text PRIMARY KEY CHECK (symbol ~ '^[A-Z][A-Z0-9.]{0,11}$'),
    asset_class     text        NOT NULL CHECK (asset_class IN ('stock', 'etf', 'crypto')),
    active          boolean     NOT NULL DEFAULT true,
    date_added      timestamptz NOT NULL DEFAULT now(),
    last_backfill   timestamptz,
    backfill_status text        NOT NULL DEFAULT 'pending'
        CHECK (backfill_status IN ('pending', 'in_progress', 'completed', 'failed')),
    backfill_error  text
);

CREATE INDEX tracked_symbols_active_class ON tracked_symbols (asset_class) WHERE active;

CREATE TABLE api_keys (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash           text        NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    name               text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    active             boolean     NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_used          timestamptz,
    last_used_endpoint text,
    request_count      bigint      NOT NULL DEFAULT 0
);

CREATE TABLE api_key_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id      bigint REFERENCES api_keys (id) ON DELETE SET NULL,
    endpoint    text        NOT NULL,
    method      text        NOT NULL,
    status_code integer     NOT NULL,
    "timestamp" timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_key_audit_key_time ON api_key_audit (key_id, "timestamp" DESC);
