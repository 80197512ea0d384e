"""Crashes (kill -9 of the daemon mid-fetch and mid-write) and one cache dir shared by two mounts,
a prefetch and eight reader processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.testing.hub_emulator import HubEmulator

READER = """
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
print(h.hexdigest())
"""


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _mountctl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mountctl", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.timeout(180)
def test_kill_9_mid_fetch_and_mid_write_then_recover(
    hub: HubEmulator, tmp_path: Path, runtime_env: dict[str, str], mounts: Mounts
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    hub.add_bucket("crash/cache", {"neuronxcc-1/MODULE_1/model.neff": data})
    cache = str(tmp_path / "cache")
    mountpoint = tmp_path / "mnt"
    handle = mounts("neff", "crash/cache")
    module = mountpoint / "neuronxcc-1" / "MODULE_1"
    # A local write that was fsynced must survive the crash.
    with open(module / "compile_flags.json", "wb") as f:
        f.write(b'["--O1"]')
        f.flush()
        os.fsync(f.fileno())
    # Slow the download down so the daemon dies in the middle of it.
    hub.faults.add("*/resolve/*model.neff", "latency", seconds=5)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(module / "model.neff")], stdout=subprocess.PIPE)
    _wait_for(lambda: hub.requests("model.neff"))
    os.kill(handle.pid, signal.SIGKILL)
    reader.wait(timeout=60)
    assert reader.returncode != 0  # the reader got an error, not a partial file
    handle.process.wait(timeout=10)

    # The mountpoint is stale; mountctl says so, --force clears it, and a new mount serves everything.
    status = _mountctl("status", str(mountpoint), env=runtime_env)
    assert "DEAD" in status.stdout, status.stdout + status.stderr
    assert _mountctl("umount", "--force", str(mountpoint), env=runtime_env).returncode == 0
    hub.faults.clear()
    handle = mounts("neff", "crash/cache")
    out = subprocess.run([sys.executable, "-c", READER, str(module / "model.neff")], capture_output=True, text=True)
    assert out.stdout.strip() == hashlib.sha256(data).hexdigest()
    assert (module / "compile_flags.json").read_bytes() == b'["--O1"]'
    # No temp file of the dead fetch is left, and no lock blocks anyone (the read above succeeded).
    assert not list((Path(cache) / "blobs-store" / "tmp").iterdir())
    mounts.unmount(handle)


@pytest.mark.timeout(240)
def test_two_mounts_a_prefetch_and_eight_readers_share_one_cache(
    hub: HubEmulator, tmp_path: Path, runtime_env: dict[str, str], mounts: Mounts
) -> None:
    """The same content reached through a NEFF mount, a hub-cache mount and a prefetch: one transfer each."""
    neffs = {f"neuronxcc-1/MODULE_{i}/model.neff": os.urandom(3 * 1024 * 1024 + i) for i in range(3)}
    hub.add_bucket("shared/cache", neffs)
    shards = {f"model-0000{i}.safetensors": os.urandom(4 * 1024 * 1024 + i) for i in range(3)}
    commit = hub.add_repo("shared/model", shards)
    cache = str(tmp_path / "cache")
    neff = mounts("neff", "shared/cache", name="neff")
    hubm = mounts("hub-cache", name="hub")
    try:
        snapshot = tmp_path / "hub" / "models--shared--model" / "snapshots" / commit
        targets = [tmp_path / "neff" / name for name in neffs] + [snapshot / name for name in shards]
        expected = {
            **{str(tmp_path / "neff" / n): d for n, d in neffs.items()},
            **{str(snapshot / n): d for n, d in shards.items()},
        }
        hub.faults.add("*/resolve/*", "latency", seconds=0.5)  # keep fetches in flight while others arrive
        prefetch = subprocess.Popen(
            [sys.executable, "-m", "mountctl", "prefetch", str(tmp_path / "neff"), str(snapshot)],
            env=runtime_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        paths = [str(targets[i % len(targets)]) for i in range(8)] + [str(t) for t in targets]
        outputs = run_parallel([[sys.executable, "-c", READER, path] for path in paths], env=runtime_env, timeout=120)
        for path, out in zip(paths, outputs, strict=True):
            assert out.strip() == hashlib.sha256(expected[path]).hexdigest(), path
        assert prefetch.wait(timeout=120) == 0, prefetch.stderr.read()
        for name, data in {**neffs, **shards}.items():
            assert hub.bytes_served(name) == len(data), name  # exactly one transfer per blob

        # Eviction never removes a blob that is open: keep one open and prune everything.
        with open(targets[0], "rb") as held:
            pruned = _mountctl("cache", "prune", "--cache-dir", cache, "--max-size", "0", env=runtime_env)
            assert pruned.returncode == 0, pruned.stderr
            assert hashlib.sha256(held.read()).digest() == hashlib.sha256(expected[str(targets[0])]).digest()
        assert len(list((Path(cache) / "blobs-store" / "blobs").glob("*/*"))) == 1  # only the open one is left
        mounts.unmount(neff)
        mounts.unmount(hubm)
    finally:
        hub.faults.clear()
