"""A cache disk too small for a blob: evict what is not in use to make room, else ENOSPC (never EIO), a
log line naming the cache directory, the size needed and what is free, no temp file left, and every
other file still served. The cache dir is a real 8 MiB tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.errors import CacheFull
from hffs_neuron.remote import Bucket, HubHttp
from hffs_neuron.store import BlobStore
from hffs_neuron.testing.hub_emulator import HubEmulator

pytestmark = pytest.mark.timeout(120)

BUCKET = "ops-team/small-disk"
MODULE = "neuronxcc-2.21.18209.0+043b1bf7/MODULE_{}+abcdef01"
MIB = 1024 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root); unmounted after the test's mounts are gone."""
    disk = tmp_path / "tiny"
    disk.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def _files(hub: HubEmulator) -> dict[str, bytes]:
    files = {
        f"{MODULE.format(1)}/model.neff": os.urandom(12 * MIB),  # bigger than the disk
        f"{MODULE.format(2)}/model.neff": os.urandom(5 * MIB),
        f"{MODULE.format(3)}/model.neff": os.urandom(5 * MIB),
        f"{MODULE.format(4)}/model.neff": os.urandom(1000),
    }
    for name in list(files):
        files[name.replace("model.neff", "model.done")] = b""
    hub.add_bucket(BUCKET, files)
    return files


def _status(env: dict[str, str], mp: Path) -> dict:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mountctl"), "status", str(mp), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out)["mounts"][0]


def test_blob_bigger_than_the_cache_disk_is_enospc(
    tiny_disk: Path, hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    files = _files(hub)
    mp = Path(mounts("neff", BUCKET, cache_dir=str(tiny_disk)).mountpoint)
    big = f"{MODULE.format(1)}/model.neff"
    with pytest.raises(OSError) as info:
        (mp / big).read_bytes()
    assert info.value.errno == errno.ENOSPC

    store = tiny_disk / "blobs-store"
    assert list((store / "tmp").iterdir()) == []  # nothing half-written stays behind
    log = "".join(p.read_text() for p in Path(runtime_env["HFFS_RUNTIME_DIR"]).glob("*.log"))
    line = next(line for line in log.splitlines() if "no room" in line)
    assert str(store) in line and f"needs {12 * MIB} bytes" in line and " free" in line

    # Everything else keeps working, and the failure is counted by errno.
    small = f"{MODULE.format(4)}/model.neff"
    assert (mp / small).read_bytes() == files[small]
    assert os.stat(mp / big).st_size == 12 * MIB
    assert _status(runtime_env, mp)["counters"]["errors"]["ENOSPC"] == 1


def test_unused_blobs_are_evicted_to_make_room_but_open_ones_never(
    tiny_disk: Path, hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    files = _files(hub)
    mp = Path(mounts("neff", BUCKET, cache_dir=str(tiny_disk)).mountpoint)
    first, second = (f"{MODULE.format(n)}/model.neff" for n in (2, 3))
    assert (mp / first).read_bytes() == files[first]  # 5 of 8 MiB, closed again
    assert (mp / second).read_bytes() == files[second]  # fits only once `first` is evicted
    assert _status(runtime_env, mp)["counters"]["evictions"] == 1

    with open(mp / second, "rb") as held:  # in use: never evicted, so `first` cannot come back
        with pytest.raises(OSError) as info:
            (mp / first).read_bytes()
        assert info.value.errno == errno.ENOSPC
        assert held.read() == files[second]
    assert list((tiny_disk / "blobs-store" / "tmp").iterdir()) == []
    assert (mp / first).read_bytes() == files[first]  # closed: now it can make room again


@pytest.mark.parametrize("bound", ["disk", "limit"])
def test_impossible_size_fails_at_once_and_evicts_nothing(
    request: pytest.FixtureRequest,
    hub: HubEmulator,
    mounts: Mounts,
    runtime_env: dict[str, str],
    tmp_path: Path,
    bound: str,
) -> None:
    """A blob over free space plus every unused blob (the 8 MiB disk), or over --cache-size (on a big disk),
    is ENOSPC before any eviction: the unused blobs already cached all stay."""
    files = _files(hub)
    if bound == "disk":
        tiny_disk = request.getfixturevalue("tiny_disk")
        handle = mounts("neff", BUCKET, cache_dir=str(tiny_disk))
        store = tiny_disk / "blobs-store"
    else:
        handle = mounts("neff", BUCKET, cache_size="8M")
        store = tmp_path / "cache" / "blobs-store"
    mp = Path(handle.mountpoint)
    cached = [f"{MODULE.format(n)}/model.neff" for n in (2, 4)]
    for name in cached:
        assert (mp / name).read_bytes() == files[name]  # closed: unused, evictable
    blobs = sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 2

    with pytest.raises(OSError) as info:
        (mp / f"{MODULE.format(1)}/model.neff").read_bytes()  # 12 MiB
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file()) == blobs
    assert _status(runtime_env, mp)["counters"]["evictions"] == 0
    log = "".join(p.read_text() for p in Path(runtime_env["HFFS_RUNTIME_DIR"]).glob("*.log"))
    reason = "plus every blob not in use" if bound == "disk" else "more than the cache size limit"
    assert reason in log
    assert all((mp / name).read_bytes() == files[name] for name in cached)


@pytest.mark.parametrize("parallel", [False, True], ids=["one-stream", "parallel-ranges"])
def test_disk_filling_up_during_a_transfer_is_enospc(tiny_disk: Path, hub: HubEmulator, parallel: bool) -> None:
    """Room at the start, none by the time the bytes arrive (another writer took it): ENOSPC."""
    data = os.urandom(6 * MIB)
    hub.add_bucket(BUCKET, {"neuronxcc-2/MODULE_9/model.neff": data})
    hub.faults.add("*/resolve/*", "latency", seconds=1.5)
    http = HubHttp(hub.url, "", operation_timeout=20)
    store = BlobStore(tiny_disk / "store", chunk_size=MIB, parallel_threshold=2 * MIB if parallel else 64 * MIB)
    filler = tiny_disk / "someone-else"

    def fill_once_the_transfer_started() -> None:
        while not hub.requests("/resolve/"):
            time.sleep(0.02)
        with open(filler, "wb") as f:  # leaves well under 6 MiB free
            f.write(b"\0" * 4 * MIB)

    thread = threading.Thread(target=fill_once_the_transfer_started)
    try:
        bucket = Bucket(http, BUCKET)
        entry = bucket.stat("neuronxcc-2/MODULE_9/model.neff")
        thread.start()
        with pytest.raises(CacheFull) as info:
            store.materialize(entry.content_id, bucket, entry)
        assert info.value.errno == errno.ENOSPC and str(tiny_disk / "store") in str(info.value)
        assert info.value.__cause__ is not None  # raised by the transfer, not by the check before it
        assert list((tiny_disk / "store" / "tmp").iterdir()) == []
        thread.join(timeout=30)  # the filler's file is closed: unlinking it frees its room
        filler.unlink()
        assert store.materialize(entry.content_id, bucket, entry).read_bytes() == data  # room again
    finally:
        thread.join(timeout=30)
        store.close()
        http.close()
