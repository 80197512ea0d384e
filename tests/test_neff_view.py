"""The NEFF view through a real FUSE mount: a bucket as a working Neuron compile-cache root.

Every test mounts the view with `hffs_neuron.mount(...)` (a real daemon process), drives it with plain
file-system calls (from several processes where concurrency matters) and checks what a compiler or an
operator would see: names, sizes, bytes, errno values, and how many bytes crossed the network.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

pytestmark = pytest.mark.timeout(120)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"

MountFn = Callable[..., Path]


@pytest.fixture
def mount_neff(mounts: Mounts) -> MountFn:
    """Mount factory: `mount_neff(bucket_id, name="mnt", cache="cache", **options)` -> mountpoint.

    Mountpoints and cache dirs are named so a test can unmount (`mount_neff.unmount(mountpoint)`) and
    remount on the same cache dir. Every mount still alive at teardown is unmounted.
    """

    def do_mount(bucket_id: str, name: str = "mnt", cache: str = "cache", **options: Any) -> Path:
        return Path(mounts("neff", bucket_id, name=name, cache=cache, **options).mountpoint)

    do_mount.unmount = mounts.unmount  # type: ignore[attr-defined]
    return do_mount


@pytest.fixture
def bucket(hub: HubEmulator) -> dict[str, Any]:
    return build_neff_bucket(hub)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remote_bytes(hub: HubEmulator, bucket: dict[str, Any], rel: str) -> bytes:
    return (hub.bucket_dir(bucket["bucket_id"]) / rel).read_bytes()


def _errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


# -- listing and stat --------------------------------------------------------------------------------
def test_layout_names_sizes_and_mtimes_without_fetching(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"])
    assert os.path.ismount(mp)
    assert sorted(os.listdir(mp)) == sorted(bucket["compiler_versions"])
    for version in bucket["compiler_versions"]:
        expected = {m.split("/", 1)[1] for m in bucket["complete"] + bucket["locked"] if m.startswith(version + "/")}
        assert set(os.listdir(mp / version)) == expected  # poisoned modules and the model area are hidden
    for rel, size in bucket["files"].items():
        name = rel.rsplit("/", 1)[-1]
        if rel.rsplit("/", 1)[0] not in bucket["complete"] or name == "model.log":
            continue
        st = os.stat(mp / rel)
        remote = os.stat(hub.bucket_dir(bucket["bucket_id"]) / rel)
        assert st.st_size == size
        assert abs(st.st_mtime - remote.st_mtime) < 2  # the listing's mtime, not "now" or 0
    assert hub.bytes_served() == 0  # listing and stat never fetch content


def test_missing_entries_enoent_and_local_create_visible_at_once(
    hub: HubEmulator, bucket: dict, mount_neff: MountFn
) -> None:
    mp = mount_neff(bucket["bucket_id"])
    module = mp / bucket["complete"][0]
    for missing in (module / "model.log", mp / VERSION / "MODULE_123+abcdef01" / "model.done", mp / "nope"):
        assert _errno_of(lambda p=missing: os.stat(p)) == errno.ENOENT
    # A miss was just cached (daemon and kernel); a write through the mount must invalidate it.
    target = module / "model.log"
    probe = [sys.executable, "-c", f"import os; print(os.path.exists({str(target)!r}))"]
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "False"
    target.write_bytes(b"local failure log\n")
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "True"
    # Probes of missing modules are answered from the cached listing: no request per probe.
    before = len(hub.requests())
    for i in range(200):
        assert not os.path.exists(mp / VERSION / f"MODULE_{i:020d}+00000000" / "model.done")
        assert not os.path.exists(module / f"missing-{i}")
    assert len(hub.requests()) == before
    new_module = mp / VERSION / "MODULE_123+abcdef01"
    new_module.mkdir()
    (new_module / "model.done").write_bytes(b"")
    assert os.path.exists(new_module / "model.done")


# -- poison never crosses ---------------------------------------------------------------------------
def test_poison_is_hidden(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    # A module with a done marker but no NEFF (e.g. a half-uploaded entry): the marker must not show.
    half = f"{VERSION}/MODULE_99999999999999999999+0badf00d"
    hub.add_bucket(bucket["bucket_id"], {f"{half}/model.done": b"", f"{half}/compile_flags.json": b"[]"})
    mp = mount_neff(bucket["bucket_id"])
    for module in bucket["poisoned"]:
        assert not os.path.exists(mp / module)
        assert not os.path.exists(mp / module / "model.log")
        assert not os.path.exists(mp / module / "model.hlo_module.pb")
    for module in bucket["locked"]:
        assert os.path.isdir(mp / module)
        assert not os.path.exists(mp / module / "model.hlo_module.pb.lock")
        assert sorted(os.listdir(mp / module)) == ["compile_flags.json", "model.hlo_module.pb"]
    assert not os.path.exists(mp / half / "model.done")
    assert os.listdir(mp / half) == ["compile_flags.json"]
    for dirpath, dirnames, filenames in os.walk(mp):
        for name in filenames + dirnames:
            assert name != "model.log" and not name.endswith(".lock"), f"{dirpath}/{name} is visible"
    assert hub.bytes_served() == 0


def test_model_area_hidden_by_default(bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"])
    assert not os.path.exists(mp / bucket["registry"][0])
    assert not os.path.exists(mp / bucket["exports"][0])
    assert "HFFS-Test" not in os.listdir(mp / VERSION)


def test_model_area_shown_read_only(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"], show_model_area=True)
    export = mp / bucket["exports"][0]
    assert export.read_bytes() == _remote_bytes(hub, bucket, bucket["exports"][0])
    assert "HFFS-Test" in os.listdir(mp / VERSION)
    assert _errno_of(lambda: open(export, "r+b")) == errno.EROFS
    assert _errno_of(lambda: export.unlink()) == errno.EROFS
    assert _errno_of(lambda: (mp / VERSION / "HFFS-Test" / "new").mkdir()) == errno.EROFS
    assert _errno_of(lambda: (export.parent / "x.json").write_bytes(b"{}")) == errno.EROFS
    # The flat area stays writable next to it.
    (mp / VERSION / "MODULE_1+00000001").mkdir()


# -- writable root and local layer ------------------------------------------------------------------
def test_root_is_a_writable_compile_cache_root(bucket: dict, mount_neff: MountFn, tmp_path: Path) -> None:
    mp = mount_neff(bucket["bucket_id"])
    assert os.access(mp, os.W_OK | os.R_OK | os.X_OK)
    with open(mp / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.lockf(lock, fcntl.LOCK_EX)
        fcntl.lockf(lock, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert "lock" in os.listdir(mp)
    sv, local = os.statvfs(mp), os.statvfs(tmp_path / "cache")
    assert (sv.f_blocks, sv.f_bsize, sv.f_frsize) == (local.f_blocks, local.f_bsize, local.f_frsize)
    assert sv.f_namemax >= 255


def test_local_layer_operations(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"])
    deep = mp / VERSION / "MODULE_5+12345678" / "sub" / "dir"
    os.makedirs(deep)
    path = deep / "f.bin"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"0123456789")
        os.fsync(fd)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert _errno_of(lambda: os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    os.truncate(path, 4)
    assert path.read_bytes() == b"0123"
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert os.stat(path).st_mtime_ns == 1_600_000_000_000_000_000
    renamed = deep / "g.bin"
    os.rename(path, renamed)
    assert not path.exists() and renamed.read_bytes() == b"0123"
    renamed.unlink()
    assert _errno_of(lambda: os.stat(renamed)) == errno.ENOENT
    os.rmdir(deep)
    assert not deep.exists()
    assert hub.bytes_served() == 0


def test_remote_file_semantics(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    """O_EXCL on a remote file, copy-up on truncate/utimens/append, unlink hides, the bucket never changes."""
    mp = mount_neff(bucket["bucket_id"])
    a, b, c = bucket["complete"][:3]
    # O_EXCL create of an existing remote file
    assert _errno_of(lambda: os.open(mp / a / "model.neff", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    # truncate copies up
    hlo = f"{a}/model.hlo_module.pb"
    original = _remote_bytes(hub, bucket, hlo)
    os.truncate(mp / hlo, 10)
    assert (mp / hlo).read_bytes() == original[:10]
    assert os.stat(mp / hlo).st_size == 10
    # utimens copies up, content intact
    neff = f"{b}/model.neff"
    os.utime(mp / neff, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert os.stat(mp / neff).st_mtime_ns == 1_500_000_000_000_000_000
    assert _sha((mp / neff).read_bytes()) == _sha(_remote_bytes(hub, bucket, neff))
    # append copies up
    flags = f"{c}/compile_flags.json"
    with open(mp / flags, "ab") as f:
        f.write(b"\n")
    assert (mp / flags).read_bytes() == _remote_bytes(hub, bucket, flags) + b"\n"
    # rewriting a remote file from scratch (O_TRUNC, as the compiler does) fetches nothing
    rewritten = f"{b}/model.hlo_module.pb"
    (mp / rewritten).write_bytes(b"new hlo")
    assert (mp / rewritten).read_bytes() == b"new hlo"
    assert hub.bytes_served(rewritten) == 0
    # unlink a remote file: gone, stays gone, and can be recreated locally
    done = mp / c / "model.done"
    done.unlink()
    assert _errno_of(lambda: os.stat(done)) == errno.ENOENT
    assert "model.done" not in os.listdir(mp / c)
    assert _errno_of(done.unlink) == errno.ENOENT
    # rename a remote file: old name gone, new name holds the bytes
    os.rename(mp / c / "model.neff", mp / c / "model.neff.bak")
    assert not (mp / c / "model.neff").exists()
    assert _sha((mp / c / "model.neff.bak").read_bytes()) == _sha(_remote_bytes(hub, bucket, f"{c}/model.neff"))
    # the bucket itself is untouched
    for rel in (hlo, neff, flags, f"{c}/model.done", f"{c}/model.neff"):
        assert (hub.bucket_dir(bucket["bucket_id"]) / rel).stat().st_size == bucket["files"][rel]


def test_writes_and_deletions_survive_remount(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"])
    first, second = bucket["complete"][:2]
    new = mp / VERSION / "MODULE_7+77777777"
    new.mkdir()
    (new / "model.neff").write_bytes(b"local neff")
    (mp / first / "model.done").unlink()
    os.rename(mp / second / "compile_flags.json", mp / second / "flags.old")
    mount_neff.unmount(mp)  # type: ignore[attr-defined]
    assert not os.path.ismount(mp)

    mp = mount_neff(bucket["bucket_id"])  # same cache dir: same local layer
    assert (new / "model.neff").read_bytes() == b"local neff"
    assert not os.path.exists(mp / first / "model.done")
    assert "model.done" not in os.listdir(mp / first)
    assert not os.path.exists(mp / second / "compile_flags.json")
    assert (mp / second / "flags.old").read_bytes() == _remote_bytes(hub, bucket, f"{second}/compile_flags.json")
    assert os.path.exists(mp / first / "model.neff")  # only what was deleted is hidden


def test_read_only_mount_refuses_writes(bucket: dict, mount_neff: MountFn) -> None:
    mp = mount_neff(bucket["bucket_id"], read_only=True)
    module = mp / bucket["complete"][0]
    assert (module / "model.done").exists()
    assert _errno_of(lambda: open(mp / "lock", "w")) == errno.EROFS
    assert _errno_of(lambda: (module / "new").write_bytes(b"x")) == errno.EROFS
    assert _errno_of(lambda: (mp / VERSION / "MODULE_2+22222222").mkdir()) == errno.EROFS
    assert _errno_of(lambda: (module / "model.done").unlink()) == errno.EROFS
    assert _errno_of(lambda: open(module / "model.neff", "r+b")) == errno.EROFS
    assert _errno_of(lambda: os.truncate(module / "model.neff", 0)) == errno.EROFS
    assert not os.access(mp, os.W_OK)
    assert (module / "model.done").exists()


def test_names_with_plus_and_long_names_are_byte_exact(hub: HubEmulator, mount_neff: MountFn) -> None:
    long_module = "MODULE_" + "1" * 180 + "+0a1b2c3d"
    long_file = "wrapped_neff." + "x" * 230 + ".hlo"  # 247 bytes, under NAME_MAX
    odd_file = "a+b=c,d@e~f.g.json"
    files = {
        f"{VERSION}/{long_module}/model.neff": os.urandom(5000),
        f"{VERSION}/{long_module}/model.done": b"",
        f"{VERSION}/{long_module}/{long_file}": b"long",
        f"{VERSION}/{long_module}/{odd_file}": b"odd",
    }
    hub.add_bucket("org/names", files)
    mp = mount_neff("org/names")
    assert os.listdir(mp) == [VERSION]
    assert os.listdir(mp / VERSION) == [long_module]
    assert sorted(os.listdir(mp / VERSION / long_module)) == sorted(["model.neff", "model.done", long_file, odd_file])
    for rel, data in files.items():
        assert (mp / rel).read_bytes() == data
    # local names with the same characters round-trip too
    local = mp / VERSION / (long_module[:-1] + "e") / odd_file
    local.parent.mkdir()
    local.write_bytes(b"local")
    assert odd_file in os.listdir(local.parent) and local.read_bytes() == b"local"


@pytest.mark.timeout(240)
def test_ten_thousand_modules_listing_is_paginated_and_cached(hub: HubEmulator, mount_neff: MountFn) -> None:
    directory = hub.add_bucket("org/big")
    names = {f"MODULE_{i:020d}+{i:08x}" for i in range(10_000)}
    for name in names:
        module = directory / VERSION / name
        module.mkdir(parents=True)
        (module / "model.neff").write_bytes(b"n")
    hub.page_size = 1000
    mp = mount_neff("org/big")
    hub.reset_stats()
    assert set(os.listdir(mp / VERSION)) == names
    cold = len(hub.requests("/tree"))
    assert 0 < cold <= 11
    assert set(os.listdir(mp / VERSION)) == names
    assert len(hub.requests("/tree")) == cold  # served from the listing cache
    assert hub.bytes_served() == 0


# -- the compiler's access pattern from several processes -------------------------------------------
COMPILER = textwrap.dedent(
    """
    import errno, fcntl, hashlib, json, os, sys, time

    root, plan_file, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
    plan = json.load(open(plan_file))
    payload = (f"neff of worker {worker};".encode() * 100_000)[: plan["neff_size"]]
    results = {}

    def probe(module):
        # libneuronxla opens <root>/lock for writing around every cache operation.
        with open(os.path.join(root, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(os.path.join(module, "model.log")):
                    return "failed"
                return "hit" if os.path.exists(os.path.join(module, "model.done")) else "miss"
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_neff(module):
        with open(os.path.join(module, "model.neff"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def compile_module(module):
        os.makedirs(module, exist_ok=True)
        lock_path = os.path.join(module, "model.hlo_module.pb.lock")
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # someone else compiles it: wait for the lock to go away
            deadline = time.monotonic() + 60
            while os.path.exists(lock_path):
                if time.monotonic() > deadline:
                    raise TimeoutError(lock_path)
                time.sleep(0.01)
            return "waited", read_neff(module)
        try:
            if os.path.exists(os.path.join(module, "model.done")):  # finished while we probed
                return "waited", read_neff(module)
            for name, data in (
                ("model.hlo_module.pb", b"hlo" * 1000),
                ("compile_flags.json", b'["--target=trn1"]'),
                ("model.neff", payload),
                ("model.done", b""),
            ):
                with open(os.path.join(module, name), "wb") as f:
                    for i in range(0, len(data), 65536):  # several writes, like a real compiler
                        f.write(data[i : i + 65536])
                        f.flush()
            return "compiled", read_neff(module)
        finally:
            os.close(fd)
            os.unlink(lock_path)

    for rel in plan["order"][worker]:
        module = os.path.join(root, rel)
        state = probe(module)
        if state == "hit":
            results[rel] = ["hit", read_neff(module)]
        elif state == "miss":
            results[rel] = list(compile_module(module))
        else:
            results[rel] = ["failed", None]
    print(json.dumps(results))
    """
)


def _run_workers(root: Path, plan: dict, workers: int, tmp_path: Path) -> list[dict[str, list]]:
    script, plan_file = tmp_path / "compiler.py", tmp_path / "plan.json"
    script.write_text(COMPILER)
    plan_file.write_text(json.dumps(plan))
    argvs = [[sys.executable, str(script), str(root), str(plan_file), str(w)] for w in range(workers)]
    return [json.loads(out) for out in run_parallel(argvs, env=dict(os.environ), timeout=120)]


@pytest.mark.timeout(180)
def test_compiler_pattern_from_several_processes(hub: HubEmulator, bucket: dict, mount_neff: MountFn, tmp_path: Path):
    mp = mount_neff(bucket["bucket_id"])
    new = [f"{VERSION}/MODULE_{i}0000000000000000000+cafe{i:04x}" for i in range(3)]
    modules = bucket["complete"] + bucket["poisoned"] + bucket["locked"] + new
    workers, neff_size = 6, 300_000
    # Each worker visits the modules in its own order, so hits, misses and waits interleave.
    order = [modules[w % len(modules) :] + modules[: w % len(modules)] for w in range(workers)]
    order = [o if w % 2 else list(reversed(o)) for w, o in enumerate(order)]
    results = _run_workers(mp, {"order": order, "neff_size": neff_size}, workers, tmp_path)

    payloads = {_sha((f"neff of worker {w};".encode() * 100_000)[:neff_size]): w for w in range(workers)}
    for module in bucket["complete"]:
        remote = _remote_bytes(hub, bucket, f"{module}/model.neff")
        assert {tuple(r[module]) for r in results} == {("hit", _sha(remote))}
        # One upstream transfer per NEFF, however many processes read it.
        assert hub.bytes_served(f"{module}/model.neff") == len(remote)
    for module in bucket["poisoned"] + bucket["locked"] + new:
        states = [r[module][0] for r in results]
        shas = {r[module][1] for r in results}
        # Poisoned and stale-locked remote entries read as misses and are recompiled locally, once.
        assert states.count("compiled") + states.count("hit") >= 1, states
        assert states.count("compiled") <= 1, states
        assert len(shas) == 1 and shas.pop() in payloads  # one writer's complete content
        final = (mp / module / "model.neff").read_bytes()
        assert len(final) == neff_size and _sha(final) in payloads
        assert not os.path.exists(mp / module / "model.hlo_module.pb.lock")
        assert not os.path.exists(mp / module / "model.log")
    assert hub.bytes_served("model.hlo_module.pb") == 0  # nothing but the NEFFs of hits was read


@pytest.mark.timeout(120)
def test_concurrent_writers_to_one_new_module(bucket: dict, mount_neff: MountFn, tmp_path: Path) -> None:
    mp = mount_neff(bucket["bucket_id"])
    module = f"{VERSION}/MODULE_31415926535897932384+26433832"
    workers, neff_size = 8, 1_000_000
    results = _run_workers(mp, {"order": [[module]] * workers, "neff_size": neff_size}, workers, tmp_path)
    states = [r[module][0] for r in results]
    assert states.count("compiled") == 1 or (states.count("compiled") == 0 and "hit" in states), states
    final = (mp / module / "model.neff").read_bytes()
    writers = [w for w in range(workers) if final == (f"neff of worker {w};".encode() * 100_000)[:neff_size]]
    assert len(writers) == 1  # exactly one writer's complete content, never a mix
    assert {r[module][1] for r in results} == {_sha(final)}
    assert sorted(os.listdir(mp / module)) == ["compile_flags.json", "model.done", "model.hlo_module.pb", "model.neff"]


def test_one_transfer_per_neff_across_processes_and_reopens(hub: HubEmulator, bucket: dict, mount_neff: MountFn):
    mp = mount_neff(bucket["bucket_id"])
    module = bucket["complete"][2]  # the 1 MiB NEFF
    path = mp / module / "model.neff"
    code = f"import hashlib; print(hashlib.sha256(open({str(path)!r}, 'rb').read()).hexdigest())"
    shas = {out.strip() for out in run_parallel([[sys.executable, "-c", code]] * 6, env=dict(os.environ), timeout=60)}
    remote = _remote_bytes(hub, bucket, f"{module}/model.neff")
    assert shas == {_sha(remote)}
    assert _sha(path.read_bytes()) == _sha(remote)
    assert hub.bytes_served(f"{module}/model.neff") == len(remote)
    assert hub.bytes_served() == len(remote)


def test_rm_rf_and_recompile_a_remote_module(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    """Clearing one cache entry (rm -rf) and recompiling it: remote files never resurface, even after remount."""
    mp = mount_neff(bucket["bucket_id"])
    module = bucket["complete"][0]
    shutil.rmtree(mp / module)
    assert not os.path.exists(mp / module)
    assert module.split("/", 1)[1] not in os.listdir(mp / VERSION)
    (mp / module).mkdir()
    assert os.listdir(mp / module) == []  # recreated empty: the remote entries stay hidden
    (mp / module / "model.neff").write_bytes(b"recompiled")
    (mp / module / "model.done").write_bytes(b"")
    mount_neff.unmount(mp)  # type: ignore[attr-defined]
    mp = mount_neff(bucket["bucket_id"])
    assert sorted(os.listdir(mp / module)) == ["model.done", "model.neff"]
    assert (mp / module / "model.neff").read_bytes() == b"recompiled"
    assert hub.bytes_served(f"{module}/model.neff") == 0


def test_prefix_mount_and_remote_root_locks(hub: HubEmulator, mount_neff: MountFn) -> None:
    module = f"{VERSION}/MODULE_12345678901234567890+abcdef12"
    neff = os.urandom(20_000)
    files = {
        "team-a/lock": b"",
        f"team-a/{VERSION}/lock": b"",
        f"team-a/{module}/model.neff": neff,
        f"team-a/{module}/model.done": b"",
        f"team-b/{module}/model.neff": b"other team",
    }
    hub.add_bucket("org/shared", files)
    mp = mount_neff("org/shared", prefix="team-a")
    assert os.listdir(mp) == [VERSION]  # the remote root `lock` is hidden: a local one gets created
    assert os.listdir(mp / VERSION) == [module.split("/", 1)[1]]
    assert (mp / module / "model.neff").read_bytes() == neff
    assert hub.bytes_served(f"team-a/{module}/model.neff") == len(neff)
    with open(mp / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
    assert (hub.bucket_dir("org/shared") / "team-a" / "lock").stat().st_size == 0  # local only


# -- transient upstream failures (issue 26) ----------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_failed_probe_or_listing_is_eio_never_absent(hub: HubEmulator, bucket: dict, mount_neff: MountFn) -> None:
    """A module listing or a probe of a new module that fails upstream (503 after retries) answers EIO,
    never ENOENT (the compiler would recompile a module that exists); once the route answers, the module
    shows."""
    negative_ttl, timeout = 1.0, 3
    mp = mount_neff(bucket["bucket_id"], negative_ttl=negative_ttl, timeout=timeout)
    version = bucket["compiler_versions"][0]
    # A module of the listing whose own listing fails: EIO too, and nothing of the failure is kept.
    known = next(m for m in bucket["complete"] if m.startswith(f"{version}/"))
    hub.faults.add(f"*/tree/{known}", "status", status=503)
    assert _errno_of(lambda: os.stat(mp / known / "model.done")) == errno.EIO
    hub.faults.clear()
    assert os.path.exists(mp / known / "model.done")
    os.listdir(mp / version)  # the version's listing is cached without the module
    name = "MODULE_published_elsewhere+0000abcd"
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    for file, data in {"model.neff": b"neff", "compile_flags.json": b"[]", "model.done": b""}.items():
        (bucket_dir / version / name).mkdir(parents=True, exist_ok=True)
        (bucket_dir / version / name / file).write_bytes(data)
    time.sleep(negative_ttl + 0.2)  # the cached listing is now old enough for a probe
    hub.faults.add(f"*/tree/*{name}*", "status", status=503)
    hub.faults.add("*/paths-info*", "status", status=503, methods=("POST",))
    done = mp / version / name / "model.done"
    start = time.monotonic()
    assert _errno_of(lambda: os.stat(done)) == errno.EIO
    assert time.monotonic() - start < timeout + 2
    assert hub.faults.rules()[0].fired > 1  # retried before answering
    hub.faults.clear()
    start = time.monotonic()
    while not os.path.exists(done):  # nothing failed is remembered beyond the negative TTL
        assert time.monotonic() - start < negative_ttl + 2, "the module never showed after recovery"
        time.sleep(0.1)
    assert (mp / version / name / "model.neff").read_bytes() == b"neff"
