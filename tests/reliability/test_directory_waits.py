"""Names of one directory that wait on the Hub wait side by side, not one behind the other.

The kernel serializes the lookups of a directory unless the filesystem's INIT reply grants parallel
directory operations, which libfuse before 3.17.1 never did (`hffs_neuron/libfuse_session.py`). Here the
hub-cache root is that directory: each reader is its own process looking up its own repo.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.testing.hub_emulator import HubEmulator

TIMEOUT = 3.0
BOUND = TIMEOUT + 2.0  # README "Errors a reader can see": a FUSE call returns within --timeout + 2 s
READERS = 8
HOLD = 40.0  # far beyond the bound: only the mount can end a wait

# One reader: read refs/main of the repo folder given, print what it got and how long it took.
_READER = """
import errno, json, sys, time
start = time.monotonic()
try:
    got = open(sys.argv[1]).read()
except OSError as exc:
    got = errno.errorcode[exc.errno]
print(json.dumps([got, time.monotonic() - start]))
"""


def _start_reader(repo_folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _READER, str(repo_folder / "refs" / "main")], stdout=subprocess.PIPE, text=True
    )


def _result(reader: subprocess.Popen) -> tuple[str, float]:
    out, _ = reader.communicate(timeout=60)
    got, took = json.loads(out)
    return got, took


@pytest.mark.timeout(120)
def test_readers_of_many_repos_through_a_stalled_hub_each_wait_one_deadline(hub: HubEmulator, mounts: Mounts) -> None:
    for i in range(READERS):
        hub.add_repo(f"org/repo{i}", {"config.json": b"{}"})
    handle = mounts("hub-cache", timeout=TIMEOUT, negative_ttl=1)
    hub.faults.add("/api/models/*/revision/*", "stall", seconds=HOLD)
    readers = [_start_reader(Path(handle.mountpoint) / f"models--org--repo{i}") for i in range(READERS)]
    results = [_result(r) for r in readers]
    assert [got for got, _ in results] == [errno.errorcode[errno.EIO]] * READERS
    slow = sorted(round(took, 1) for _, took in results if took > BOUND)
    assert not slow, f"readers of other repos waited behind each other: {slow} s (bound {BOUND} s)"


@pytest.mark.timeout(120)
def test_a_repo_answers_while_another_repo_of_the_folder_stalls(hub: HubEmulator, mounts: Mounts) -> None:
    hub.add_repo("org/stalled", {"config.json": b"{}"})
    healthy = hub.add_repo("org/healthy", {"config.json": b"{}"})
    handle = mounts("hub-cache", timeout=TIMEOUT, negative_ttl=1)
    hub.faults.add("/api/models/org/stalled/revision/*", "stall", seconds=HOLD)
    stalled_reader = _start_reader(Path(handle.mountpoint) / "models--org--stalled")
    deadline = time.monotonic() + 10
    while not hub.requests("/api/models/org/stalled/revision/"):  # the daemon is waiting on the Hub now
        assert time.monotonic() < deadline, "the stalled repo was never asked about"
        time.sleep(0.02)
    got, _ = _result(_start_reader(Path(handle.mountpoint) / "models--org--healthy"))
    assert got == healthy
    assert stalled_reader.poll() is None, "the healthy repo was answered only after the stalled one gave up"
    assert _result(stalled_reader)[0] == errno.errorcode[errno.EIO]
