"""A bounded, TTL'd cache of remote metadata (listings, stats, resolved repos) with single-flight.

Keys start with the remote's `cache_namespace` (endpoint, token fingerprint, repo or bucket, revision),
never a raw token. "Not found" is cached for the short negative TTL; transient failures are never cached,
so one network blip cannot turn into minutes of wrong answers.

The size is counted in entries: a directory listing (a dict, list or tuple) weighs as many as it holds,
anything else one, so the least recently used listings are evicted whole when the total would pass
`maxsize`; a single listing larger than that is served but not kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from cachetools import TLRUCache

from .. import constants
from ..errors import RemoteNotFound, RemoteUnavailable

T = TypeVar("T")


class MetadataCache:
    def __init__(
        self,
        maxsize: int = constants.METADATA_CACHE_ENTRIES,
        ttl: float = constants.METADATA_TTL,
        negative_ttl: float = constants.NEGATIVE_TTL,
        wait_timeout: float = constants.OPERATION_TIMEOUT,
    ):
        self.maxsize = maxsize  # entries (see the module doc)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        # How long a caller waits for another caller's load of the same key (the operation deadline:
        # a loader is bounded by it, so a longer wait means the loader is stuck).
        self.wait_timeout = wait_timeout
        # Each value carries its own expiry: (expires_at, value_or_exception).
        self._cache: TLRUCache = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, v, _now: v[0], timer=time.monotonic, getsizeof=_weight
        )
        self._lock = threading.Lock()
        # key -> (the load's future, [monotonic time of its last progress]) of loads in flight.
        self._inflight: dict[Hashable, tuple[Future, list[float]]] = {}
        self.requests = 0  # loader calls, i.e. cache misses that went upstream

    def get(self, key: Hashable, loader: Callable[[], T], ttl: float | None = None) -> T:
        """Return the cached value for `key`, or call `loader` once (however many callers) and cache it.

        `ttl` overrides the default positive TTL (e.g. long for content at a pinned commit).
        """
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                value = cached[1]
                if isinstance(value, RemoteNotFound):
                    raise value
                return value
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = (Future(), [time.monotonic()])
        future, progressed = flight
        if not leader:
            return self._wait(future, progressed)
        with self._lock:
            self.requests += 1  # counted when it goes upstream, whether it then succeeds or not
        try:
            value = loader()
        except RemoteNotFound as exc:
            self._store(key, exc, self.negative_ttl)
            future.set_exception(exc)
            raise
        except BaseException as exc:  # transient or unexpected: tell the waiters, cache nothing
            future.set_exception(exc)
            raise
        else:
            self._store(key, value, self.ttl if ttl is None else ttl)
            future.set_result(value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _wait(self, future: Future, progressed: list[float]) -> Any:
        """The result of another caller's load: waited for as long as it makes progress (see `progress`),
        given up `wait_timeout` after its last progress (the loader's own deadline would have ended it)."""
        while True:
            try:
                return future.result(timeout=max(0.0, progressed[0] + self.wait_timeout - time.monotonic()))
            except FutureTimeout:
                if time.monotonic() - progressed[0] >= self.wait_timeout:
                    raise RemoteUnavailable(
                        f"timed out after {self.wait_timeout:.0f}s waiting for another lookup of the same entry"
                    ) from None

    def progress(self, key: Hashable) -> None:
        """The load of `key` in flight moved on (a listing got one more page): its waiters wait on."""
        with self._lock:
            flight = self._inflight.get(key)
            if flight is not None:
                flight[1][0] = time.monotonic()

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Cache `value` for `key` without a load (e.g. directory listings taken from a recursive one)."""
        self._store(key, value, self.ttl if ttl is None else ttl)

    def peek(self, key: Hashable) -> object | None:
        """The cached value for `key` if present and fresh, without loading (None otherwise)."""
        with self._lock:
            cached = self._cache.get(key)
        return None if cached is None else cached[1]

    def _store(self, key: Hashable, value: Any, ttl: float) -> None:
        with self._lock:
            if ttl > 0:
                try:
                    self._cache[key] = (time.monotonic() + ttl, value)
                except ValueError:  # one listing larger than the whole cache: served, not kept
                    self._cache.pop(key, None)

    def update(self, key: Hashable, change: Callable[[Any], Any]) -> bool:
        """Replace the cached value of `key` with `change(value)`, keeping its expiry; a `change` that
        returns None drops the entry. False (nothing done) when `key` is not cached."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is None or isinstance(cached[1], BaseException):
                return False
            value = change(cached[1])
            self._cache.pop(key, None)  # re-weighed below: a listing may have grown
            if value is not None:
                try:
                    self._cache[key] = (cached[0], value)
                except ValueError:  # grown past the whole cache: dropped, reloaded on next use
                    pass
            return True

    def invalidate(self, predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Drop every entry (or those whose key matches `predicate`), e.g. after a local write."""
        with self._lock:
            if predicate is None:
                self._cache.clear()
                return
            for key in [k for k in list(self._cache.keys()) if predicate(k)]:
                self._cache.pop(key, None)


def _weight(item: tuple[float, Any]) -> int:
    """An entry's share of `maxsize`: a listing counts its entries, anything else one."""
    value = item[1]
    return max(1, len(value)) if isinstance(value, (dict, list, tuple)) else 1
