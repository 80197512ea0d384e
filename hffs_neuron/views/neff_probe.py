"""Probe mode: a module published by another node shows within `--negative-ttl`, without relisting.

A `neuronxcc-*` directory may hold 10,000 modules: relisting it whenever a compiler misses would cost
thousands of listing requests. Instead, a lookup of a name missing from a cached listing that is older
than the negative TTL asks about that name alone: the one module's listing for a `MODULE_*` (or for a
file inside a module), the small root listing for a `neuronxcc-*` version. What a probe finds is laid over
the cached listing until that listing is reloaded. When more names of one version directory are asked
about within a window than its listing has pages (at least `BATCH_NAMES`: several compilers waiting, or
a fleet's pollers), the directory is listed again instead, which answers all of them for the next
window. Probes of one target are single-flight, each target is probed at most once per window (the
negative TTL less the kernel's own "not found" time, so that the two together hide an arrival at most the
negative TTL), a failed probe fails the directory's others for `FAILED_MEMORY`, and all probes together
are rate-bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from cachetools import LRUCache

from .. import constants
from ..errors import RemoteNotFound, RemoteUnavailable
from ..remote.base import Remote, RemoteEntry
from .neff_names import MODULE_PREFIX, VERSION_PREFIX, is_lock_name

logger = logging.getLogger(__name__)

# Probes per second, sustained, and the burst: a bound against a storm of lookups of random names, above
# what a node's waiting compilers need (the fleet simulation's poller, 54 modules every 50 ms, needs ~30).
PROBE_RATE = 50.0
PROBE_BURST = 100
_MAX_LISTINGS = 4096
_MAX_RECENT = 65536
# A module found without its done marker is being published (its files first, the marker in a second call,
# well under a second later): it is asked about again after this long, not after a whole window.
MID_PUBLISH_WINDOW = 0.5
_DONE_MARKER = "model.done"
# Distinct names of one directory asked about (within two windows) before the directory itself is listed.
BATCH_NAMES = 4
_LISTING_PAGE = 1000  # entries per listing page (the Hub's tree pages)
_MAX_ASKED = 4096  # names remembered per directory
# After a probe in a directory failed upstream (its whole deadline spent), other probes there fail at once
# for this long instead of asking again: a Hub that is down is not asked once per waiting compiler. Where
# the kernel sends the lookups of a directory one at a time (a libfuse whose session `libfuse_session`
# cannot amend), it also keeps N compilers polling N modules of one version directory from waiting N
# deadlines.
FAILED_MEMORY = 1.0


@dataclass
class _Seen:
    listing: dict[str, RemoteEntry]  # the cached listing object, as the metadata cache holds it
    since: float  # monotonic time it was first seen (just after it was loaded)
    merged: dict[str, RemoteEntry]  # the listing with what probes found since
    window: float  # how long after `since` it answers for its names without asking upstream


class NameProber:
    def __init__(self, remote: Remote, negative_ttl: float, kernel_negative: float = 0.0):
        """`kernel_negative`: how long the kernel keeps a "not found" the daemon answered (at most half of
        `negative_ttl`); a name is asked about again `negative_ttl - kernel_negative` after its last probe."""
        self.remote = remote
        self.window = negative_ttl - kernel_negative
        self.probes = 0  # upstream probe requests made
        self._lock = threading.Lock()
        self._seen: LRUCache = LRUCache(maxsize=_MAX_LISTINGS)  # path -> _Seen
        self._recent: LRUCache = LRUCache(maxsize=_MAX_RECENT)  # target -> monotonic time it may be probed again
        self._inflight: dict[str, Future] = {}
        self._asked: LRUCache = LRUCache(maxsize=_MAX_LISTINGS)  # directory -> LRU {name: when last asked about}
        self._failed: LRUCache = LRUCache(maxsize=_MAX_LISTINGS)  # directory -> (until when, what failed)
        self._tokens = float(PROBE_BURST)
        self._refilled = time.monotonic()

    def listing(self, path: str, listing: dict[str, RemoteEntry]) -> dict[str, RemoteEntry]:
        """The children of `path` to show: the cached `listing` plus what probes found since it was loaded.

        Returns the same object until a probe adds something, so callers can memoize on identity.
        """
        with self._lock:
            seen = self._seen.get(path)
            if seen is None or seen.listing is not listing:
                seen = _Seen(listing, time.monotonic(), listing, self._window(path, listing))
                self._seen[path] = seen
            return seen.merged

    def _window(self, path: str, listing: dict[str, RemoteEntry]) -> float:
        """How long a listing of `path` answers for its names: shorter for a module caught mid-publish."""
        if _is_module(path) and listing and _DONE_MARKER not in listing:
            return min(MID_PUBLISH_WINDOW, self.window)
        return self.window

    def probe(self, parent: str, name: str) -> bool:
        """`name` is missing from `parent`'s listing: ask upstream if that listing is old enough.

        Returns True if `name` is now among `parent`'s children (found by this probe or a concurrent
        one): the caller looks it up again. Raises (EIO) if the probe failed upstream.
        """
        target = _probe_target(parent, name)
        if target is None:
            return False
        with self._lock:
            seen = self._seen.get(parent)
            if seen is None:
                return False
            now = time.monotonic()
            if target != parent:
                asked = self._asked.get(parent)
                if asked is None:
                    asked = self._asked[parent] = LRUCache(maxsize=_MAX_ASKED)
                asked[name] = now
            if now - seen.since < seen.window or self._recent.get(target, 0.0) > now:
                return name in seen.merged
            if target != parent and self._many_asked(parent, now, seen):
                target = parent
            failed = self._failed.get(parent)
            if failed is not None and failed[0] > now:
                raise RemoteUnavailable(f"{failed[1]} (a probe in {parent or '/'} failed just before)")
            future = self._inflight.get(target)
            leader = future is None
            if leader:
                if not self._take_token(now):
                    return False
                future = Future()
                self._inflight[target] = future
                self.probes += 1
        if not leader:
            future.result(timeout=constants.OPERATION_TIMEOUT)  # the leader's failure is raised here too
        else:
            try:
                self._probe(seen, parent, name, target)
            except BaseException as exc:
                # Not remembered as probed: a lookup after FAILED_MEMORY asks again, never answering "absent".
                with self._lock:
                    self._inflight.pop(target, None)
                    self._failed[parent] = (time.monotonic() + FAILED_MEMORY, str(exc))  # no frames kept
                future.set_exception(exc)
                raise
            with self._lock:
                self._inflight.pop(target, None)
                self._failed.pop(parent, None)
            future.set_result(None)
        with self._lock:
            seen = self._seen.get(parent)
            return seen is not None and name in seen.merged

    def _probe(self, seen: _Seen, parent: str, name: str, target: str) -> None:
        try:
            entries = self.remote.list(target)
        except RemoteNotFound:
            entries = []
        # Any other failure (after the HTTP layer's retries within --timeout) propagates as EIO: an
        # answer of "absent" would make a compiler recompile a module that exists.
        found = {e.name: e for e in entries}
        with self._lock:
            self._recent[target] = time.monotonic() + self._window(target, found)
        if target == parent:  # a small directory (the root, one module) listed again: it replaces
            merged = found
        elif entries:  # a module found in a large version directory: added to it
            merged = {**seen.merged, name: RemoteEntry(path=target, is_dir=True)}
        else:
            return
        with self._lock:
            if self._seen.get(parent) is not seen:  # the listing was reloaded meanwhile: it is newer
                return
            seen.merged = merged
            if target == parent:
                seen.since, seen.window = time.monotonic(), self._window(target, found)
        logger.debug("probe of %s: %s %s", target, name, "found" if name in merged else "absent")

    def _many_asked(self, parent: str, now: float, seen: _Seen) -> bool:
        """True if so many distinct names of `parent` were asked about within the last two windows (a
        name still waited for is asked about in each) that listing `parent` again costs fewer requests
        than probing each."""
        asked = self._asked[parent]
        for old in [n for n, at in asked.items() if now - at > 2 * self.window]:
            del asked[old]
        return len(asked) >= max(BATCH_NAMES, len(seen.listing) // _LISTING_PAGE + 1)

    def _take_token(self, now: float) -> bool:
        self._tokens = min(PROBE_BURST, self._tokens + (now - self._refilled) * PROBE_RATE)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _is_module(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and parts[0].startswith(VERSION_PREFIX) and parts[1].startswith(MODULE_PREFIX)


def _probe_target(parent: str, name: str) -> str | None:
    """What to list to learn about `parent/name` (None: not a name other nodes publish)."""
    parts = parent.split("/") if parent else []
    if not parts:
        return "" if name.startswith(VERSION_PREFIX) else None
    if len(parts) == 1 and parts[0].startswith(VERSION_PREFIX) and name.startswith(MODULE_PREFIX):
        return f"{parent}/{name}"
    if _is_module(parent):
        return None if is_lock_name(name) or name == "model.log" else parent
    return None
