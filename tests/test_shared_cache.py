"""One cache directory shared the hard ways (issue 13): by two "hosts" (daemons with different host
names, as on a cluster filesystem) while both download, and by three daemons and eight readers with
`flock`/`fcntl` locks turned into no-ops (an LD_PRELOAD shim built here with gcc, as on Lustre, GPFS
or NFS without locks). Correctness must not depend on the lock: 0 wrong bytes, no partial blob ever
visible, no temp file left behind; and single flight holds without the lock too (O_EXCL claim files):
at most 1.1 x the checkpoint's bytes cross the wire. Plus an open on one mount behind another mount's
queued read-ahead (issue 26)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.testing.fleet import build_nolock_shim
from hffs_neuron.testing.hub_emulator import HubEmulator

MiB = 1024 * 1024
SHARDS = [f"model-{i:05d}-of-00012.safetensors" for i in range(1, 13)]


@pytest.fixture
def checkpoint(hub: HubEmulator) -> dict[str, bytes]:
    files = {name: os.urandom(2 * MiB + 7 * i) for i, name in enumerate(SHARDS)}
    files["big.bin"] = os.urandom(24 * MiB)
    files["config.json"] = b'{"model_type": "gpt2"}'
    hub.add_repo("Org/Shared", files)
    hub.reset_stats()
    return files


def mount_as(mounts: Mounts, tmp_path: Path, name: str, env: dict[str, str], **options: object) -> Path:
    """A hub-cache mount on the shared tmp_path/cache; returns the repo's snapshot dir."""
    backing = tmp_path / f"backing-{name}"
    backing.mkdir()
    handle = mounts("hub-cache", name=name, backing=str(backing), env=env, **options)
    repo = Path(handle.mountpoint) / "models--Org--Shared"
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(180)
def test_two_hosts_on_one_cache_dir_while_both_download(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, runtime_env: dict[str, str], checkpoint: dict[str, bytes]
) -> None:
    tmp = tmp_path / "cache" / "blobs-store" / "tmp"
    tmp.mkdir(parents=True)
    gone = dead_pid()
    key = "0" * 64
    a_dead = tmp / f"{key}.host-a.{gone}.0badc0de"
    b_dead = tmp / f"{key}.host-b.{gone}.0badc0de"
    stale = tmp / f"{key}.host-c.{gone}.0badc0de"
    for path in (a_dead, b_dead, stale):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))

    hub.faults.add("*/big.bin", "latency", seconds=0.3, methods=("GET",))  # 24 MiB in slow ranges
    env_b = dict(runtime_env, HFFS_HOST_NAME="host-b", HFFS_CHUNK_SIZE=str(2 * MiB))
    env_b["HFFS_PARALLEL_THRESHOLD"] = str(4 * MiB)
    snap_b = mount_as(mounts, tmp_path, "b", env_b, max_connections=3, read_ahead="off")
    # host-b removed its own dead writer's file and the day-old one; host-a's is not its business.
    assert sorted(p.name for p in tmp.iterdir()) == [a_dead.name]
    # A writer of host-b whose pid does not exist here (it lives on host-b): host-a must keep its file.
    b_elsewhere = tmp / f"{key}.host-b.{gone}.feedf00d"
    b_elsewhere.write_bytes(b"partial")

    results: dict[str, bytes] = {}
    reading = threading.Thread(target=lambda: results.update(b=(snap_b / "big.bin").read_bytes()))
    reading.start()
    deadline = time.monotonic() + 30
    while not any(".host-b." in p.name and p != b_elsewhere for p in tmp.iterdir()):
        assert time.monotonic() < deadline, "host-b's download never showed a temp file"
        time.sleep(0.05)
    live_b = [p for p in tmp.iterdir() if ".host-b." in p.name and p != b_elsewhere]
    # host-a starts while host-b downloads: its start-up cleanup removes only its own dead writer's file.
    snap_a = mount_as(mounts, tmp_path, "a", dict(runtime_env, HFFS_HOST_NAME="host-a"), read_ahead="shards")
    assert b_elsewhere.exists() and not a_dead.exists()
    assert all(p.exists() for p in live_b) or "b" in results  # (unless host-b finished meanwhile)
    # Both download at once: host-a the shard set (read-ahead), host-b the large file.
    assert (snap_a / SHARDS[0]).read_bytes() == checkpoint[SHARDS[0]]
    assert (snap_a / "big.bin").read_bytes() == checkpoint["big.bin"]
    reading.join(120)
    assert results["b"] == checkpoint["big.bin"]
    for name in SHARDS:
        assert (snap_b / name).read_bytes() == checkpoint[name]
        assert (snap_a / name).read_bytes() == checkpoint[name]
    for name, data in checkpoint.items():
        if name != "config.json":
            assert hub.bytes_served(name) == len(data), f"{name} transferred more than once"
    assert [p.name for p in tmp.iterdir()] == [b_elsewhere.name]


# Holds LOCK_EX on argv[1] while the test holds it too: only possible when locks are no-ops.
PROBE = "import fcntl, sys; fd = open(sys.argv[1], 'w'); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('ok')"

# A reader: every file of the snapshot in a shuffled order, printing {name: sha256}.
READER = r"""
import hashlib, json, os, random, sys
snap, seed = sys.argv[1], int(sys.argv[2])
names = sorted(os.listdir(snap))
random.Random(seed).shuffle(names)
out = {}
for name in names:
    with open(os.path.join(snap, name), "rb") as f:
        out[name] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps(out))
"""


@pytest.fixture
def no_lock_shim(tmp_path: Path) -> Path:
    shim = build_nolock_shim(tmp_path)
    if shim is None:
        pytest.skip("no C compiler to build the no-op lock shim")
    return shim


@pytest.mark.timeout(300)
def test_no_op_locks_three_daemons_eight_readers_one_transfer_per_blob_never_a_wrong_or_partial_one(
    hub: HubEmulator,
    mounts: Mounts,
    tmp_path: Path,
    runtime_env: dict[str, str],
    checkpoint: dict[str, bytes],
    no_lock_shim: Path,
) -> None:
    env = dict(runtime_env, LD_PRELOAD=str(no_lock_shim))
    held = tmp_path / "held.lock"
    with open(held, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        probe = subprocess.run([sys.executable, "-c", PROBE, str(held)], env=env, capture_output=True, text=True)
        assert probe.stdout.strip() == "ok", f"the shim does not disable locks: {probe.stderr}"

    hub.faults.add("*.safetensors", "latency", seconds=0.1, methods=("GET",))  # overlap the transfers
    daemons = ("a", "b", "c")
    snaps = [mount_as(mounts, tmp_path, name, env, read_ahead="shards") for name in daemons]
    blobs = tmp_path / "cache" / "blobs-store" / "blobs"
    expected = {hashlib.sha256(data).hexdigest(): data for data in checkpoint.values()}
    bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every blob ever visible is complete and right
        checked: set[str] = set()
        while not stop.is_set():
            for path in blobs.glob("*/*") if blobs.is_dir() else []:
                if path.name in checked or path.name not in expected:
                    continue
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                if data != expected[path.name]:
                    bad.append(f"{path.name}: {len(data)} bytes")
                checked.add(path.name)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        argvs = [[sys.executable, "-c", READER, str(snaps[i % len(snaps)]), str(i)] for i in range(8)]
        outputs = run_parallel(argvs, env=env, timeout=240)
    finally:
        stop.set()
        watcher.join(30)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in checkpoint.items()}
    wrong = sum(json.loads(out)[name] != digest for out in outputs for name, digest in want.items())
    assert wrong == 0 and bad == [], (wrong, bad)
    for name in daemons:
        mounts.unmount(tmp_path / name)
    assert list((tmp_path / "cache" / "blobs-store" / "tmp").iterdir()) == []
    duplicates = sum(hub.bytes_served(name) / len(data) - 1 for name, data in checkpoint.items())
    print(f"no-op locks: {duplicates:.2f} duplicate transfers (in blobs' worth) over {len(checkpoint)} files")
    # Single flight without locks (the O_EXCL claim files): each blob crossed the wire about once.
    total = sum(len(data) for data in checkpoint.values())
    assert hub.bytes_served() <= 1.1 * total, f"{hub.bytes_served() / total:.2f} x the checkpoint's bytes"


@pytest.mark.timeout(120)
def test_an_open_on_another_mount_starts_within_the_bound_behind_a_queued_read_ahead(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path, runtime_env: dict[str, str]
) -> None:
    """Mount A has only queued its read-ahead of x.bin (its one transfer connection is busy with a slow
    file) and holds the blob's lock and claim; mount B, on the same cache dir, opens x.bin. Across
    processes only a growing temp file is progress: B takes the fetch over (x.bin's temp stays empty)
    and answers within --timeout + 2 s, and A's read-ahead, once it gets a connection, finds the blob
    done and fetches nothing (issue 26)."""
    files = {"big.bin": os.urandom(8 * MiB), "x.bin": os.urandom(MiB)}
    hub.add_repo("Org/Shared", files)
    hub.faults.add("*/big.bin", "trickle", rate_bps=1_000_000, seconds=60, methods=("GET",))  # ~8 s
    timeout = 3
    # max_connections 3: one transfer connection (two are kept for metadata).
    snap_a = mount_as(mounts, tmp_path, "a", runtime_env, read_ahead="snapshot", max_connections=3, timeout=timeout)
    snap_b = mount_as(mounts, tmp_path, "b", runtime_env, read_ahead="off", timeout=timeout)
    results: dict[str, bytes | OSError] = {}

    def read_big() -> None:
        try:
            results["big"] = (snap_a / "big.bin").read_bytes()
        except OSError as exc:
            results["big"] = exc

    reading = threading.Thread(target=read_big)
    reading.start()
    claims = tmp_path / "cache" / "blobs-store" / "locks"
    deadline = time.monotonic() + 30
    while len(list(claims.glob("*.claim"))) < 2:  # big.bin's fetch and x.bin's queued read-ahead
        assert time.monotonic() < deadline, "mount A never queued its read-ahead"
        time.sleep(0.05)
    time.sleep(1.5)  # A's read-ahead of x.bin has waited a while for a connection
    start = time.monotonic()
    assert (snap_b / "x.bin").read_bytes() == files["x.bin"]
    assert time.monotonic() - start < timeout + 2
    reading.join(60)
    assert results["big"] == files["big.bin"]
    deadline = time.monotonic() + 10
    while list(claims.glob("*.claim")):  # A's read-ahead ran and ended
        assert time.monotonic() < deadline, "A's read-ahead never ended"
        time.sleep(0.05)
    assert hub.bytes_served("x.bin") == len(files["x.bin"])  # one transfer: B's
