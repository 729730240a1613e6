"""A separate process that loads windows, for the SIGKILL and concurrency tests.

python tests/load_child.py DATABASE_URL SYMBOL FIRST_MONTH LAST_MONTH [SPLIT_RATIO]
"""

import sys
from datetime import date

from marketdata_pipeline.domain import Market, Timeframe, next_month
from marketdata_pipeline.pipeline import ingest as run_ingest
from marketdata_pipeline.polygon.client import PolygonClient
from marketdata_pipeline.polygon.simulator import Simulator
from marketdata_pipeline.warehouse import connection as db

SPLIT_DAY = date(2023, 6, 15)


def main() -> None:
    url, symbol, first, last = sys.argv[1:5]
    sim = Simulator()
    if len(sys.argv) > 5:
        sim.split(symbol, SPLIT_DAY, float(sys.argv[5]))
    months, month = [], date.fromisoformat(first)
    while month <= date.fromisoformat(last):
        months.append(month)
        month = next_month(month)
    client = PolygonClient(None, "http://simulator", transport=sim.transport())
    with db.connection(url) as conn:
        for outcome in run_ingest(
            client,
            conn,
            market=Market.STOCK,
            timeframe=Timeframe.MINUTE,
            symbol=symbol,
            months=months,
        ):
            assert outcome.load is not None, outcome.refused
            print(f"loaded {outcome.window.month} {outcome.load.rows_loaded}", flush=True)


if __name__ == "__main__":
    main()
