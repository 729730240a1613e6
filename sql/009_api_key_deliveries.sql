-- A raw API key made where no operator is watching (a launchpad run in its own container) is
-- kept here sealed to an operator's public key until `marketdata keys reveal ID` opens it,
-- once: the warehouse, a backup of it or a run never holds anything that opens it.

CREATE TABLE api_key_deliveries (
    key_id     bigint PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    recipient  text        NOT NULL,  -- the public key it is sealed to
    sealed     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
