-- Bars, their quarantine, and the per-window backfill ledger.
-- ts is the bar's window start (Polygon's `t`); volume is double because crypto volume is
-- fractional; vwap and trades are optional in Polygon's responses.

CREATE TABLE bars_daily (
    symbol text             NOT NULL,
    ts     timestamptz      NOT NULL,
    open   double precision NOT NULL,
    high   double precision NOT NULL,
    low    double precision NOT NULL,
    close  double precision NOT NULL,
    volume double precision NOT NULL,
    vwap   double precision,
    trades bigint,
    PRIMARY KEY (symbol, ts)
);

CREATE TABLE bars_minute (LIKE bars_daily INCLUDING ALL);

-- Rows that failed validation, as received, with every reason. `month` is the window the
-- fetch covered, so reloading a window replaces its rejects as it replaces its bars.
CREATE TABLE bars_rejected (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    timeframe   text        NOT NULL CHECK (timeframe IN ('day', 'minute')),
    symbol      text        NOT NULL,
    month       date        NOT NULL,
    ts          timestamptz,
    open        double precision,
    high        double precision,
    low         double precision,
    close       double precision,
    volume      double precision,
    vwap        double precision,
    trades      bigint,
    reasons     text[]      NOT NULL CHECK (cardinality(reasons) > 0),
    run_id      text,
    rejected_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX bars_rejected_window ON bars_rejected (timeframe, symbol, month);

CREATE TABLE backfill_state (
    asset         text        NOT NULL,
    symbol        text        NOT NULL,
    month         date        NOT NULL CHECK (extract(day FROM month) = 1),
    status        text        NOT NULL
        CHECK (status IN ('pending', 'in_progress', 'completed', 'failed')),
    run_id        text,
    rows_loaded   bigint,
    rows_rejected bigint,
    error         text,
    started_at    timestamptz,
    finished_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (asset, symbol, month)
);

CREATE INDEX backfill_state_symbol ON backfill_state (symbol, month);
