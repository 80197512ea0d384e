"""Stale compile locks: a `*.lock` in the local layer whose creator process is gone.

libneuronxla's module lock is existence-based: a compiler killed while holding it leaves every later
compiler of that module waiting forever. The creator record (pid + start time, see `creators`) tells
whether the process that made a lock still runs. A lock whose creator is gone is stale: it is reported
in status and, unless the mount keeps stale locks, removed `grace` seconds after it was first seen stale
(the kernel's cached entry of it dropped too, so pollers see it go at once). A lock the first round
finds stale was so when the daemon started (a restart after a crash): its grace counts from the start,
and the check wakes when a grace ends, so such a lock is gone `grace` seconds after the restart. A lock whose creator is
alive is never touched; one whose creator is unknown (pid 0: another pid namespace; or no record:
created before this feature or not through the mount) is only reported, once older than `grace`.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Callable

from .. import supervision
from .creators import Creator, creator_alive
from .merged import MergedView

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
CHECK_INTERVAL = 1.0  # seconds between checks of the recorded locks (a dict scan, no I/O per entry)
WALK_INTERVAL = 60.0  # seconds between walks of the layer for locks without a record
_MAX_REPORTED = 1000  # status lists at most this many
_UNSEEN = object()


class StaleLocks:
    """Watches the `*.lock` files of `view`'s local layer (layer paths equal view paths: NEFF view)."""

    def __init__(
        self,
        view: MergedView,
        *,
        grace: float,
        remove: bool,
        invalidate: Callable[[str], None],
    ):
        self.view = view
        self.grace = grace
        self.remove = remove
        self.invalidate = invalidate
        self.removed = 0
        self._lock = threading.Lock()
        self._stale_since: dict[str, float] = {}  # path -> monotonic time first seen with its creator gone
        self._unrecorded: set[str] = set()  # locks found by the walk that have no creator record
        self._walked = float("-inf")
        self._started = time.monotonic()
        self._first_round = True
        self._reported: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = supervision.thread("hffs-stale-locks", self._run)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def status(self) -> list[dict]:
        """`stale_locks` of the status: [{path, pid, age_s, creator}] (creator "gone" or "unknown")."""
        with self._lock:
            return [dict(r) for r in self._reported]

    def _run(self) -> None:
        while not self._stop.wait(self._next_wait()):
            with supervision.one_round("stale lock check"):
                self.check()

    def _next_wait(self) -> float:
        """Until the next round: CHECK_INTERVAL, or sooner when a stale lock's grace ends."""
        with self._lock:
            first_due = min(self._stale_since.values(), default=None) if self.remove else None
        if first_due is None:
            return CHECK_INTERVAL
        return min(CHECK_INTERVAL, max(0.01, first_due + self.grace - time.monotonic()))

    def check(self) -> None:
        """One round: classify every lock of the layer, remove those stale for longer than the grace."""
        now = time.monotonic()
        first_seen = self._started if self._first_round else now
        self._first_round = False
        if now - self._walked >= WALK_INTERVAL:
            self._walked = now
            self._unrecorded = set(self._walk(""))
        records = self.view.creators.matching(LOCK_SUFFIX)
        reported: list[dict] = []
        stale_since: dict[str, float] = {}
        # One look at /proc per creator and round: a compiler holds many locks over its life (one per module),
        # and a busy layer thousands at once.
        alive_by_creator: dict[Creator, bool | None] = {}
        for path, creator in records.items():
            alive = alive_by_creator.get(creator, _UNSEEN)
            if alive is _UNSEEN:
                alive = alive_by_creator[creator] = creator_alive(creator)
            if alive:
                continue
            age = self._age(path)
            if age is None:
                continue
            if alive is None:
                if age >= self.grace:
                    reported.append(_entry(path, creator.pid, age, "unknown"))
                continue
            since = stale_since[path] = self._stale_since.get(path, first_seen)
            if self.remove and now - since >= self.grace and self._remove(path, creator, age):
                stale_since.pop(path)
                continue
            reported.append(_entry(path, creator.pid, age, "gone"))
        for path in self._unrecorded - records.keys():
            age = self._age(path)
            if age is not None and age >= self.grace:
                reported.append(_entry(path, 0, age, "unknown"))
        with self._lock:
            self._stale_since = stale_since
            self._reported = reported[:_MAX_REPORTED]

    def _remove(self, path: str, creator: Creator, age: float) -> bool:
        if not self.view.remove_stale(path, creator):
            return False
        self.removed += 1
        self.invalidate(path)
        logger.warning(
            "removed stale compile lock %s: its creator (pid %d) is gone (lock %.0f s old); "
            "waiting compilers proceed (--keep-stale-locks keeps such locks)",
            path,
            creator.pid,
            age,
        )
        return True

    def _age(self, path: str) -> float | None:
        st = self.view.layer_stat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return max(0.0, time.time() - st.st_mtime)

    def _walk(self, path: str) -> list[str]:
        """The `*.lock` files under view path `path` in the local layer (symlinks never followed)."""
        rel = self.view._rel(path)
        try:
            entries = self.view.local.listdir(rel)
        except (OSError, ValueError):
            return []
        found = []
        for name, mode in entries:
            child = f"{path}/{name}" if path else name
            if stat.S_ISDIR(mode):
                if not (not path and name == self.view.tmp and not self.view.upper):
                    found += self._walk(child)
            elif stat.S_ISREG(mode) and name.endswith(LOCK_SUFFIX):
                found.append(child)
        return found


def _entry(path: str, pid: int, age: float, creator: str) -> dict:
    return {"path": path, "pid": pid, "age_s": round(age, 1), "creator": creator}
