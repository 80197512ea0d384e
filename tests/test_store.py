"""BlobStore against the local Hub emulator: exact bytes, one transfer across threads and processes,
verification, crash safety, bounded failures, eviction and restarts. Real HTTP, real processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TEST_TOKEN

from hffs_neuron.errors import HffsError, IntegrityError, RemoteAccessDenied, RemoteUnavailable
from hffs_neuron.remote import Bucket, HubHttp, HubRepo
from hffs_neuron.store import BlobStore
from hffs_neuron.testing.hub_emulator import HubEmulator

MiB = 1024 * 1024
CONFIG = b'{"model_type": "llama", "hidden_size": 8}'
SMALL_LFS = os.urandom(300 * 1024)
MEDIUM = os.urandom(12 * MiB + 123)  # parallel ranges with a 1 MiB chunk size, last range short


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_http(url: str, token: str = "", **kwargs: object) -> HubHttp:
    """Short deadlines so failure paths finish in seconds (token "" is anonymous)."""
    options: dict = dict(connect_timeout=2, read_timeout=1, operation_timeout=8, max_retries=3)
    options.update(kwargs)
    return HubHttp(url, token, **options)


def make_store(root: str | os.PathLike, **kwargs: object) -> BlobStore:
    """Small chunks so that files of a few MiB already take the parallel Range path."""
    options: dict = dict(chunk_size=MiB, max_connections=4, parallel_threshold=2 * MiB)
    options.update(kwargs)
    return BlobStore(root, **options)


def fetch(store: BlobStore, remote: HubRepo | Bucket, path: str) -> Path:
    entry = remote.stat(path)
    assert entry.content_id
    return store.materialize(entry.content_id, remote, entry)


def store_files(root: Path, sub: str) -> list[Path]:
    return [p for p in (root / sub).rglob("*") if p.is_file()]


@pytest.fixture
def repo_files() -> dict[str, bytes]:
    return {
        "config.json": CONFIG,
        "empty.txt": b"",
        "empty.bin": b"",  # an empty LFS file
        "model.safetensors": SMALL_LFS,
        "medium.bin": MEDIUM,
        "sub/dir/vocab.txt": b"a\nb\nc\n",
    }


@pytest.fixture
def repo(hub: HubEmulator, repo_files: dict[str, bytes]) -> Iterator[HubRepo]:
    hub.add_repo("Org/Model", repo_files)
    http = make_http(hub.url)
    yield HubRepo(http, "model", "Org/Model")
    http.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    s = make_store(tmp_path / "store")
    yield s
    s.close()


# -- bytes -------------------------------------------------------------------------------------------


def test_bytes_identical_and_fetched_once(
    hub: HubEmulator, repo: HubRepo, store: BlobStore, repo_files: dict[str, bytes]
) -> None:
    for name, data in repo_files.items():
        entry = repo.stat(name)
        path = store.materialize(entry.content_id, repo, entry)
        assert path.read_bytes() == data, name
        assert path.name == entry.content_id  # keyed by content identity (git sha1 / LFS sha256)
        assert not os.access(path, os.W_OK) or os.geteuid() == 0
        assert path.stat().st_mode & 0o222 == 0  # complete blobs are immutable
    served = hub.bytes_served()
    assert served == sum(len(d) for d in repo_files.values())
    fetches = store.stats.fetches
    for name in repo_files:  # second round: all hits, nothing upstream
        assert fetch(store, repo, name).read_bytes() == repo_files[name]
    assert hub.bytes_served() == served and store.stats.fetches == fetches
    assert store.stats.hits == len(repo_files)
    ranged = [r for r in hub.requests("medium.bin", "GET") if r.range_header]
    assert len(ranged) == 13  # 12 MiB + 123 bytes in 1 MiB chunks
    assert store_files(store.root, "tmp") == []


def test_lfs_redirect_and_dataset(hub: HubEmulator, store: BlobStore) -> None:
    hub.add_repo("Org/Data", {"train.bin": MEDIUM, "README.md": b"# data"}, repo_type="dataset")
    hub.redirect_lfs = True
    http = make_http(hub.url)
    data = HubRepo(http, "dataset", "Org/Data")
    assert fetch(store, data, "train.bin").read_bytes() == MEDIUM
    assert fetch(store, data, "README.md").read_bytes() == b"# data"
    assert hub.bytes_served("/lfs/") == len(MEDIUM)
    http.close()


def test_bucket_blobs(hub: HubEmulator, store: BlobStore) -> None:
    files = {"neuronxcc-2/MODULE_1/model.neff": MEDIUM, "neuronxcc-2/MODULE_1/model.done": b""}
    hub.add_bucket("org/cache", files)
    http = make_http(hub.url)
    bucket = Bucket(http, "org/cache")
    for name, data in files.items():
        assert fetch(store, bucket, name).read_bytes() == data
    assert hub.bytes_served() == len(MEDIUM)
    http.close()


@pytest.mark.timeout(300)
def test_big_file_parallel_ranges(hub: HubEmulator, tmp_path: Path) -> None:
    size = 256 * MiB + 4097
    source = tmp_path / "big.safetensors"
    with open(source, "wb") as f:  # sparse, with a few random regions (start, middle, unaligned end)
        f.truncate(size)
        for offset in (0, 100 * MiB + 3, size - MiB - 5):
            f.seek(offset)
            f.write(os.urandom(MiB))
    expected = sha256_of(source)
    hub.add_repo("Org/Big", {"model.safetensors": source})  # a Path: linked into the emulator, not copied
    http = make_http(hub.url, read_timeout=10, operation_timeout=120)
    repo = HubRepo(http, "model", "Org/Big")
    store = make_store(tmp_path / "store", chunk_size=8 * MiB, max_connections=4, parallel_threshold=16 * MiB)
    try:
        path = fetch(store, repo, "model.safetensors")
        assert path.stat().st_size == size
        assert sha256_of(path) == expected
        assert hub.bytes_served("model.safetensors") == size
        ranges = sorted(
            tuple(int(x) for x in r.range_header.removeprefix("bytes=").split("-"))
            for r in hub.requests("model.safetensors", "GET")
        )
        assert [start for start, _ in ranges] == [0] + [end + 1 for _, end in ranges[:-1]]  # one tiling
        assert ranges[-1][1] == size - 1
        lengths = [end + 1 - start for start, end in ranges]
        # Whole 8 MiB pieces while every connection can still get one; then the tail (under 4 x 8 MiB) is
        # cut smaller, so that the 4 connections share it instead of one finishing alone.
        assert lengths[:29] == [8 * MiB] * 29
        assert sum(lengths[29:]) == size - 29 * 8 * MiB < 4 * 8 * MiB
        assert len(lengths) > 33 and max(lengths[29:]) < 8 * MiB
    finally:
        store.close()
        http.close()


# -- single flight -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_single_flight_threads(hub: HubEmulator, repo: HubRepo, store: BlobStore) -> None:
    hub.faults.add("*/medium.bin", "latency", seconds=0.5, count=1)  # keep the first fetch in flight
    entry = repo.stat("medium.bin")
    with ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(lambda _: store.materialize(entry.content_id, repo, entry), range(16)))
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == MEDIUM
    assert hub.bytes_served("medium.bin") == len(MEDIUM)
    assert store.stats.fetches == 1


def _child_materialize(
    url: str, root: str, repo_id: str, name: str, threads: int, barrier: object, results: object
) -> None:
    """One process of the multi-process single-flight test: `threads` threads materialize `name`."""
    try:
        http = make_http(url, read_timeout=10, operation_timeout=60)
        repo = HubRepo(http, "model", repo_id)
        entry = repo.stat(name)
        store = make_store(root)
        barrier.wait(60)  # type: ignore[attr-defined]
        with ThreadPoolExecutor(threads) as pool:
            paths = list(pool.map(lambda _: store.materialize(entry.content_id, repo, entry), range(threads)))
        results.put((os.getpid(), [sha256_of(p) for p in paths], store.stats.fetches))  # type: ignore[attr-defined]
        store.close()
    except BaseException as exc:  # report instead of dying silently
        results.put((os.getpid(), repr(exc), -1))  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_single_flight_across_processes(hub: HubEmulator, repo: HubRepo, tmp_path: Path) -> None:
    processes, threads = 8, 4
    hub.faults.add("*/medium.bin", "latency", seconds=1, count=1)  # the fetch outlasts the others' start
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    args = (hub.url, str(tmp_path / "store"), "Org/Model", "medium.bin", threads, barrier, results)
    children = [ctx.Process(target=_child_materialize, args=args) for _ in range(processes)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=150) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    expected = hashlib.sha256(MEDIUM).hexdigest()
    for pid, digests, _ in outcomes:
        assert digests == [expected] * threads, (pid, digests)
    assert sum(fetches for _, _, fetches in outcomes) == 1  # one process fetched, the others waited
    assert hub.bytes_served("medium.bin") == len(MEDIUM)  # the emulator served it exactly once


@pytest.mark.timeout(60)
def test_waiters_wake_with_the_error(hub: HubEmulator, tmp_path: Path) -> None:
    hub.add_repo("Org/Gated", {"model.safetensors": SMALL_LFS, "config.json": CONFIG}, gated=True)
    anonymous = make_http(hub.url)
    repo = HubRepo(anonymous, "model", "Org/Gated")
    store = make_store(tmp_path / "store")
    hub.faults.add("*/model.safetensors", "latency", seconds=0.5, count=1)
    entry = repo.stat("model.safetensors")

    def attempt(_: int) -> object:
        try:
            return store.materialize(entry.content_id, repo, entry)
        except HffsError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert all(isinstance(o, RemoteAccessDenied) and o.errno == errno.EACCES for o in outcomes)
    assert store_files(store.root, "blobs") == [] and store_files(store.root, "tmp") == []

    authed = make_http(hub.url, TEST_TOKEN)
    repo = HubRepo(authed, "model", "Org/Gated")
    assert fetch(store, repo, "model.safetensors").read_bytes() == SMALL_LFS
    store.close()
    anonymous.close()
    authed.close()


# -- crash safety --------------------------------------------------------------------------------------


def _child_fetch(url: str, root: str, repo_id: str, name: str) -> None:
    """Fetch `name` into the store at `root` (the parent kills this process mid-transfer)."""
    http = make_http(url, read_timeout=120, operation_timeout=300)
    repo = HubRepo(http, "model", repo_id)
    fetch(make_store(root, max_connections=2), repo, name)


@pytest.mark.timeout(120)
def test_kill_9_mid_fetch_leaves_nothing_trusted(hub: HubEmulator, repo: HubRepo, tmp_path: Path) -> None:
    root = tmp_path / "store"
    entry = repo.stat("medium.bin")
    # One range of the child's fetch hangs; the others land in its temp file: a half-written blob.
    hub.faults.add("*/medium.bin", "latency", seconds=60, count=1)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_child_fetch, args=(hub.url, str(root), "Org/Model", "medium.bin"))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while hub.bytes_served("medium.bin") < 2 * MiB:
            assert time.monotonic() < deadline and child.is_alive(), "the child never started its fetch"
            time.sleep(0.05)

        # Meanwhile a reader in this process asks for the same blob: it waits on the child's claim.
        store = make_store(root)
        waiter: dict[str, object] = {}

        def read() -> None:
            try:
                waiter["path"] = store.materialize(entry.content_id, repo, entry)
            except BaseException as exc:  # noqa: BLE001 - checked below
                waiter["error"] = exc

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive() and not store.has(entry.content_id)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    # The claimant is a dead process of this host: the waiter fetched it itself, complete and verified.
    reader.join(60)
    assert not reader.is_alive() and "error" not in waiter, waiter
    assert Path(str(waiter["path"])).read_bytes() == MEDIUM
    store.close()
    # The dead writer's partial temp file was never renamed into blobs/; a restart removes it.
    leftovers = [p for p in store_files(root, "tmp") if f".{child.pid}." in p.name]
    assert leftovers, "expected the killed writer's temp file"
    assert not (root / "locks" / f"{entry.content_id}.claim").exists()  # the dead writer's claim was taken over
    restarted = make_store(root)
    assert store_files(root, "tmp") == []
    assert [p.name for p in store_files(root, "blobs")] == [entry.content_id]
    served = hub.bytes_served("medium.bin")
    assert fetch(restarted, repo, "medium.bin").read_bytes() == MEDIUM
    assert hub.bytes_served("medium.bin") == served  # a hit: nothing fetched again
    restarted.close()


def test_restart_keeps_blobs_and_cleans_temp_files(hub: HubEmulator, repo: HubRepo, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = make_store(root)
    entry = repo.stat("model.safetensors")
    fetch(store, repo, "model.safetensors")
    store.close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (root / "tmp" / f"{entry.content_id}.{dead.pid}.0badc0de").write_bytes(SMALL_LFS[:100])
    (root / "tmp" / "garbage").write_bytes(b"?")
    live = root / "tmp" / f"{entry.content_id}.1.0badc0de"  # pid 1 is alive: its writer may still run
    live.write_bytes(b"partial")
    served = hub.bytes_served()

    restarted = make_store(root)
    assert store_files(root, "tmp") == [live]
    assert fetch(restarted, repo, "model.safetensors").read_bytes() == SMALL_LFS
    assert hub.bytes_served() == served and restarted.stats.hits == 1
    restarted.close()


# -- damaged, cut or refused transfers ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "medium.bin"])
def test_corrupt_bytes_are_refetched(
    hub: HubEmulator, repo: HubRepo, store: BlobStore, repo_files: dict, name: str
) -> None:
    hub.faults.add(f"*/{name}", "corrupt", count=1)
    assert fetch(store, repo, name).read_bytes() == repo_files[name]
    assert hub.bytes_served(name) > len(repo_files[name])  # the damaged transfer was thrown away


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "medium.bin"])
def test_persistently_corrupt_bytes_are_never_served(
    hub: HubEmulator, repo: HubRepo, store: BlobStore, repo_files: dict, name: str
) -> None:
    hub.faults.add(f"*/{name}", "corrupt")
    entry = repo.stat(name)
    for _ in range(2):
        with pytest.raises(IntegrityError) as info:
            store.materialize(entry.content_id, repo, entry)
        assert info.value.errno == errno.EIO
        assert not store.has(entry.content_id)
        assert store_files(store.root, "tmp") == []
    hub.faults.clear()
    assert fetch(store, repo, name).read_bytes() == repo_files[name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kind,options",
    [
        ("status", {"status": 503, "count": 3}),
        ("reset", {"count": 3}),
        ("truncate", {"count": 3}),
        ("stall", {"seconds": 3, "count": 2}),
        ("status", {"status": 429, "count": 2, "retry_after": 0.5}),
    ],
)
def test_transient_failures_are_retried(
    hub: HubEmulator, repo: HubRepo, store: BlobStore, kind: str, options: dict
) -> None:
    hub.faults.add("*/medium.bin", kind, **options)
    hub.faults.add("*/model.safetensors", kind, **options)
    assert fetch(store, repo, "medium.bin").read_bytes() == MEDIUM
    assert fetch(store, repo, "model.safetensors").read_bytes() == SMALL_LFS


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "kind,options",
    [("status", {"status": 503}), ("reset", {}), ("truncate", {}), ("stall", {"seconds": 3})],
)
@pytest.mark.parametrize("name", ["medium.bin"])  # parallel ranges; single GETs: see test_remote.py
def test_persistent_failures_are_bounded_eio(
    hub: HubEmulator, repo_files: dict, tmp_path: Path, kind: str, options: dict, name: str
) -> None:
    hub.add_repo("Org/Model", repo_files)
    http = make_http(hub.url, max_retries=2)
    repo = HubRepo(http, "model", "Org/Model")
    store = make_store(tmp_path / "store")
    hub.faults.add(f"*/{name}", kind, **options)
    entry = repo.stat(name)
    with pytest.raises(RemoteUnavailable) as info:
        store.materialize(entry.content_id, repo, entry)
    assert info.value.errno == errno.EIO
    assert not store.has(entry.content_id) and store_files(store.root, "tmp") == []
    assert store.in_flight() == []
    store.close()
    http.close()


@pytest.mark.timeout(60)
def test_changed_bucket_file_is_never_served_short(hub: HubEmulator, store: BlobStore) -> None:
    directory = hub.add_bucket("org/cache", {"model.neff": MEDIUM})
    http = make_http(hub.url, max_retries=1)
    bucket = Bucket(http, "org/cache")
    entry = bucket.stat("model.neff")
    (directory / "model.neff").write_bytes(MEDIUM[: 3 * MiB])  # rewritten upstream after the listing
    with pytest.raises(HffsError) as info:
        store.materialize(entry.content_id, bucket, entry)
    assert info.value.errno == errno.EIO
    assert not store.has(entry.content_id) and store_files(store.root, "tmp") == []
    http.close()


# -- auth -------------------------------------------------------------------------------------------


def test_token_absent_from_logs_and_store(hub: HubEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub.add_repo("Org/Gated", {"model.safetensors": SMALL_LFS, "medium.bin": MEDIUM, "config.json": CONFIG}, gated=True)
    hub.faults.add("*/resolve/*", "status", status=503, count=2)
    hub.faults.add("*/resolve/*", "corrupt", count=1)
    http = make_http(hub.url, TEST_TOKEN)
    repo = HubRepo(http, "model", "Org/Gated")
    store = make_store(tmp_path / "store")
    for name in ("model.safetensors", "medium.bin", "config.json"):
        fetch(store, repo, name)
    assert "retry" in caplog.text and "fetched" in caplog.text
    assert TEST_TOKEN not in caplog.text
    for path in store.root.rglob("*"):
        assert TEST_TOKEN not in str(path)
        if path.is_file():
            assert TEST_TOKEN.encode() not in path.read_bytes()
    store.close()
    http.close()


# -- progress ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_progress_is_observable(hub: HubEmulator, repo: HubRepo, store: BlobStore) -> None:
    hub.faults.add("*/medium.bin", "latency", seconds=1.5, count=1)  # the first range is slow
    entry = repo.stat("medium.bin")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (store.materialize(entry.content_id, repo, entry), done.set()))
    thread.start()
    seen = []
    while not done.is_set():
        seen += [p for p in store.in_flight() if p.done > 0]
        time.sleep(0.02)
    thread.join(30)
    assert seen, "progress was never reported"
    assert all(p.name == "medium.bin" and p.total == len(MEDIUM) and p.done <= p.total for p in seen)
    assert store.in_flight() == []
    assert store.stats.bytes_fetched == len(MEDIUM)


# -- size limit and eviction ------------------------------------------------------------------------


@pytest.fixture
def trio(hub: HubEmulator) -> Iterator[tuple[HubRepo, dict[str, bytes]]]:
    files = {f"w{i}.bin": os.urandom(64 * 1024) for i in range(3)}
    hub.add_repo("Org/Trio", files)
    http = make_http(hub.url)
    yield HubRepo(http, "model", "Org/Trio"), files
    http.close()


def test_lru_eviction_spares_pinned_blobs(trio: tuple[HubRepo, dict[str, bytes]], store: BlobStore) -> None:
    repo, files = trio
    blob = 64 * 1024
    for name in files:
        fetch(store, repo, name)
        time.sleep(0.05)  # distinct use times
    fetch(store, repo, "w0.bin")  # used again: now the most recent
    assert store.evict_if_needed(2 * blob) == blob
    assert not store.has(repo.stat("w1.bin").content_id)  # the least recently used went first
    assert store.has(repo.stat("w0.bin").content_id) and store.has(repo.stat("w2.bin").content_id)

    entry = repo.stat("w2.bin")
    fd, unpin = store.open_blob(entry.content_id, repo, entry)
    try:
        store.evict_if_needed(0)
        assert store.has(entry.content_id)  # open: never evicted
        assert not store.has(repo.stat("w0.bin").content_id)
        assert os.pread(fd, blob, 0) == files["w2.bin"]
    finally:
        os.close(fd)
        unpin()
    store.evict_if_needed(0)
    assert store.usage() == 0 and store.stats.evictions == 3


def test_size_limit_is_enforced_after_fetches(
    hub: HubEmulator, trio: tuple[HubRepo, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, files = trio
    store = make_store(tmp_path / "store", max_size=2 * 64 * 1024)
    for name in files:
        fetch(store, repo, name)
        time.sleep(0.05)
        assert store.usage() <= 2 * 64 * 1024
    assert store.has(repo.stat("w2.bin").content_id)  # the newest one stays
    assert store.stats.evictions == 1
    store.close()


@pytest.mark.timeout(90)
def test_eviction_under_concurrent_reads(
    hub: HubEmulator, trio: tuple[HubRepo, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, files = trio
    readers_store = make_store(tmp_path / "store")
    evictor_store = make_store(tmp_path / "store")  # a second instance: only the fcntl pins protect
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(i: int) -> int:
        reads = 0
        for n in range(25):
            name = f"w{(i + n) % 3}.bin"
            entry = repo.stat(name)
            fd, unpin = readers_store.open_blob(entry.content_id, repo, entry)
            try:
                time.sleep(0.002)  # hold it open while the evictor runs
                assert os.pread(fd, entry.size + 1, 0) == files[name]
                reads += 1
            finally:
                os.close(fd)
                unpin()
        return reads

    def evictor() -> None:
        try:
            while not stop.is_set():
                evictor_store.evict_if_needed(0)
                time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=evictor)
    thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            assert sum(pool.map(reader, range(4))) == 100
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    assert evictor_store.stats.evictions > 0  # it really raced with the readers
    readers_store.close()
    evictor_store.close()


def _child_hold_open(url: str, root: str, repo_id: str, name: str, opened: object, release: object) -> None:
    """Keep blob `name` open (pinned) in this process's own store until `release` is set."""
    http = make_http(url)
    repo = HubRepo(http, "model", repo_id)
    store = make_store(root)
    entry = repo.stat(name)
    fd, unpin = store.open_blob(entry.content_id, repo, entry)
    opened.set()  # type: ignore[attr-defined]
    release.wait(60)  # type: ignore[attr-defined]
    os.close(fd)
    unpin()
    store.close()


@pytest.mark.timeout(120)
def test_two_processes_share_one_store(
    hub: HubEmulator, trio: tuple[HubRepo, dict[str, bytes]], tmp_path: Path
) -> None:
    repo, files = trio
    root = tmp_path / "store"
    store = make_store(root)
    fetch(store, repo, "w0.bin")
    ctx = multiprocessing.get_context("spawn")
    opened, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_child_hold_open, args=(hub.url, str(root), "Org/Trio", "w1.bin", opened, release))
    child.start()
    try:
        assert opened.wait(60)
        served = hub.bytes_served()
        # The child's blob is visible here without a transfer, and its pin holds against our eviction.
        assert fetch(store, repo, "w1.bin").read_bytes() == files["w1.bin"]
        assert hub.bytes_served() == served
        store.evict_if_needed(0)
        assert store.has(repo.stat("w1.bin").content_id)
        assert not store.has(repo.stat("w0.bin").content_id)
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    store.evict_if_needed(0)
    assert store.usage() == 0
    store.close()


@pytest.mark.timeout(60)
def test_a_waiting_pin_does_not_stall_other_fetches(
    hub: HubEmulator, trio: tuple[HubRepo, dict[str, bytes]], store: BlobStore
) -> None:
    repo, files = trio
    busy = repo.stat("w0.bin")
    fetch(store, repo, "w0.bin")
    # Another holder (a fetch or an eviction elsewhere) has the key's lock exclusively for a while.
    holder = os.open(store.root / "locks" / f"{busy.content_id}.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    pinning = threading.Thread(target=store.pin, args=(busy.content_id,))
    pinning.start()
    try:
        time.sleep(0.2)
        assert pinning.is_alive()  # the pin waits for the holder...
        other = threading.Thread(target=fetch, args=(store, repo, "w1.bin"))
        other.start()
        other.join(20)
        assert not other.is_alive()  # ...and nothing else in this store waits with it
        assert store.has(repo.stat("w1.bin").content_id)
    finally:
        os.close(holder)
        pinning.join(20)
    assert not pinning.is_alive()
    store.evict_if_needed(0)
    assert store.has(busy.content_id)  # the pin, once taken, protects the blob
    store.unpin(busy.content_id)
