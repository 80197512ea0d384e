"""POSIX behaviour of the writable layers (issue 25), checked op by op against a local directory.

pjdfstest (`scripts/conformance.sh`) measures the whole suite; these tests pin what it found: FIFOs and
sockets, utimensat's UTIME_NOW / UTIME_OMIT and nanoseconds, paths near PATH_MAX, modes as asked, and
the deliberate refusals (device nodes, setuid/setgid bits, hard links: EPERM). The hub-cache view's
writable parts do huggingface_hub's operations exactly as a local directory does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

pytestmark = pytest.mark.timeout(120)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"


@pytest.fixture
def module_dirs(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> tuple[Path, Path]:
    """(a module directory of a NEFF mount, a local directory), both empty."""
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"], allow_other=True).mountpoint)
    module = mp / VERSION / "MODULE_posix+00000000"
    module.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    return module, local


def _errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno
    return 0


def test_fifos_and_sockets(module_dirs: tuple[Path, Path]) -> None:
    module, _ = module_dirs
    fifo = module / "pipe"
    os.mkfifo(fifo, 0o640)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_IMODE(os.lstat(fifo).st_mode) == 0o640
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"through the fifo")
    assert os.read(reader, 100) == b"through the fifo"
    os.close(writer)
    os.close(reader)
    # A socket bound in the module (by a relative name: socket paths are short).
    code = "import socket, os, sys; os.chdir(sys.argv[1]); s = socket.socket(socket.AF_UNIX); s.bind('sock')"
    subprocess.run([sys.executable, "-c", code, str(module)], check=True, timeout=30)
    assert stat.S_ISSOCK(os.lstat(module / "sock").st_mode)
    os.unlink(module / "sock")
    os.unlink(fifo)
    assert sorted(os.listdir(module)) == []


def test_deliberate_refusals_are_eperm(module_dirs: tuple[Path, Path]) -> None:
    module, _ = module_dirs
    (module / "f").write_bytes(b"x")
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert _errno_of(lambda kind=kind: os.mknod(module / "dev", kind | 0o600, os.makedev(1, 3))) == errno.EPERM
    assert _errno_of(lambda: os.link(module / "f", module / "g")) == errno.EPERM
    assert _errno_of(lambda: os.chmod(module / "f", 0o4755)) == errno.EPERM
    assert _errno_of(lambda: os.chmod(module / "f", 0o2755)) == errno.EPERM
    assert _errno_of(lambda: os.open(module / "s", os.O_CREAT | os.O_WRONLY, 0o4755)) == errno.EPERM
    assert sorted(os.listdir(module)) == ["f"]  # nothing half-made


def test_modes_and_times_as_asked(module_dirs: tuple[Path, Path]) -> None:
    module, local = module_dirs
    for directory in (module, local):
        f = directory / "f"
        f.write_bytes(b"x")
        for mode in (0o222, 0o1777, 0o666, 0o000, 0o644):
            os.chmod(f, mode)
            assert stat.S_IMODE(os.lstat(f).st_mode) == mode, (directory, oct(mode))
        os.utime(f, ns=(1_000_000_001, 2_000_000_002))  # nanoseconds kept
        st = os.lstat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
        subprocess.run(["touch", "-m", "-d", "@1234567890", str(f)], check=True)  # atime: UTIME_OMIT
        st = os.lstat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 1_234_567_890_000_000_000)
        before = time.time()
        subprocess.run(["touch", str(f)], check=True)  # both: UTIME_NOW
        st = os.lstat(f)
        assert st.st_mtime >= before - 2 and st.st_atime >= before - 2, (directory, st)


def test_paths_near_path_max(module_dirs: tuple[Path, Path]) -> None:
    """A client path of almost 4,096 bytes inside a module (pjdfstest's */03.t): longer than PATH_MAX
    once the layer's own prefix is added, resolved in pieces."""
    module, _ = module_dirs
    os.chdir(module)  # the mountpoint prefix would push the absolute path past PATH_MAX itself
    try:
        component = "d" * 250
        deep = "/".join([component] * 16)
        os.makedirs(deep)
        name = f"{deep}/{'f' * (4089 - len(deep))}"  # 4,090 bytes, each component under NAME_MAX
        assert len(name) == 4090
        with open(name, "wb") as f:
            f.write(b"deep")
        assert open(name, "rb").read() == b"deep"
        os.chmod(name, 0o600)
        assert stat.S_IMODE(os.lstat(name).st_mode) == 0o600
        os.unlink(name)
        assert not os.path.exists(name)
    finally:
        os.chdir("/")


def test_hub_cache_writable_parts_behave_like_a_local_directory(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path
) -> None:
    """The operations huggingface_hub performs in `.locks/`, `.no_exist/`, `refs/` and `blobs/`, run the
    same way on the mount and on a local directory: same results, errno for errno."""
    hub.add_repo("Org/Model", {"config.json": b"{}"})
    (tmp_path / "backing").mkdir()
    mp = Path(mounts("hub-cache", backing=str(tmp_path / "backing")).mountpoint)
    local = tmp_path / "local"
    local.mkdir()

    def steps(root: Path) -> list[object]:
        seen: list[object] = []
        repo = root / "models--Org--Model"
        lock = root / ".locks" / "models--Org--Model" / "abc.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        os.fchmod(fd, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(_errno_of(lambda: os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR)))
        seen.append(os.fstat(fd).st_nlink >= 1)
        marker = repo / ".no_exist" / ("0" * 40) / "missing.txt"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        seen.append(marker.is_file())
        refs = repo / "refs"
        refs.mkdir(exist_ok=True)
        tmp = refs / "main.0123abcd.tmp"
        tmp.write_text("f" * 40)
        os.replace(tmp, refs / "main")
        seen.append((refs / "main").read_text())
        blobs = repo / "blobs"
        blobs.mkdir(exist_ok=True)
        incomplete = blobs / "cafe.0123abcd.incomplete"
        incomplete.write_bytes(b"part")
        with open(incomplete, "ab") as f:
            f.write(b" and the rest")
        os.utime(incomplete, ns=(5, 6))
        seen.append(os.lstat(incomplete).st_mtime_ns)
        os.replace(incomplete, blobs / "cafe")
        seen.append((blobs / "cafe").read_bytes())
        os.close(fd)
        os.unlink(lock)
        seen.append(_errno_of(lambda: os.unlink(lock)))
        return seen

    assert steps(mp) == steps(local)
