-- A symbol none of whose history the provider's plan covers is `unavailable`, not `completed`.
ALTER TABLE tracked_symbols DROP CONSTRAINT tracked_symbols_backfill_status_check;
ALTER TABLE tracked_symbols ADD CONSTRAINT tracked_symbols_backfill_status_check
    CHECK (backfill_status IN ('pending', 'in_progress', 'completed', 'failed', 'unavailable'));
