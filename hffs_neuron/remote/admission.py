"""A bound on upstream lookups a mount starts on its own: how many at once, and how many per second.

Over the bound a caller is refused at once (`Throttled`, EAGAIN), never queued: a FUSE worker thread
must not wait for a slot, and a refusal must not be remembered as "not found".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Throttled


class AdmissionLimiter:
    """A token bucket (`rate` per second, burst `rate`) and a cap of `concurrency` at once.

    `rate <= 0` means no rate limit.
    """

    def __init__(self, rate: float, concurrency: int, what: str):
        self.rate = rate
        self.concurrency = max(1, concurrency)
        self.what = what
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._active = 0
        self._lock = threading.Lock()
        self.refused = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Run the block as one admitted lookup, or raise `Throttled` without waiting."""
        with self._lock:
            now = time.monotonic()
            if self.rate > 0:
                self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._active >= self.concurrency:
                self.refused += 1
                raise Throttled(f"{self.what}: {self._active} already in progress; try again")
            if self.rate > 0 and self._tokens < 1:
                self.refused += 1
                raise Throttled(f"{self.what}: more than {self.rate:g} per second; try again")
            if self.rate > 0:
                self._tokens -= 1
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
