"""A bounded, TTL'd cache of remote metadata (listings, stats, resolved repos) with single-flight.

Keys start with the remote's `cache_namespace` (endpoint, token fingerprint, repo or bucket, revision),
never a raw token. "Not found" is cached for the short negative TTL; transient failures are never cached,
so one network blip cannot turn into minutes of wrong answers.
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
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        # How long a caller waits for another caller's load of the same key (the operation deadline:
        # a loader is bounded by it, so a longer wait means the loader is stuck).
        self.wait_timeout = wait_timeout
        # Each value carries its own expiry: (expires_at, value_or_exception).
        self._cache: TLRUCache = TLRUCache(maxsize=maxsize, ttu=lambda _k, v, _now: v[0], timer=time.monotonic)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}
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
            future = self._inflight.get(key)
            leader = future is None
            if leader:
                future = Future()
                self._inflight[key] = future
        if not leader:
            try:
                return future.result(timeout=self.wait_timeout)
            except FutureTimeout:
                raise RemoteUnavailable(
                    f"timed out after {self.wait_timeout:.0f}s waiting for another lookup of the same entry"
                ) from None
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

    def peek(self, key: Hashable) -> object | None:
        """The cached value for `key` if present and fresh, without loading (None otherwise)."""
        with self._lock:
            cached = self._cache.get(key)
        return None if cached is None else cached[1]

    def _store(self, key: Hashable, value: Any, ttl: float) -> None:
        with self._lock:
            if ttl > 0:
                self._cache[key] = (time.monotonic() + ttl, value)

    def update(self, key: Hashable, change: Callable[[Any], Any]) -> bool:
        """Replace the cached value of `key` with `change(value)`, keeping its expiry; a `change` that
        returns None drops the entry. False (nothing done) when `key` is not cached."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is None or isinstance(cached[1], BaseException):
                return False
            value = change(cached[1])
            if value is None:
                self._cache.pop(key, None)
            else:
                self._cache[key] = (cached[0], value)
            return True

    def invalidate(self, predicate: Callable[[Hashable], bool] | None = None) -> None:
        """Drop every entry (or those whose key matches `predicate`), e.g. after a local write."""
        with self._lock:
            if predicate is None:
                self._cache.clear()
                return
            for key in [k for k in list(self._cache.keys()) if predicate(k)]:
                self._cache.pop(key, None)
