"""The merged view's namespace operations on a real NEFF mount (issue 11 items 1-5): directory renames
keep everything, emptiness is judged on the merged view, one mount per local layer, open files can be
unlinked, copy-up temp files are never visible, and no operation waits behind another path's download.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.errors import MountError
from hffs_neuron.proc import HOST
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

pytestmark = pytest.mark.timeout(120)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"


def _errno_of(fn) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _layer(cache: Path) -> Path:
    (layer,) = (cache / "neff-layers").iterdir()
    return layer


def test_mv_of_a_partly_remote_module_keeps_every_file(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    source = mp / bucket["complete"][0]
    (source / "extra.bin").write_bytes(b"local file")  # the module is now partly local, partly remote
    (source / "model.done").unlink()  # and one remote file is deleted
    expected = _tree(source)
    assert set(expected) == {"model.hlo_module.pb", "compile_flags.json", "model.neff", "extra.bin"}
    target = mp / VERSION / "MODULE_moved+12345678"
    # Moving remote content would need a copy-up of all of it: the kernel call says EXDEV, `mv` copies.
    assert _errno_of(lambda: os.rename(source, target)) == errno.EXDEV
    result = subprocess.run(["mv", str(source), str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not source.exists() and source.name not in os.listdir(source.parent)
    assert _tree(target) == expected
    mounts.unmount(mp)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    assert not source.exists()
    assert _tree(target) == expected

    # A directory with no remote entries left renames in place, and stays renamed.
    (target / "sub").mkdir()
    (target / "sub" / "f").write_bytes(b"f")
    os.rename(target / "sub", target / "sub2")
    assert (target / "sub2" / "f").read_bytes() == b"f" and not (target / "sub").exists()


def test_rename_onto_a_non_empty_merged_directory_is_enotempty(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    remote = mp / bucket["complete"][1]
    merged = mp / bucket["complete"][2]
    (merged / "tmp").write_bytes(b"x")
    (merged / "tmp").unlink()  # a local directory now exists for it, empty: the remote files count
    for destination in (remote, merged):
        empty = mp / VERSION / "MODULE_empty+00000000"
        empty.mkdir()
        assert _errno_of(lambda d=destination, e=empty: os.rename(e, d)) == errno.ENOTEMPTY
        empty.rmdir()
        assert (destination / "model.neff").exists()
    # Onto an empty directory a local one still goes.
    a, b = mp / VERSION / "MODULE_a+00000001", mp / VERSION / "MODULE_b+00000002"
    a.mkdir()
    b.mkdir()
    (a / "f").write_bytes(b"a")
    os.rename(a, b)
    assert (b / "f").read_bytes() == b"a" and not a.exists()
    assert _errno_of(lambda: os.rename(b, remote / "model.neff")) == errno.ENOTDIR


def test_a_second_mount_of_one_layer_fails_clearly(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    first = Path(mounts("neff", bucket["bucket_id"], name="first").mountpoint)
    module = first / bucket["complete"][0]
    (module / "model.done").unlink()
    with pytest.raises(MountError) as info:
        mounts("neff", bucket["bucket_id"], name="second")
    message = str(info.value)
    assert "already mounted on this host" in message and "\n" not in message
    assert not os.path.ismount(first.parent / "second")
    mounts.unmount(first)
    second = Path(mounts("neff", bucket["bucket_id"], name="second").mountpoint)
    assert not (second / bucket["complete"][0] / "model.done").exists()  # the deletion was not lost


def test_unlinking_an_open_file_leaves_no_hidden_copy(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    module = mp / bucket["complete"][2]  # its neff is 1 MiB
    remote_bytes = (hub.bucket_dir(bucket["bucket_id"]) / bucket["complete"][2] / "model.neff").read_bytes()
    local = module / "local.bin"
    local.write_bytes(b"local bytes")
    with open(module / "model.neff", "rb") as remote_file, open(local, "rb") as local_file:
        assert remote_file.read(10) == remote_bytes[:10]
        (module / "model.neff").unlink()
        local.unlink()
        assert remote_file.read() == remote_bytes[10:]  # open handles keep working
        assert local_file.read() == b"local bytes"
        names = os.listdir(module)
        assert "model.neff" not in names and "local.bin" not in names
        assert not [n for n in names if n.startswith(".fuse_hidden")]
    assert not [n for n in os.listdir(module) if n.startswith(".fuse_hidden")]
    assert not list(_layer(tmp_path / "cache").rglob(".fuse_hidden*"))
    assert not (_layer(tmp_path / "cache") / "upper" / bucket["complete"][2] / "model.neff").exists()  # no copy-up
    assert hub.bytes_served("model.neff") == len(remote_bytes)


def test_writes_reach_the_layer_and_every_reader(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    """Writes go from libfuse's buffer straight into the layer file (write_buf), of any size and offset, also
    to a file already unlinked (libfuse has no path for it then); closes need no FLUSH; a local file's page
    cache, kept across opens, shows each change made through the mount."""
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    module = mp / VERSION / "MODULE_writes+00000001"
    module.mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    fd = os.open(module / "model.neff", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        mib = 1024 * 1024
        # Larger than a request, odd offsets, overlaps, a hole filled last: together every byte once at least.
        for start, end in ((0, mib + 3), (mib + 7, 2 * mib + 4100), (2 * mib + 4096, len(data)), (mib + 3, mib + 7)):
            os.pwrite(fd, data[start:end], start)
    finally:
        os.close(fd)
    layer_file = _layer(tmp_path / "cache") / "upper" / VERSION / "MODULE_writes+00000001" / "model.neff"
    assert layer_file.read_bytes() == data
    assert (module / "model.neff").read_bytes() == data
    with open(module / "model.neff", "r+b", buffering=0) as f:  # kept pages, then a change through the mount
        f.write(b"changed")
    assert (module / "model.neff").read_bytes() == b"changed" + data[7:]
    (module / "model.neff").write_bytes(b"short")  # O_TRUNC: no kept page survives it
    assert (module / "model.neff").read_bytes() == b"short"
    reader = open(module / "model.neff", "rb")
    with open(module / "model.neff", "r+b", buffering=0) as writer, reader:
        (module / "model.neff").unlink()
        assert writer.write(b"after unlink") == 12
        assert reader.read(12) == b"after unlink"
    assert not layer_file.exists() and "model.neff" not in os.listdir(module)


def test_copy_up_temp_files_are_private_and_cleaned_at_start(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    module = f"{VERSION}/MODULE_big+00000000"
    data = os.urandom(48 * 1024 * 1024)
    hub.add_bucket("copyup/cache", {f"{module}/model.neff": data, f"{module}/model.done": b""})
    mp = Path(mounts("neff", "copyup/cache").mountpoint)
    layer = _layer(tmp_path / "cache")
    upper_module = layer / "upper" / module
    hub.faults.add("*/resolve/*model.neff", "latency", seconds=1)
    seen: set[str] = set()

    def copy_up() -> None:
        with open(mp / module / "model.neff", "r+b") as f:
            f.write(b"X")

    writer = threading.Thread(target=copy_up)
    writer.start()
    while writer.is_alive():
        seen.update(os.listdir(mp / module))
        if upper_module.is_dir():
            seen.update(os.listdir(upper_module))
        time.sleep(0.002)
    writer.join()
    assert seen <= {"model.neff", "model.done"}  # never a partial file or a temp name
    assert (mp / module / "model.neff").read_bytes() == b"X" + data[1:]
    assert not list((layer / "tmp").iterdir())

    # Leftovers of a crashed writer of this host go at start; another host's recent ones stay.
    mounts.unmount(mp)
    dead = layer / "tmp" / f"{HOST}.999999999.0"
    other_host = layer / "tmp" / "other-host.example.1.0"
    old_other_host = layer / "tmp" / "gone-host.2.0"
    for path in (dead, other_host, old_other_host):
        path.write_bytes(b"partial")
    os.utime(old_other_host, (time.time() - 3 * 24 * 3600,) * 2)
    mounts("neff", "copyup/cache")
    assert sorted(p.name for p in (layer / "tmp").iterdir()) == [other_host.name]


def test_an_unrelated_mkdir_does_not_wait_for_a_copy_up(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    slow = mp / bucket["complete"][1] / "model.neff"
    hub.faults.add("*/resolve/*model.neff", "latency", seconds=4)
    writer = threading.Thread(target=lambda: open(slow, "r+b").close())
    writer.start()
    deadline = time.monotonic() + 10
    while not hub.requests("model.neff"):
        assert time.monotonic() < deadline, "the copy-up never started its download"
        time.sleep(0.01)
    other = mp / VERSION / "MODULE_unrelated+00000000"
    other.mkdir()
    with open(mp / "lock", "w"), open(other / "model.hlo_module.pb", "wb") as f:
        f.write(b"hlo")
    assert writer.is_alive()  # the compiler's creates were served while the download was still running
    writer.join(timeout=60)
    assert slow.stat().st_size > 0


def test_rename_noreplace_never_replaces(hub: HubEmulator, mounts: Mounts) -> None:
    """renameat2(RENAME_NOREPLACE) (`mv -n`, `mv --exchange` fallbacks) is honoured, on merged names too."""
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    module = mp / bucket["complete"][0]
    (module / "new").write_bytes(b"new")
    for target in ("model.neff", "compile_flags.json"):  # remote-only names
        assert _errno_of(lambda t=target: _renameat2(module / "new", module / t, 1)) == errno.EEXIST
    (module / "other").write_bytes(b"other")  # a local name
    assert _errno_of(lambda: _renameat2(module / "new", module / "other", 1)) == errno.EEXIST
    assert (module / "new").read_bytes() == b"new" and (module / "other").read_bytes() == b"other"
    _renameat2(module / "new", module / "fresh", 1)
    assert (module / "fresh").read_bytes() == b"new"
    assert _errno_of(lambda: _renameat2(module / "fresh", module / "other", 2)) == errno.EINVAL  # EXCHANGE


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:  # AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
