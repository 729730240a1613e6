"""A request limit per minute, shared by the threads of one process."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class RateLimiter:
    """At most `per_minute` acquisitions in any 60-second window; thread-safe."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._recent and now - self._recent[0] >= 60.0:
                    self._recent.popleft()
                if len(self._recent) < self.per_minute:
                    self._recent.append(now)
                    return
                wait = 60.0 - (now - self._recent[0])
            log.info(
                "Polygon request limit of %d/min reached: waiting %.1fs", self.per_minute, wait
            )
            self._sleep(wait)


_process_limiters: dict[int, RateLimiter] = {}
_process_limiters_lock = threading.Lock()


def process_rate_limiter(per_minute: int) -> RateLimiter:
    """The limiter shared by every client in this process with the same limit."""
    with _process_limiters_lock:
        return _process_limiters.setdefault(per_minute, RateLimiter(per_minute))
