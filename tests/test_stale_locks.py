"""Stale compile locks (issue 16 part 3): a `*.lock` whose creator is gone is reported, then removed after
the grace (the kernel's cached entry with it), so compilers waiting on it proceed; a live creator's lock
is never touched; `--keep-stale-locks` only reports.

The compiler pattern is libneuronxla's: create `MODULE_x/model.hlo_module.pb.lock`, poll
`os.path.exists` on it while another process holds it.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Mounts

from hffs_neuron.mount import status
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import COMPILER_VERSIONS, build_neff_bucket

pytestmark = pytest.mark.timeout(120)

VERSION = COMPILER_VERSIONS[0]
GRACE = 2.0

# Process A: a compiler that takes the module's lock, then hangs (killed by the test).
HOLDER = """
import os, sys, time
module = sys.argv[1]
os.makedirs(module, exist_ok=True)
open(os.path.join(module, "model.hlo_module.pb.lock"), "w").close()
open(os.path.join(module, "model.hlo_module.pb"), "wb").write(b"hlo")
print("locked", flush=True)
time.sleep(3600)
"""

# Process B: a compiler waiting for the lock as libneuronxla does (existence polled), then compiling.
WAITER = """
import os, sys, time
lock = sys.argv[1]
started = time.monotonic()
while os.path.exists(lock):
    time.sleep(0.1)
print(f"proceeded {time.monotonic() - started:.2f}", flush=True)
"""


def start_holder(module: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(module)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def stale_locks(mp: Path) -> list[dict]:
    (state,) = status(mp)
    return state["stale_locks"]


def test_dead_compilers_lock_is_removed_and_waiters_proceed(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"], stale_lock_grace=GRACE, publish=True).mountpoint)
    dead_module = mp / VERSION / "MODULE_dead+00000001"
    live_module = mp / VERSION / "MODULE_live+00000002"
    dead = start_holder(dead_module)
    live = start_holder(live_module)
    dead_lock = dead_module / "model.hlo_module.pb.lock"
    live_lock = live_module / "model.hlo_module.pb.lock"
    try:
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(dead_lock)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # B is polling (the kernel has the lock's entry cached)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        killed_at = time.monotonic()

        # Status shows the stale lock (creator pid, age) before the grace is over.
        seen: list[dict] = []
        while time.monotonic() - killed_at < GRACE and not seen:
            seen = [
                lock
                for lock in stale_locks(mp)
                if lock["path"].endswith("MODULE_dead+00000001/model.hlo_module.pb.lock")
            ]
            time.sleep(0.1)
        assert seen, "the stale lock was not reported before its removal"
        assert seen[0]["pid"] == dead.pid and seen[0]["creator"] == "gone" and seen[0]["age_s"] >= 0

        out, _ = waiter.communicate(timeout=GRACE + 5 + 5)
        assert out.startswith("proceeded"), out
        assert time.monotonic() - killed_at <= GRACE + 5, "B waited longer than the grace + 5 s"
        assert not dead_lock.exists()
        log = Path(status(mp)[0]["log_file"]).read_text()
        assert "removed stale compile lock" in log and "MODULE_dead+00000001" in log

        # The live compiler's lock stays for the whole test and is never reported.
        time.sleep(GRACE + 1.5)
        assert live_lock.exists()
        assert stale_locks(mp) == []
        # The dead compiler's module never completed: nothing of it was published.
        assert not (hub.bucket_dir(bucket["bucket_id"]) / VERSION / "MODULE_dead+00000001").exists()
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_keep_stale_locks_only_reports(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"], stale_lock_grace=1, keep_stale_locks=True).mountpoint)
    module = mp / VERSION / "MODULE_kept+00000003"
    holder = start_holder(module)
    holder.kill()
    holder.wait()
    lock = module / "model.hlo_module.pb.lock"
    deadline = time.monotonic() + 10
    reported: list[dict] = []
    while time.monotonic() < deadline and not reported:
        reported = stale_locks(mp)
        time.sleep(0.2)
    assert [(r["path"], r["pid"], r["creator"]) for r in reported] == [
        (f"{VERSION}/MODULE_kept+00000003/model.hlo_module.pb.lock", holder.pid, "gone")
    ]
    time.sleep(3)  # well past the grace
    assert lock.exists()
    assert len(stale_locks(mp)) == 1


def test_lock_of_unknown_creator_is_only_reported(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    """A lock placed in the layer behind the mount's back (no creator record) is reported with pid 0."""
    bucket = build_neff_bucket(hub)
    handle = mounts("neff", bucket["bucket_id"], stale_lock_grace=0.5)
    mp = Path(handle.mountpoint)
    module = mp / VERSION / "MODULE_unknown+00000004"
    module.mkdir(parents=True)
    mounts.unmount(handle)
    (state_dir,) = (tmp_path / "cache" / "neff-layers").iterdir()
    (state_dir / "upper" / VERSION / "MODULE_unknown+00000004" / "model.neff.lock").write_bytes(b"")
    mp = Path(mounts("neff", bucket["bucket_id"], stale_lock_grace=0.5).mountpoint)
    deadline = time.monotonic() + 10
    reported: list[dict] = []
    while time.monotonic() < deadline and not reported:
        reported = stale_locks(mp)
        time.sleep(0.2)
    assert [(r["pid"], r["creator"]) for r in reported] == [(0, "unknown")]
    time.sleep(2)
    assert (mp / VERSION / "MODULE_unknown+00000004" / "model.neff.lock").exists()


# A compiler whose worker thread takes the module's lock and exits; the process goes on (until stdin closes).
THREAD_HOLDER = """
import os, sys, threading
module = sys.argv[1]
def take():
    os.makedirs(module, exist_ok=True)
    open(os.path.join(module, "model.hlo_module.pb.lock"), "w").close()
worker = threading.Thread(target=take)
worker.start()
worker.join()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_of_exited_worker_thread_belongs_to_its_live_process(hub: HubEmulator, mounts: Mounts) -> None:
    """FUSE names the calling thread: the lock is the process's, kept while it runs, removed once it exits."""
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"], stale_lock_grace=1).mountpoint)
    module = mp / VERSION / "MODULE_threaded+00000005"
    lock = module / "model.hlo_module.pb.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", THREAD_HOLDER, str(module)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("locked")
        time.sleep(1 + 3)  # past the grace and a few check rounds, the worker thread long gone
        assert lock.exists(), "a live process's lock was removed because the thread that took it exited"
        assert stale_locks(mp) == []
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0
        deadline = time.monotonic() + 10
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not lock.exists(), "the lock outlived its process"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_round_looks_at_each_creator_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One look at /proc per creator and round, however many locks it holds (a compiler takes one per module):
    the checker runs every second beside the compilers."""
    from hffs_neuron.views import stale_locks
    from hffs_neuron.views.creators import Creator

    gone, alive = Creator(1000, 4242, 7), Creator(1000, 4343, 8)
    records = {
        f"{VERSION}/MODULE_{i:04d}+0badcafe/model.hlo_module.pb.lock": gone if i % 2 else alive for i in range(100)
    }
    removed: list[str] = []

    class View:
        creators = SimpleNamespace(matching=lambda suffix: dict(records))
        local = SimpleNamespace(listdir=lambda rel: [])

        @staticmethod
        def _rel(path: str) -> str:
            return path

        @staticmethod
        def layer_stat(path: str) -> SimpleNamespace:
            return SimpleNamespace(st_mode=stat.S_IFREG | 0o644, st_mtime=time.time() - 60)

        @staticmethod
        def remove_stale(path: str, creator: Creator) -> bool:
            removed.append(path)
            return True

    looked: list[Creator] = []
    monkeypatch.setattr(stale_locks, "creator_alive", lambda c: looked.append(c) or c == alive)
    stale_locks.StaleLocks(View(), grace=0.0, remove=True, invalidate=lambda path: None).check()  # type: ignore[arg-type]
    assert sorted(looked, key=lambda c: c.pid) == [gone, alive]
    assert sorted(removed) == sorted(p for p, c in records.items() if c == gone)


def test_a_restarted_daemon_clears_its_dead_compilers_lock_within_the_grace(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path
) -> None:
    """Churn: the node's daemon and compiler die together; after the restart the lock the compiler left
    goes `grace` seconds after the mount is back (not a check round later), so waiters proceed in time."""
    bucket = build_neff_bucket(hub)
    grace = 3.0
    handle = mounts("neff", bucket["bucket_id"], stale_lock_grace=grace)
    module = Path(handle.mountpoint) / VERSION / "MODULE_churn+00000003"
    holder = start_holder(module)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert handle.process is not None
    handle.process.send_signal(signal.SIGKILL)  # the node goes down before the grace ends
    handle.process.wait()

    handle = mounts("neff", bucket["bucket_id"], stale_lock_grace=grace)
    restarted = time.monotonic()
    lock = Path(handle.mountpoint) / VERSION / "MODULE_churn+00000003" / "model.hlo_module.pb.lock"
    assert lock.exists()  # the local layer kept it, with its creator record
    while lock.exists() and time.monotonic() - restarted < grace + 5:
        time.sleep(0.05)
    cleared = time.monotonic() - restarted
    assert not lock.exists()
    assert cleared <= grace + 0.5, f"cleared {cleared:.2f} s after the restart (grace {grace} s)"
