"""The NEFF mount's writable layer against a reference model: a plain local directory.

A seeded random sequence of create / write / truncate / rename / unlink / mkdir / rmdir / stat / read /
flock runs on both trees, which start with the same files (remote files in the bucket, real files in
the reference). Every operation must give the same result or the same errno, and the trees must be
identical at the end and again after a remount. Plus an fsx-style random read/write/truncate run on
one remote-backed file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounts

import hffs_neuron
from hffs_neuron.testing.hub_emulator import HubEmulator

MODULE = "neuronxcc-2.0.0+0/MODULE_1+aaaaaaaa"
NAMES = ["f0.bin", "f1.bin", "d0/f2.bin", "d0/f3.bin", "d1/f4.bin", "d0/sub/f5.bin"]
DIRS = ["d0", "d1", "d0/sub", "d2"]
SEEDS = [1, 2, 3]


def _initial_files(rng: random.Random) -> dict[str, bytes]:
    return {name: rng.randbytes(rng.randrange(0, 70_000)) for name in ["f0.bin", "d0/f2.bin", "d0/sub/f5.bin"]}


def _outcome(fn) -> tuple:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def _apply(root: Path, op: tuple) -> tuple:
    kind, *args = op
    p = root / args[0]
    if kind == "create":

        def create() -> int:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if args[2] else os.O_TRUNC), 0o644)
            try:
                return os.write(fd, args[1])
            finally:
                os.close(fd)

        return _outcome(create)
    if kind == "write":

        def write() -> int:
            fd = os.open(p, os.O_WRONLY)
            try:
                return os.pwrite(fd, args[2], args[1])
            finally:
                os.close(fd)

        return _outcome(write)
    if kind == "truncate":
        return _outcome(lambda: os.truncate(p, args[1]))
    if kind == "rename":
        return _outcome(lambda: os.rename(p, root / args[1]))
    if kind == "unlink":
        return _outcome(lambda: os.unlink(p))
    if kind == "mkdir":
        return _outcome(lambda: os.mkdir(p))
    if kind == "rmdir":
        return _outcome(lambda: os.rmdir(p))
    if kind == "stat":
        return _outcome(lambda: (os.stat(p).st_size, os.path.isdir(p)))
    if kind == "read":
        return _outcome(lambda: p.read_bytes())
    if kind == "flock":

        def lock() -> bool:
            with open(p, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            return True

        return _outcome(lock)
    if kind == "listdir":
        return _outcome(lambda: sorted(os.listdir(p)))
    raise AssertionError(kind)


def _random_op(rng: random.Random) -> tuple:
    kind = rng.choice(
        ["create", "write", "truncate", "rename", "unlink", "mkdir", "rmdir", "stat", "read", "flock", "listdir"]
    )
    name = rng.choice(NAMES)
    if kind == "create":
        return (kind, name, rng.randbytes(rng.randrange(0, 5000)), rng.random() < 0.3)
    if kind == "write":
        return (kind, name, rng.randrange(0, 80_000), rng.randbytes(rng.randrange(1, 3000)))
    if kind == "truncate":
        return (kind, name, rng.randrange(0, 90_000))
    if kind == "rename":
        return (kind, name, rng.choice(NAMES))
    if kind in ("mkdir", "rmdir"):
        return (kind, rng.choice(DIRS))
    if kind == "listdir":
        return (kind, rng.choice(["", *DIRS]))
    return (kind, name)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            tree[os.path.relpath(full, root)] = Path(full).read_bytes()
    return tree


@pytest.fixture
def neff_mount(hub: HubEmulator, mounts: Mounts) -> Callable[..., Path]:
    """`neff_mount(name="mnt")` -> mountpoint of bucket `model/posix`; every mount shares one cache dir."""

    def mount(name: str = "mnt") -> Path:
        return Path(mounts("neff", "model/posix", name=name).mountpoint)

    return mount


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_a_local_directory(hub: HubEmulator, neff_mount, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    initial = _initial_files(rng)
    hub.add_bucket("model/posix", {f"{MODULE}/{name}": data for name, data in initial.items()})
    reference = tmp_path / "reference"
    for name, data in initial.items():
        (reference / name).parent.mkdir(parents=True, exist_ok=True)
        (reference / name).write_bytes(data)
    mountpoint = neff_mount()
    mounted = mountpoint / MODULE

    succeeded: dict[str, int] = {}
    for step in range(250):
        op = _random_op(rng)
        got, want = _apply(mounted, op), _apply(reference, op)
        assert got == want, f"seed {seed} step {step}: {op[:2]} gave {got!r:.200}, local gives {want!r:.200}"
        if got[0] == "ok":
            succeeded[op[0]] = succeeded.get(op[0], 0) + 1
    assert _snapshot(mounted) == _snapshot(reference)
    # The sequence really exercised the layer (not a run of ENOENTs).
    assert all(succeeded.get(kind, 0) > 0 for kind in ("create", "write", "truncate", "rename", "unlink", "read"))

    # Everything written through the mount persists in the local layer across a remount.
    hffs_neuron.unmount(mountpoint)
    mountpoint = neff_mount("mnt2")
    assert _snapshot(mountpoint / MODULE) == _snapshot(reference)


@pytest.mark.timeout(180)
def test_fsx_random_io_on_one_remote_backed_file(hub: HubEmulator, neff_mount, tmp_path: Path) -> None:
    rng = random.Random(42)
    original = rng.randbytes(300_000)
    hub.add_bucket("model/posix", {f"{MODULE}/model.neff": original})
    mountpoint = neff_mount()
    path = mountpoint / MODULE / "model.neff"
    model = bytearray(original)
    fd = os.open(path, os.O_RDWR)  # opening for write copies the remote file up
    try:
        for step in range(600):
            action = rng.random()
            if action < 0.45:
                offset, length = rng.randrange(0, len(model) + 10), rng.randrange(1, 70_000)
                assert os.pread(fd, length, offset) == bytes(model[offset : offset + length]), f"step {step}"
            elif action < 0.9:
                offset, data = rng.randrange(0, len(model) + 5000), rng.randbytes(rng.randrange(1, 20_000))
                assert os.pwrite(fd, data, offset) == len(data)
                if offset > len(model):
                    model.extend(b"\0" * (offset - len(model)))
                model[offset : offset + len(data)] = data
            else:
                size = rng.randrange(0, 400_000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(b"\0" * (size - len(model)))
            if step % 100 == 0:
                os.fsync(fd)
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(model)
    assert hub.bytes_served("model.neff") == len(original)  # the copy-up fetched the remote bytes once
