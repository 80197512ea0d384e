"""Sixteen processes hammer both views with random opens, reads and stats: no errors, no leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron import constants
from hffs_neuron.testing.hub_emulator import HubEmulator

SECONDS = float(os.environ.get("HFFS_LOAD_SECONDS", "60"))
PROCESSES = 16
RSS_LIMIT = 300 * 1024 * 1024

WORKER = r"""
import json, os, random, sys, time
paths = json.loads(sys.argv[1]); expected = json.loads(sys.argv[2]); seconds = float(sys.argv[3])
rng = random.Random(os.getpid())
ops = errors = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    path = rng.choice(paths)
    try:
        if rng.random() < 0.5:
            st = os.stat(path)
            assert st.st_size == expected[path][0], ("size", path)
        else:
            with open(path, "rb") as f:
                offset = rng.randrange(0, max(1, expected[path][0]))
                f.seek(offset)
                data = f.read(rng.randrange(1, 65536))
            assert len(data) == min(len(data), expected[path][0] - offset), ("length", path)
        os.path.exists(path + ".missing")
        ops += 1
    except Exception as exc:
        errors += 1
        print(f"error: {exc!r}", file=sys.stderr)
print(json.dumps({"ops": ops, "errors": errors}))
"""


def _daemon_usage(pid: int) -> tuple[int, int, int]:
    """(open fds other than pipes and sockets, threads, RSS) of a daemon.

    libfuse gives each worker thread its own splice pipe pair and frees it when the thread retires, so
    pipes follow the worker pool's size; connection pools (httpx's and hf_xet's) open and retire sockets
    on their own schedule, so sockets are checked against the connection budget instead; files are what
    a leak would pile up.
    """
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # closed meanwhile
    pipes = sum(1 for link in links if link.startswith("pipe:"))
    sockets = sum(1 for link in links if link.startswith("socket:"))
    fds = len(links) - pipes - sockets
    threads = len(os.listdir(f"/proc/{pid}/task"))
    assert pipes <= 2 * threads + 4, f"daemon {pid}: more pipes than worker threads account for"
    # Two pools of at most --max-connections each, plus the status socket and /dev/fuse's peers.
    assert sockets <= 2 * constants.MAX_CONNECTIONS + 8, f"daemon {pid}: {sockets} sockets open"
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return fds, threads, rss


@pytest.mark.timeout(int(SECONDS) + 240)
def test_sixteen_processes_of_random_io_over_both_views(hub: HubEmulator, tmp_path: Path, mounts: Mounts) -> None:
    files = {f"neuronxcc-1/MODULE_{i}/model.neff": os.urandom(64 * 1024 * (i + 1)) for i in range(12)}
    hub.add_bucket("load/cache", files)
    shards = {f"model-{i}.safetensors": os.urandom(128 * 1024 * (i + 1)) for i in range(6)}
    commit = hub.add_repo("load/model", shards)
    neff = mounts("neff", "load/cache", name="neff")
    hubm = mounts("hub-cache", name="hub")
    snapshot = tmp_path / "hub" / "models--load--model" / "snapshots" / commit
    expected = {str(tmp_path / "neff" / n): [len(d)] for n, d in files.items()}
    expected.update({str(snapshot / n): [len(d)] for n, d in shards.items()})
    # Two rounds of the same load: whatever the daemons hold after the first (libfuse's worker pool,
    # connection pools) is their steady state; a leak keeps growing in the second.
    peak_rss, after = 0, []
    for _round in range(2):
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    json.dumps(sorted(expected)),
                    json.dumps(expected),
                    str(SECONDS / 2),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(PROCESSES)
        ]
        while any(w.poll() is None for w in workers):
            peak_rss = max(peak_rss, *(_daemon_usage(h.pid)[2] for h in (neff, hubm)))
            time.sleep(0.5)
        total_ops = 0
        for worker in workers:
            out, err = worker.communicate(timeout=60)
            result = json.loads(out)
            assert result["errors"] == 0, err[-2000:]
            total_ops += result["ops"]
        assert total_ops > PROCESSES * 10
        time.sleep(1.0)  # let released handles drain
        after.append({h.pid: _daemon_usage(h.pid) for h in (neff, hubm)})
    for handle in (neff, hubm):
        fds1, threads1, _ = after[0][handle.pid]
        # libfuse retires idle workers over a few seconds: wait for the count to come back down.
        deadline = time.monotonic() + 15
        while True:
            fds2, threads2, _ = _daemon_usage(handle.pid)
            if (fds2 <= fds1 + 2 and threads2 <= threads1 + 2) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert fds2 <= fds1 + 2, f"daemon {handle.pid} leaks fds: {fds1} -> {fds2}"
        assert threads2 <= threads1 + 2, f"daemon {handle.pid} leaks threads: {threads1} -> {threads2}"
    assert peak_rss < RSS_LIMIT, f"daemon RSS peaked at {peak_rss / 1e6:.0f} MB"
    mounts.unmount(neff)
    mounts.unmount(hubm)
