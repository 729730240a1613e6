"""What keeping the read API's limits outside the process costs: requests a second through one
`marketdata serve` process with its limits in memory, in the warehouse, or in Redis.

    python scripts/bench_api_limits.py [--seconds 20] [--connections 8] [--rounds 3] [--keys 200]

Needs `wrk` (Debian's package); the Redis figures need `redis-server` (Debian's) and the
`redis` client (`pip install redis`, not a dependency of the project), else they are skipped.
On a fresh `marketdata_bench_limits` database (the embedded PostgreSQL, or the server of
DATABASE_URL) --keys keys take turns to ask `GET /v1/health` (a key checked, its request
counted, a slot taken and given back, the request audited: the smallest request with a
key), each within the default rate limit of 600 a minute (so that a key's window holds what
it holds in use), over --connections connections for --seconds, each backend in turn,
--rounds times; the median of the rounds is reported.

- memory: `limits`' moving window on MemoryStorage and counters in the process (what one
  process did before the limits were shared; several processes would each allow the limit);
- warehouse: the limits as served (marketdata_pipeline/api/shared_limits.py);
- redis: `limits`' moving window on RedisStorage and the slots as Redis counters (INCR and
  DECR: no lease, so a killed process's slots would stay taken; the fastest Redis could be).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import uvicorn
from bench import free_port, fresh_database, machine
from bench_api import wait_until_serving
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from marketdata_pipeline import config
from marketdata_pipeline.api.app import create_app
from marketdata_pipeline.api.pool import WarehousePool
from marketdata_pipeline.api.shared_limits import RateVerdict, SharedLimits, SlotKind
from marketdata_pipeline.registry import api_keys
from marketdata_pipeline.warehouse import connection as db
from marketdata_pipeline.warehouse import embedded, migrations

DATABASE = "marketdata_bench_limits"
RATE_LIMIT = config.DEFAULT_API_RATE_LIMIT
# wrk asks with each key in turn (each of its threads from its own place in the list).
WRK_SCRIPT = """
local keys = {}
for line in io.lines(os.getenv("BENCH_KEYS")) do keys[#keys + 1] = line end
local turn = math.random(#keys)
request = function()
  turn = turn % #keys + 1
  return wrk.format("GET", "/v1/health", {["X-API-Key"] = keys[turn]})
end
"""
BACKENDS = ("memory", "warehouse", "redis")


class _LocalLimits(SharedLimits):
    """The limits on a `limits` storage other than the warehouse; slots as counters."""

    def __init__(self, rate_limit: RateLimitItem, storage: Storage) -> None:
        super().__init__(rate_limit)
        self.limiter = MovingWindowRateLimiter(storage)
        self.slot_ids = itertools.count(1)
        self.slots: dict[int, str] = {}

    def _take(self, counter: str, cap: int) -> int | None:
        raise NotImplementedError

    def _give_back(self, counter: str) -> None:
        raise NotImplementedError

    def hit(self, conn: psycopg.Connection, bucket: str) -> RateVerdict:
        accepted = self.limiter.hit(self.rate_limit, bucket)
        reset_at, remaining = self.limiter.get_window_stats(self.rate_limit, bucket)
        return RateVerdict(accepted, remaining, max(reset_at - time.time(), 0))

    def hit_and_take(
        self, conn: psycopg.Connection, key_id: int, cap: int
    ) -> tuple[RateVerdict, int | None]:
        verdict = self.hit(conn, self.key_bucket(key_id))
        return verdict, self.take(conn, key_id, "request", cap) if verdict.accepted else None

    def take(self, conn: psycopg.Connection, key_id: int, kind: SlotKind, cap: int) -> int | None:
        counter = f"slots {kind} {key_id}"
        if self._take(counter, cap) is None:
            return None
        slot = next(self.slot_ids)
        self.slots[slot] = counter
        return slot

    async def remaining(self, pool: WarehousePool, bucket: str) -> int:
        return self.limiter.get_window_stats(self.rate_limit, bucket)[1]

    def give_back(self, conn: psycopg.Connection, slot: int) -> None:
        self._give_back(self.slots.pop(slot))

    async def release(self, pool: WarehousePool, slot: int) -> None:
        await anyio.to_thread.run_sync(self._give_back, self.slots.pop(slot))

    def start(self, url: str) -> None:
        pass  # no heartbeat

    def stop(self) -> None:
        pass


class MemoryLimits(_LocalLimits):
    def __init__(self, rate_limit: RateLimitItem) -> None:
        super().__init__(rate_limit, MemoryStorage())
        self.held: Counter[str] = Counter()

    def _take(self, counter: str, cap: int) -> int | None:
        if self.held[counter] >= cap:
            return None
        self.held[counter] += 1
        return 1

    def _give_back(self, counter: str) -> None:
        self.held[counter] -= 1


class RedisLimits(_LocalLimits):
    def __init__(self, rate_limit: RateLimitItem, redis_url: str) -> None:
        storage: Any = storage_from_string(redis_url)
        super().__init__(rate_limit, storage)
        self.redis = storage.get_connection()

    def _take(self, counter: str, cap: int) -> int | None:
        if self.redis.incr(counter) > cap:
            self.redis.decr(counter)
            return None
        return 1

    def _give_back(self, counter: str) -> None:
        self.redis.decr(counter)


def serve(backend: str, url: str, port: int, redis_url: str) -> None:
    """The read API as `marketdata serve` runs it, with the limits of `backend`."""
    rate_limit = parse(RATE_LIMIT)
    limits: SharedLimits | None = {
        "memory": lambda: MemoryLimits(rate_limit),
        "warehouse": lambda: None,
        "redis": lambda: RedisLimits(rate_limit, redis_url),
    }[backend]()
    app = create_app(url, rate_limit, limits=limits)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="h11")


@contextmanager
def server(backend: str, url: str, redis_url: str, log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", backend, "--port", str(port),
             "--url", url, "--redis-url", redis_url],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, log, f"the {backend} server")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


def wrk(base: str, keys: Path, seconds: int, connections: int) -> dict[str, float]:
    script = keys.with_suffix(".lua")
    script.write_text(WRK_SCRIPT)
    done = subprocess.run(
        ["wrk", "--latency", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
         base],
        capture_output=True, text=True, check=True, env={**os.environ, "BENCH_KEYS": str(keys)},
    )  # fmt: skip
    out = done.stdout
    if "Non-2xx" in out:
        raise SystemExit(f"bench: refusals under load, the figures would mislead:\n{out}")

    def ms(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        assert match, out
        return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate, out
    return {"rps": float(rate.group(1)), "p50_ms": ms("50%"), "p99_ms": ms("99%")}


@contextmanager
def redis_server() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None or importlib.util.find_spec("redis") is None:  # RedisStorage's client
        print("redis-server or the redis client not installed: no Redis figures")
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.url, args.port, args.redis_url)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    url = fresh_database(config.database_url() or embedded.start(), DATABASE)
    work = Path(tempfile.mkdtemp(prefix="bench_api_limits_"))
    keys = work / "keys.txt"  # raw keys: a throwaway database's, removed at the end
    with db.connection(url) as conn:
        migrations.migrate(conn)
        raw = [api_keys.create(conn, f"bench {i}")[1] for i in range(args.keys)]
    keys.write_text("\n".join(raw) + "\n")
    log = work / "serve.log"
    figures: dict[str, list[dict[str, float]]] = {}
    with redis_server() as redis_url:
        backends = [b for b in BACKENDS if b != "redis" or redis_url]
        for round_number in range(args.rounds):
            for backend in backends:
                with server(backend, url, redis_url or "", log) as base:
                    wrk(base, keys, 2, args.connections)  # warm-up
                    time.sleep(1)  # its last requests, cut off by wrk, are still in progress
                    run = wrk(base, keys, args.seconds, args.connections)
                figures.setdefault(backend, []).append(run)
                shown = f"{run['rps']:.0f} requests/s, p50 {run['p50_ms']:.2f} ms"
                print(f"round {round_number + 1} {backend}: {shown}", flush=True)
    about = machine(url)
    print(f"\nmachine: {about['cpu']}; {about['os']}\ndatabase: {about['database']}")
    shutil.rmtree(work)
    print(f"{args.keys} keys, {args.connections} connections, {args.seconds} s a run, "
          f"median of {args.rounds}:")  # fmt: skip
    print("| limits in | requests/s | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: |")
    for backend, runs in figures.items():
        median = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")}
        print(f"| {backend} | {median['rps']:.0f} | {median['p50_ms']:.2f} | "
              f"{median['p99_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
