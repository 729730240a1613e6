-- The read API's limits, shared by every `marketdata serve` process on this warehouse, as the
-- provider's request limit is (005): each counted thing is a row, taken under an advisory
-- lock of its own and timed by the database's clock, so processes on several hosts agree.
-- The tables are UNLOGGED: counting a request then writes no WAL and waits for no flush (the
-- limits cost a third of the requests a second when they did). A crash of the database
-- empties them, which only resets the windows and slots; replicas do not have them.

-- Requests counted against a moving window: a key's (`key 7`), or the refused keys of a
-- client address (`client 203.0.113.9`). A row leaves the window at `expires_at`.
CREATE UNLOGGED TABLE api_rate_hits (
    bucket     text        NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX api_rate_hits_bucket ON api_rate_hits (bucket, expires_at);
CREATE INDEX api_rate_hits_expiry ON api_rate_hits (expires_at);

-- Each running `serve` process, alive while it beats: the slots of a process that stopped
-- beating (killed, frozen, cut off) no longer count.
CREATE UNLOGGED TABLE api_processes (
    id           uuid        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A request in progress or a stream open, of one key, in one process.
CREATE UNLOGGED TABLE api_slots (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    process_id uuid        NOT NULL REFERENCES api_processes (id) ON DELETE CASCADE,
    key_id     bigint      NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('request', 'stream')),
    taken_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX api_slots_key ON api_slots (key_id, kind);
CREATE INDEX api_slots_process ON api_slots (process_id);

-- Who made each request: the client's address, as the server believed it (behind a trusted
-- proxy, from X-Forwarded-For).
ALTER TABLE api_key_audit ADD COLUMN client_address text;

-- One more request in `bucket` if fewer than `per_window` are in its window: (true, the
-- requests left) or (false, 0); with the seconds until the oldest counted leaves the window.
-- One call, one round trip: the lock, the expired rows' removal, the count and the insert.
CREATE FUNCTION api_rate_hit(
    p_bucket text, p_per_window integer, p_window_seconds double precision,
    OUT accepted boolean, OUT remaining integer, OUT reset_in double precision
) LANGUAGE plpgsql AS $$
DECLARE
    counted integer;
    oldest timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(28784, hashtext(p_bucket));  -- 0x7070, "pp"
    DELETE FROM api_rate_hits WHERE bucket = p_bucket AND expires_at <= clock_timestamp();
    SELECT count(*), min(expires_at) INTO counted, oldest
        FROM api_rate_hits WHERE bucket = p_bucket;
    accepted := counted < p_per_window;
    IF accepted THEN
        INSERT INTO api_rate_hits (bucket, expires_at)
            VALUES (p_bucket, clock_timestamp() + make_interval(secs => p_window_seconds));
        counted := counted + 1;
        oldest := coalesce(oldest, clock_timestamp() + make_interval(secs => p_window_seconds));
    END IF;
    remaining := greatest(p_per_window - counted, 0);
    reset_in := greatest(extract(epoch FROM oldest - clock_timestamp()), 0);
END
$$;

-- What is left of `bucket`'s window, counting nothing.
CREATE FUNCTION api_rate_remaining(p_bucket text, p_per_window integer) RETURNS integer
LANGUAGE sql VOLATILE AS $$  -- clock_timestamp()
    SELECT greatest(p_per_window - count(*), 0)::integer FROM api_rate_hits
    WHERE bucket = p_bucket AND expires_at > clock_timestamp()
$$;

-- A slot of `p_kind` for the key, in the process, if the key holds fewer than `p_cap` in
-- processes alive (beaten within `p_alive_seconds`; the caller's own always: a late beat of
-- its own must not lift its caps): the slot's id, else NULL.
CREATE FUNCTION api_take_slot(
    p_process uuid, p_key_id bigint, p_kind text, p_cap integer, p_alive_seconds double precision
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    held integer;
    taken bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(29548, hashtext(p_kind || ' ' || p_key_id));  -- 0x736c, "sl"
    SELECT count(*) INTO held FROM api_slots s JOIN api_processes p ON p.id = s.process_id
        WHERE s.key_id = p_key_id AND s.kind = p_kind
        AND (p.heartbeat_at > clock_timestamp() - make_interval(secs => p_alive_seconds)
             OR p.id = p_process);
    IF held >= p_cap THEN
        RETURN NULL;
    END IF;
    INSERT INTO api_slots (process_id, key_id, kind) VALUES (p_process, p_key_id, p_kind)
        RETURNING id INTO taken;
    RETURN taken;
END
$$;
