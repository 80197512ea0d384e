"""MetadataCache: bounded, TTL'd, negative entries short-lived, transient failures never cached, one
loader call per key however many concurrent misses; and the same against a real Bucket over HTTP."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import TEST_TOKEN

from hffs_neuron.errors import RemoteNotFound, RemoteUnavailable
from hffs_neuron.remote import Bucket, HubHttp
from hffs_neuron.store import MetadataCache
from hffs_neuron.testing.hub_emulator import HubEmulator


class Loader:
    """A loader that counts its calls and returns (or raises) what it is told."""

    def __init__(self, result: object = "value", delay: float = 0.0):
        self.result = result
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def run_threads(n: int, target: Callable[[], object]) -> list[object]:
    """Call `target` from `n` threads released together; return each result or exception."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_hit_within_ttl_and_reload_after() -> None:
    cache = MetadataCache(maxsize=10, ttl=0.3, negative_ttl=0.1)
    loader = Loader("v1")
    assert cache.get("k", loader) == "v1"
    assert cache.get("k", loader) == "v1"
    assert loader.calls == 1 and cache.peek("k") == "v1"
    time.sleep(0.4)
    assert cache.peek("k") is None
    loader.result = "v2"
    assert cache.get("k", loader) == "v2" and loader.calls == 2


def test_pinned_entries_use_their_long_ttl() -> None:
    cache = MetadataCache(maxsize=10, ttl=0.1, negative_ttl=0.1)
    pinned, mutable = Loader("commit"), Loader("listing")
    cache.get("pinned", pinned, ttl=3600)
    cache.get("mutable", mutable)
    time.sleep(0.2)
    cache.get("pinned", pinned)
    cache.get("mutable", mutable)
    assert (pinned.calls, mutable.calls) == (1, 2)


def test_not_found_is_cached_briefly() -> None:
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=0.2)
    loader = Loader(RemoteNotFound("x: not found"))
    for _ in range(3):
        with pytest.raises(RemoteNotFound) as info:
            cache.get("missing", loader)
        assert info.value.errno == errno.ENOENT
    assert loader.calls == 1
    time.sleep(0.3)  # the negative entry expires: the file may exist by now
    loader.result = "appeared"
    assert cache.get("missing", loader) == "appeared" and loader.calls == 2


@pytest.mark.parametrize("error", [RemoteUnavailable("timed out"), RuntimeError("bug")])
def test_transient_failures_are_never_cached(error: Exception) -> None:
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=60)
    loader = Loader(error)
    for _ in range(3):
        with pytest.raises(type(error)):
            cache.get("k", loader)
    assert loader.calls == 3 and cache.requests == 3
    assert cache.peek("k") is None
    loader.result = "ok"
    assert cache.get("k", loader) == "ok"


def test_bounded_size() -> None:
    cache = MetadataCache(maxsize=3, ttl=60, negative_ttl=60)
    for i in range(10):
        cache.get(i, Loader(i))
    assert sum(cache.peek(i) is not None for i in range(10)) <= 3
    assert cache.peek(9) == 9  # the most recent survives


def test_listings_weigh_their_entries_and_are_evicted_whole() -> None:
    """The size counts entries (issue 31): a listing weighs what it holds, the least recently used
    listings go first, and one larger than the whole cache is served but not kept."""
    cache = MetadataCache(maxsize=100, ttl=60, negative_ttl=60)
    for name in "abc":
        cache.get(name, Loader({f"{name}{i}": i for i in range(40)}))
    assert cache.peek("a") is None and cache.peek("b") is not None and cache.peek("c") is not None  # 80 of 100
    huge = Loader(list(range(101)))
    assert cache.get("huge", huge) == list(range(101)) and cache.peek("huge") is None
    assert cache.peek("b") is not None  # nothing was evicted for a value that cannot stay
    cache.put("d", tuple(range(30)))  # 110 entries: the least recently used listing goes ("b" was just read)
    assert cache.peek("c") is None and cache.peek("b") is not None and cache.peek("d") == tuple(range(30))


@pytest.mark.timeout(60)
def test_waiters_wait_as_long_as_the_load_makes_progress() -> None:
    """A slow listing that reports each page (`progress`) keeps its waiters past `wait_timeout`."""
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=60, wait_timeout=0.5)

    def slow_pages() -> str:
        for _page in range(6):
            time.sleep(0.3)
            cache.progress("k")
        return "complete"

    leader = threading.Thread(target=lambda: cache.get("k", slow_pages))
    leader.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert run_threads(3, lambda: cache.get("k", Loader("unused"))) == ["complete"] * 3
    assert time.monotonic() - started > 1.0  # twice the wait timeout: waited on progress
    leader.join(10)


def test_invalidate() -> None:
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=60)
    for key in [("a", 1), ("a", 2), ("b", 1)]:
        cache.get(key, Loader(key))
    cache.invalidate(lambda k: k[0] == "a")
    assert cache.peek(("a", 1)) is None and cache.peek(("a", 2)) is None and cache.peek(("b", 1)) == ("b", 1)
    cache.invalidate()
    assert cache.peek(("b", 1)) is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outcome", ["value", "not-found", "transient"])
def test_concurrent_misses_issue_one_loader_call(outcome: str) -> None:
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=60)
    result = {
        "value": {"size": 1},
        "not-found": RemoteNotFound("gone"),
        "transient": RemoteUnavailable("503"),
    }[outcome]
    loader = Loader(result, delay=0.3)
    results = run_threads(16, lambda: cache.get("k", loader))
    assert loader.calls == 1
    if outcome == "value":
        assert all(r is result for r in results)  # every waiter gets the one answer
    else:
        assert all(isinstance(r, type(result)) for r in results)  # every waiter wakes with the error
    if outcome == "transient":
        loader.result, loader.delay = "recovered", 0
        assert cache.get("k", loader) == "recovered"


@pytest.mark.timeout(60)
def test_waiters_on_a_stuck_load_give_up_at_the_wait_timeout() -> None:
    """A load that never ends (a stuck server) holds its own caller, never the ones that wait for it."""
    cache = MetadataCache(maxsize=10, ttl=60, negative_ttl=60, wait_timeout=0.5)
    release = threading.Event()
    leader = threading.Thread(target=lambda: cache.get("k", lambda: release.wait(30)))
    leader.start()
    time.sleep(0.2)  # the leader's load is in flight
    try:
        started = time.monotonic()
        results = run_threads(4, lambda: cache.get("k", Loader("unused")))
        assert all(isinstance(r, RemoteUnavailable) and "waiting for another lookup" in str(r) for r in results)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        leader.join(10)
    assert cache.get("k", Loader("unused")) is True  # the leader's late answer was still cached


# -- against the emulator --------------------------------------------------------------------------


@pytest.fixture
def bucket(hub: HubEmulator) -> Iterator[Bucket]:
    hub.add_bucket("org/cache", {"neuronxcc-2/MODULE_1/model.neff": b"neff", "neuronxcc-2/MODULE_1/model.done": b""})
    http = HubHttp(hub.url, "", read_timeout=1, operation_timeout=8, max_retries=0)
    yield Bucket(http, "org/cache")
    http.close()


def paths_info_calls(hub: HubEmulator) -> int:
    return len(hub.requests("paths-info", "POST"))


def test_bucket_stats_through_the_cache(hub: HubEmulator, bucket: Bucket) -> None:
    cache = MetadataCache(maxsize=100, ttl=60, negative_ttl=0.3)

    def stat(path: str) -> object:
        return cache.get((bucket.cache_namespace, "stat", path), lambda: bucket.stat(path))

    for _ in range(3):
        assert stat("neuronxcc-2/MODULE_1/model.neff").size == 4
        with pytest.raises(RemoteNotFound):
            stat("neuronxcc-2/MODULE_1/model.log")  # the compiler's usual probe: a miss
    assert paths_info_calls(hub) == 2

    # A miss is only trusted briefly: the file appears upstream and is seen after the negative TTL.
    (hub.bucket_dir("org/cache") / "neuronxcc-2/MODULE_1/model.log").write_bytes(b"log")
    time.sleep(0.4)
    assert stat("neuronxcc-2/MODULE_1/model.log").size == 3
    assert paths_info_calls(hub) == 3

    # A transient failure is reported, not remembered.
    hub.faults.add("*/paths-info", "status", status=503, methods=("POST",))
    with pytest.raises(RemoteUnavailable):
        stat("neuronxcc-2/MODULE_1/model.done")
    hub.faults.clear()
    assert stat("neuronxcc-2/MODULE_1/model.done").size == 0


@pytest.mark.timeout(60)
def test_concurrent_bucket_misses_send_one_request(hub: HubEmulator, bucket: Bucket) -> None:
    cache = MetadataCache(maxsize=100, ttl=60, negative_ttl=60)
    hub.faults.add("*/paths-info", "latency", seconds=0.5, methods=("POST",))
    key = (bucket.cache_namespace, "stat", "neuronxcc-2/MODULE_1/model.neff")
    results = run_threads(16, lambda: cache.get(key, lambda: bucket.stat(key[2])))
    assert all(getattr(r, "size", None) == 4 for r in results)
    assert paths_info_calls(hub) == 1


def test_keys_hold_a_token_fingerprint_never_the_token(hub: HubEmulator, bucket: Bucket) -> None:
    http = HubHttp(hub.url, TEST_TOKEN)
    authed = Bucket(http, "org/cache")
    assert TEST_TOKEN not in authed.cache_namespace
    assert authed.cache_namespace != bucket.cache_namespace  # identities never share entries
    http.close()
