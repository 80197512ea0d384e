"""Reads through a mount while the Hub misbehaves: never a wrong byte, never a hang, nothing cached wrong.

500 distinct files are read through a hub-cache mount while the emulator injects 503 bursts, 429 with
Retry-After, connection resets, truncated bodies, corrupted bodies and stalls longer than the read
timeout. Every read either returns the exact bytes or fails with EIO within the deadline; once the
faults clear, every file reads correctly (failures were not cached).
"""

from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.testing.hub_emulator import HubEmulator

FILES = 500
READ_TIMEOUT = 2.0
OPERATION_TIMEOUT = 8.0
# A read may take the operation deadline, plus the wait for a concurrent fetch of the same blob, plus
# slack for a loaded 2-core machine; it must never take anything like a hang.
READ_BOUND = 3 * OPERATION_TIMEOUT


@pytest.mark.timeout(400)
def test_500_reads_under_mixed_faults(
    hub: HubEmulator, tmp_path: Path, runtime_env: dict[str, str], mounts: Mounts
) -> None:
    rng = random.Random(7)
    files = {f"shard-{i:03d}.bin": rng.randbytes(rng.choice([300, 5_000, 40_000, 200_000])) for i in range(FILES)}
    commit = hub.add_repo("faults/model", files)
    env = dict(runtime_env, HFFS_READ_TIMEOUT=str(READ_TIMEOUT), HFFS_CONNECT_TIMEOUT="2", HFFS_RETRY_MAX_WAIT="1")
    handle = mounts("hub-cache", timeout=OPERATION_TIMEOUT, env=env)
    snapshot = Path(handle.mountpoint) / "models--faults--model" / "snapshots" / commit
    assert len(os.listdir(snapshot)) == FILES  # listing first: faults target downloads only
    hub.faults.seed(11)
    pattern = "*/resolve/*"
    hub.faults.add(pattern, "status", status=503, rate=0.12)
    hub.faults.add(pattern, "status", status=429, retry_after=1, rate=0.03)
    hub.faults.add(pattern, "reset", rate=0.08)
    hub.faults.add(pattern, "truncate", rate=0.08)
    hub.faults.add(pattern, "corrupt", rate=0.08)
    hub.faults.add(pattern, "stall", seconds=READ_TIMEOUT + 1, rate=0.02)

    def read(name: str) -> tuple[str, bytes | int, float]:
        start = time.monotonic()
        try:
            data = (snapshot / name).read_bytes()
            return name, data, time.monotonic() - start
        except OSError as exc:
            return name, exc.errno, time.monotonic() - start

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(read, sorted(files)))

    fired = {f"{rule.kind}/{rule.status}": rule.fired for rule in hub.faults.rules()}
    hub.faults.clear()
    failed = []
    for name, outcome, seconds in results:
        assert seconds < READ_BOUND, f"{name}: a read took {seconds:.1f}s"
        if isinstance(outcome, bytes):
            assert outcome == files[name], f"{name}: wrong bytes served"
        else:
            assert outcome == errno.EIO, f"{name}: {errno.errorcode.get(outcome)} instead of EIO"
            failed.append(name)
    # The faults really happened, and most reads survived them through retries.
    assert sum(fired.values()) > 100, fired
    assert all(count > 0 for count in fired.values()), fired
    assert len(failed) < FILES // 4, f"{len(failed)} reads failed"
    slowest = max(seconds for _, _, seconds in results)
    # The figures README quotes (visible with pytest -s).
    print(f"\nfaults fired {fired}; {len(failed)}/{FILES} reads gave EIO; slowest read {slowest:.1f}s")

    # Faults cleared: every file reads correctly, including those that failed (nothing cached wrong).
    for name in sorted(files):
        assert (snapshot / name).read_bytes() == files[name], name
    mounts.unmount(handle)
