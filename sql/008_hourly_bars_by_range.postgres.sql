-- The bars_hourly view groups minutes by date_trunc('hour', ts, 'UTC'): a range on its ts is
-- a range on that expression, which neither the primary key nor bars_minute_ts can serve,
-- so an hourly read of one day scanned all of the symbol's minutes (or the whole table).
-- Indexed by symbol and hour, it reads only the hours asked. Weekly bars need no such
-- index: a symbol has a few thousand days at most.
CREATE INDEX bars_minute_symbol_hour ON bars_minute (symbol, date_trunc('hour', ts, 'UTC'));
