"""Accounting: every request either origin saw, and the body bytes it was sent."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """One request seen by the emulator (either origin). ``bytes_sent`` counts body bytes only."""

    method: str
    path: str
    query: str
    status: int
    bytes_sent: int
    range_header: str | None
    time: float
    fault: str | None = None


def is_download_path(path: str) -> bool:
    """Whether a request path transfers file content: ``resolve``, the LFS CDN, or CAS xorb ranges
    (``/v1/xorb-data/{file xet hash}/{xorb}``, so CAS bytes are countable per file)."""
    return "/resolve/" in path or path.startswith(("/lfs/", "/v1/xorb-data/"))


class Accounting:
    """Thread-safe request log; readers wait for responses in flight so figures are exact."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._records: list[RequestRecord] = []
        self._active = 0  # responses being written right now

    def record(self, method: str, path: str, query: str, range_header: str | None) -> RequestRecord:
        rec = RequestRecord(method, path, query, 0, 0, range_header, time.time())
        with self._cond:
            self._records.append(rec)
        return rec

    def count_bytes(self, rec: RequestRecord | None, n: int) -> None:
        if rec is not None:
            with self._cond:
                rec.bytes_sent += n

    def begin_response(self) -> None:
        with self._cond:
            self._active += 1

    def end_response(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _settle(self) -> None:
        # A client may hold the last bytes before the server thread has counted them: wait for
        # responses in flight to finish so stats taken right after a download are exact.
        self._cond.wait_for(lambda: self._active == 0, timeout=5)

    def requests(self, path_contains: str = "", method: str | None = None) -> list[RequestRecord]:
        with self._cond:
            self._settle()
            return [
                dataclasses.replace(r)
                for r in self._records
                if path_contains in r.path and (method is None or r.method == method.upper())
            ]

    def bytes_served(self, path_contains: str = "") -> int:
        with self._cond:
            self._settle()
            return sum(
                r.bytes_sent
                for r in self._records
                if r.method == "GET" and r.status in (200, 206) and path_contains in r.path and is_download_path(r.path)
            )

    def reset(self) -> None:
        with self._cond:
            self._records.clear()
