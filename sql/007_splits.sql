-- Splits of the tracked stock symbols, as the provider's splits reference lists them, kept
-- current daily. A split the provider no longer lists is kept, withdrawn. `changed_at` is
-- when its current ratio took effect for the warehouse: its execution date for the splits a
-- symbol had when first fetched, else when a fetch first saw it, changed or restored.
CREATE TABLE splits (
    symbol         text             NOT NULL,
    execution_date date             NOT NULL,
    split_from     double precision NOT NULL CHECK (split_from > 0),
    split_to       double precision NOT NULL CHECK (split_to > 0),
    provider_id    text             NOT NULL,
    changed_at     timestamptz      NOT NULL,
    withdrawn_at   timestamptz,
    PRIMARY KEY (symbol, execution_date)
);

-- When each symbol's splits were first and last fetched (a symbol may have none).
CREATE TABLE split_fetches (
    symbol           text        PRIMARY KEY,
    first_fetched_at timestamptz NOT NULL,
    last_fetched_at  timestamptz NOT NULL
);

-- When each month of a symbol's bars was last fetched whole: the adjustment it holds is that
-- of the splits in effect then. A night that loads a few days leaves it as it was.
CREATE TABLE loaded_months (
    timeframe text        NOT NULL CHECK (timeframe IN ('daily', 'minute')),
    symbol    text        NOT NULL,
    month     date        NOT NULL CHECK (extract(day FROM month) = 1),
    loaded_at timestamptz NOT NULL,
    PRIMARY KEY (timeframe, symbol, month)
);

-- Months loaded before this table existed: when their backfill finished.
INSERT INTO loaded_months (timeframe, symbol, month, loaded_at)
SELECT split_part(asset, '_', 2), symbol, month, max(finished_at)
FROM backfill_state
WHERE status = 'completed' AND finished_at IS NOT NULL
GROUP BY 1, 2, 3;

-- Why a window was fetched again: the split change it follows.
ALTER TABLE backfill_state ADD COLUMN revised_for text;
