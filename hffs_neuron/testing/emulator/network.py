"""Network simulation: a bandwidth cap per TCP connection and a latency added to every request.

Off by default. MB means 10^6 bytes. The cap is a token bucket per connection (one per handler, so
keep-alive requests on one connection share it, and N connections get N times the bandwidth, as on a
real long-haul link where one TCP stream is the bottleneck).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

#: How much a connection may send at once after being idle (one write's worth, at most).
_BURST_S = 0.005


@dataclass(frozen=True)
class NetworkProfile:
    conn_mbps: float | None = None
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.conn_mbps is not None and not self.conn_mbps > 0:
            raise ValueError(f"conn_mbps must be positive or None, got {self.conn_mbps!r}")
        if not self.latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms!r}")

    @property
    def bytes_per_s(self) -> float | None:
        return self.conn_mbps * 1e6 if self.conn_mbps is not None else None

    def write_size(self) -> int:
        """Bytes per paced write: about 10 ms worth at the cap, between 16 KiB and 1 MiB."""
        rate = self.bytes_per_s or 0.0
        return int(min(1 << 20, max(16 << 10, rate / 100)))


class Pacer:
    """The token bucket of one connection: :meth:`wait` before sending ``n`` bytes keeps it under the cap."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._due = 0.0  # monotonic time at which everything sent so far is "paid for"

    def wait(self, n: int, bytes_per_s: float) -> None:
        now = time.monotonic()
        # An idle connection earns at most a small burst, not credit for all the time it was idle.
        self._due = max(self._due, now - _BURST_S) + n / bytes_per_s
        if self._due > now:
            self._stop.wait(self._due - now)
