"""Shard-set read-ahead through real hub-cache mounts: opening one shard (or the index) of a 12-shard
checkpoint fetches the whole set in the background, each shard exactly once (emulator accounting), also
with two mounts on one cache directory; `--read-ahead off` and a too-small cache read nothing ahead.
Plus the shard-set rule itself, on plain data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.mount import status
from hffs_neuron.remote.base import RemoteEntry
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.views.shardsets import shard_set

MiB = 1024 * 1024
SHARDS = 12
SHARD_NAMES = [f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1)]


@pytest.fixture
def checkpoint(hub: HubEmulator) -> dict[str, bytes]:
    files = {name: os.urandom(2 * MiB + i) for i, name in enumerate(SHARD_NAMES)}
    weight_map = {f"layer{i}.weight": name for i, name in enumerate(SHARD_NAMES)}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b'{"model_type": "gpt2"}'
    files["other-00001-of-00002.bin"] = os.urandom(MiB)  # another set: never read ahead with this one
    files["other-00002-of-00002.bin"] = os.urandom(MiB)
    hub.add_repo("Org/Sharded", files)
    hub.reset_stats()
    return files


def mount_hub(mounts: Mounts, tmp_path: Path, name: str = "mnt", **options: object) -> Path:
    """A hub-cache mount on tmp_path/cache with its own backing dir; returns its snapshot dir."""
    backing = tmp_path / f"backing-{name}"
    backing.mkdir()
    return snapshot_dir(mounts("hub-cache", name=name, backing=str(backing), **options).mountpoint)


def snapshot_dir(mountpoint: str | os.PathLike) -> Path:
    repo = Path(mountpoint) / "models--Org--Sharded"
    commit = (repo / "refs" / "main").read_text()
    return repo / "snapshots" / commit


def wait_for_shards(hub: HubEmulator, checkpoint: dict[str, bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(hub.bytes_served(name) >= len(checkpoint[name]) for name in SHARD_NAMES):
            return
        time.sleep(0.2)
    missing = [n for n in SHARD_NAMES if hub.bytes_served(n) < len(checkpoint[n])]
    raise AssertionError(f"not read ahead within {timeout}s: {missing}")


def blob_count(cache: Path) -> int:
    return sum(1 for p in (cache / "blobs-store" / "blobs").glob("*/*") if p.is_file())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opened", [SHARD_NAMES[4], "model.safetensors.index.json"])
def test_opening_one_member_fetches_the_whole_set_once(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, checkpoint: dict[str, bytes], opened: str
) -> None:
    snap = mount_hub(mounts, tmp_path)
    assert (snap / opened).read_bytes() == checkpoint[opened]
    wait_for_shards(hub, checkpoint)
    deadline = time.monotonic() + 30
    while blob_count(tmp_path / "cache") < SHARDS + (opened not in SHARD_NAMES) and time.monotonic() < deadline:
        time.sleep(0.1)  # the last verified rename may follow the last byte
    for name in SHARD_NAMES:  # every member served exactly once, and right
        assert hub.bytes_served(name) == len(checkpoint[name]), name
        assert (snap / name).read_bytes() == checkpoint[name]
    assert all(hub.bytes_served(name) == len(checkpoint[name]) for name in SHARD_NAMES)  # reads were hits
    assert hub.bytes_served("other-") == 0 and hub.bytes_served("config.json") == 0
    time.sleep(1.5)  # the daemon records its state every second
    (state,) = status(tmp_path / "mnt")
    assert state["read_ahead"] == {"queued": 0, "in_flight": 0, "done": SHARDS - (opened in SHARD_NAMES)}


@pytest.mark.timeout(180)
def test_two_mounts_on_one_cache_read_ahead_each_shard_once(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, checkpoint: dict[str, bytes]
) -> None:
    hub.faults.add("*-of-00012.safetensors", "latency", seconds=0.2)  # keep transfers overlapping
    first, second = mount_hub(mounts, tmp_path, "a"), mount_hub(mounts, tmp_path, "b")
    assert (first / SHARD_NAMES[0]).read_bytes() == checkpoint[SHARD_NAMES[0]]
    assert (second / SHARD_NAMES[7]).read_bytes() == checkpoint[SHARD_NAMES[7]]
    wait_for_shards(hub, checkpoint)
    for name in SHARD_NAMES:
        assert (first / name).read_bytes() == checkpoint[name]
        assert (second / name).read_bytes() == checkpoint[name]
        assert hub.bytes_served(name) == len(checkpoint[name]), f"{name} transferred more than once"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", [{"read_ahead": "off"}, {"cache_size": "20M"}])
def test_no_read_ahead_when_off_or_when_it_does_not_fit(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, checkpoint: dict[str, bytes], options: dict
) -> None:
    snap = mount_hub(mounts, tmp_path, **options)
    assert (snap / SHARD_NAMES[0]).read_bytes() == checkpoint[SHARD_NAMES[0]]
    time.sleep(2)  # time enough for a read-ahead to start, were there one
    assert hub.bytes_served("-of-00012") == len(checkpoint[SHARD_NAMES[0]])
    # Nothing was lost: every other shard is still served on open.
    assert (snap / SHARD_NAMES[1]).read_bytes() == checkpoint[SHARD_NAMES[1]]


@pytest.mark.timeout(120)
def test_snapshot_mode_reads_every_file_ahead(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, checkpoint: dict[str, bytes]
) -> None:
    snap = mount_hub(mounts, tmp_path, read_ahead="snapshot")
    assert (snap / "config.json").read_bytes() == checkpoint["config.json"]
    deadline = time.monotonic() + 60
    while hub.bytes_served() < sum(map(len, checkpoint.values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for name, data in checkpoint.items():
        assert hub.bytes_served(name) == len(data), name


def _entries(*paths: str) -> dict[str, RemoteEntry]:
    return {p: RemoteEntry(path=p, is_dir=False, size=10, content_id=f"id{i:08d}") for i, p in enumerate(paths)}


def test_shard_set_rule() -> None:
    bins = [f"sub/pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)]
    files = _entries(
        *bins, "sub/pytorch_model.bin.index.json", "sub/a.bin", "sub/b.bin", "sub/w.index.json", "top.txt",
        "other/pytorch_model-00001-of-00003.bin", "sub/pytorch_model-00001-of-00004.bin",
    )  # fmt: skip
    indexes = {
        "sub/pytorch_model.bin.index.json": json.dumps(
            {"weight_map": {"x": "pytorch_model-00001-of-00003.bin", "y": "pytorch_model-00002-of-00003.bin"}}
        ),
        "sub/w.index.json": json.dumps({"weight_map": {"x": "a.bin", "y": "b.bin", "z": "../escape.bin"}}),
    }

    def read(entry: RemoteEntry) -> bytes:
        return indexes[entry.path].encode()

    # Numbered names: same prefix, count and extension, same directory only.
    assert shard_set(bins[1], files, read) == bins
    # An index names its members (pytorch_model.bin indexes too).
    assert shard_set("sub/pytorch_model.bin.index.json", files, read) == bins[:2]
    # Un-numbered members are found through an index of their directory; nothing escapes it.
    assert shard_set("sub/a.bin", files, read) == ["sub/a.bin", "sub/b.bin"]
    assert shard_set("top.txt", files, read) == []


def test_read_ahead_and_connection_knobs_three_ways() -> None:
    from hffs_neuron.config import MountConfig, validate_config
    from hffs_neuron.errors import UsageError
    from mountctl.cli import build_parser, mount_helper_argv

    argv, _ = mount_helper_argv(["hub-cache", "/mnt/hf", "-o", "read_ahead=off,max_connections=4"])
    assert argv[argv.index("--read-ahead") + 1] == "off" and argv[argv.index("--max-connections") + 1] == "4"
    args = build_parser().parse_args(argv)
    assert (args.read_ahead, args.max_connections) == ("off", 4)
    for bad in ({"read_ahead": "all"}, {"max_connections": 0}):
        with pytest.raises(UsageError):
            validate_config(MountConfig(view="hub-cache", mountpoint="/mnt/hf", **bad))


@pytest.mark.timeout(60)
def test_blobs_read_ahead_are_protected_from_eviction_until_opened(hub: HubEmulator, tmp_path: Path) -> None:
    from hffs_neuron.remote import HubHttp, HubRepo
    from hffs_neuron.store import BlobStore

    files = {"a.bin": os.urandom(MiB), "b.bin": os.urandom(MiB)}
    hub.add_repo("Org/Protect", files)
    http = HubHttp(hub.url, "", read_timeout=5, operation_timeout=10)
    repo = HubRepo(http, "model", "Org/Protect")
    store = BlobStore(tmp_path / "store", max_connections=2, timeout=10)
    try:
        a, b = repo.stat("a.bin"), repo.stat("b.bin")
        store.prefetch(a.content_id or "", repo, a)
        deadline = time.monotonic() + 30
        while store.scheduler.read_ahead_status()["done"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.materialize(b.content_id or "", repo, b)  # an ordinary fetch, not open any more
        store.evict_if_needed(0)
        assert store.has(a.content_id or "") and not store.has(b.content_id or "")  # a: read ahead, kept
        store.materialize(a.content_id or "", repo, a)  # opened now: an ordinary LRU blob again
        store.evict_if_needed(0)
        assert not store.has(a.content_id or "")
    finally:
        store.close()
        http.close()


@pytest.mark.timeout(60)
def test_a_read_ahead_hit_keeps_the_protection_another_mounts_read_ahead_gave(hub: HubEmulator, tmp_path: Path) -> None:
    """Two mounts on one cache read the same blob ahead: the second one's hit must not turn the first
    one's protection (a future mtime) into an ordinary LRU use (issue 26)."""
    from hffs_neuron.remote import HubHttp, HubRepo
    from hffs_neuron.store import BlobStore
    from hffs_neuron.store.scheduler import READ_AHEAD

    hub.add_repo("Org/Protect", {"a.bin": os.urandom(MiB)})
    http = HubHttp(hub.url, "", read_timeout=5, operation_timeout=10)
    repo = HubRepo(http, "model", "Org/Protect")
    first, second = (BlobStore(tmp_path / "store", max_connections=2, timeout=10) for _ in range(2))
    try:
        a = repo.stat("a.bin")
        path = first.materialize(a.content_id or "", repo, a, READ_AHEAD)
        protected_until = path.stat().st_mtime
        assert protected_until > time.time() + 60
        assert second.materialize(a.content_id or "", repo, a, READ_AHEAD) == path  # a hit
        assert path.stat().st_mtime >= protected_until
        second.evict_if_needed(0)
        assert path.exists()
    finally:
        first.close()
        second.close()
        http.close()


def test_a_transfer_refused_at_shutdown_closes_the_descriptor_it_was_given(tmp_path: Path) -> None:
    """The scheduler owns the descriptor `start` is given, also when it refuses the transfer (issue 26)."""
    import errno

    from hffs_neuron.errors import RemoteUnavailable
    from hffs_neuron.store.scheduler import TransferScheduler

    scheduler = TransferScheduler(2, chunk_size=MiB, parallel_threshold=64 * MiB, timeout=5)
    scheduler.close()
    fd = os.open(tmp_path / "temp", os.O_RDWR | os.O_CREAT, 0o600)
    with pytest.raises(RemoteUnavailable):
        scheduler.start("x.bin", 10, fd, lambda start, end, sink, deadline: None)
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


@pytest.mark.timeout(120)
def test_a_read_ahead_flood_on_two_slow_connections_never_fails_an_open(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path
) -> None:
    """Two transfer connections at 2 MB/s, both busy reading ahead 8 MiB blobs (4 s a piece, over the
    3 s --timeout): an open of another file gets a connection at once, because a read-ahead piece hands
    the rest of its range back when a foreground transfer waits (issue 26)."""
    files = {f"ahead-{i}.bin": os.urandom(8 * MiB + i) for i in range(6)}
    files["wanted.bin"] = os.urandom(MiB)
    hub.add_repo("Org/Flood", files)
    hub.set_network(conn_mbps=2)
    timeout = 3
    try:
        # max_connections 4: two transfer connections (two are kept for metadata).
        backing = tmp_path / "backing"
        backing.mkdir()
        handle = mounts("hub-cache", backing=str(backing), read_ahead="snapshot", max_connections=4, timeout=timeout)
        repo = Path(handle.mountpoint) / "models--Org--Flood"
        snap = repo / "snapshots" / (repo / "refs" / "main").read_text()
        with open(snap / "ahead-0.bin", "rb") as first:  # opening it reads the rest of the snapshot ahead
            first.read(1)
            deadline = time.monotonic() + 30
            while status(handle.mountpoint)[0]["read_ahead"]["in_flight"] < 2:
                assert time.monotonic() < deadline, "the read-ahead never filled both connections"
                time.sleep(0.1)
            time.sleep(0.5)  # both connections are inside 4 s read-ahead pieces now
            start = time.monotonic()
            assert (snap / "wanted.bin").read_bytes() == files["wanted.bin"]
            assert time.monotonic() - start < timeout + 2
    finally:
        hub.set_network(None)
    assert hub.bytes_served("wanted.bin") == len(files["wanted.bin"])
