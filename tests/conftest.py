"""Session-wide local Hub emulator and a clean huggingface_hub environment for every test, plus the
helpers many test files share: a per-test runtime dir, a mount factory that never leaves a mount
behind, and a runner for client processes started all at once.

The emulator starts in ``pytest_configure`` because huggingface_hub reads ``HF_ENDPOINT`` and
friends once, at import time: the environment must be set before any test module imports it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hffs_neuron import constants
from hffs_neuron.mount import MountHandle, mount
from hffs_neuron.runtime import mountpoint_status
from hffs_neuron.testing.hub_emulator import HubEmulator

#: Token accepted by the emulator for gated repos.
TEST_TOKEN = "hf_emulator_test_token"

_state: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    session_dir = Path(tempfile.mkdtemp(prefix="hffs-tests-"))
    emulator = HubEmulator(session_dir / "hub", tokens=[TEST_TOKEN]).start()
    _state.update(dir=session_dir, emulator=emulator)
    for leaked in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        os.environ.pop(leaked, None)
    os.environ.update(
        HF_ENDPOINT=emulator.url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(session_dir / "hf_home"),  # no saved token can leak in
        HF_HUB_ETAG_TIMEOUT="10",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    emulator = _state.pop("emulator", None)
    if isinstance(emulator, HubEmulator):
        emulator.stop()
    session_dir = _state.pop("dir", None)
    if isinstance(session_dir, Path):
        shutil.rmtree(session_dir, ignore_errors=True)


@pytest.fixture
def hub() -> Iterator[HubEmulator]:
    """The session's emulator, emptied: no repos, buckets, stats or faults, default settings."""
    emulator = _state["emulator"]
    assert isinstance(emulator, HubEmulator)
    emulator.reset()
    yield emulator
    emulator.faults.clear()


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HF_HUB_CACHE (env var and the already-imported huggingface_hub constant)."""
    from huggingface_hub import constants  # imported late: only after pytest_configure set the env

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_token() -> str:
    """A token the emulator accepts for gated repos."""
    return TEST_TOKEN


@pytest.fixture
def runtime_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh runtime dir (state files, logs) for this test; returns the environment for a daemon.

    The daemon and this process must agree on it: mount(), status and push read state files here, and
    `constants.RUNTIME_DIR` was read at import time, so it is patched as well as passed on.
    """
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(constants, "RUNTIME_DIR", run)
    return dict(os.environ, HFFS_RUNTIME_DIR=str(run))


class Mounts:
    """Mount factory bound to one test's tmp dir and runtime dir (see the `mounts` fixture)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.tmp_path = tmp_path
        self.env = env
        # Keyed by mountpoint: a remount at the same place (after an unmount or a crash) replaces the
        # old handle, so teardown never unmounts a newer daemon on behalf of a dead one.
        self.handles: dict[str, MountHandle] = {}

    def __call__(
        self, view: str, source: str = "", *, name: str = "mnt", cache: str = "cache", **options: Any
    ) -> MountHandle:
        """Mount `view` of `source` at tmp_path/name (created if need be).

        The cache dir defaults to tmp_path/cache (named, so a test can remount on the same cache) and
        the environment to `runtime_env`; `cache_dir=` and `env=` in `options` override them.
        """
        mountpoint = self.tmp_path / name
        mountpoint.mkdir(exist_ok=True)
        options.setdefault("cache_dir", str(self.tmp_path / cache))
        options.setdefault("env", self.env)
        handle = mount(view, mountpoint, source, **options)
        self.handles[os.path.abspath(handle.mountpoint)] = handle
        return handle

    def unmount(self, target: MountHandle | str | os.PathLike[str]) -> str:
        """Unmount (not forced: a busy mount fails the test) a mount made here, by handle or mountpoint."""
        mountpoint = target.mountpoint if isinstance(target, MountHandle) else target
        return self.handles.pop(os.path.abspath(mountpoint)).unmount()

    def close(self) -> None:
        """Force-unmount every mount still alive (or stale), newest first; report failures, keep going."""
        for handle in reversed(list(self.handles.values())):
            try:
                if os.path.ismount(handle.mountpoint) or mountpoint_status(handle.mountpoint) == "stale":
                    handle.unmount(force=True)
                elif handle.process is not None:
                    handle.process.poll()  # unmounted elsewhere (hffs_neuron.unmount, mountctl): reap it
            except Exception as exc:  # one failure must not leave the other mounts behind
                print(f"unmount {handle.mountpoint} failed: {exc}", file=sys.stderr)
        self.handles.clear()


@pytest.fixture
def mounts(tmp_path: Path, runtime_env: dict[str, str]) -> Iterator[Mounts]:
    """`mounts(view, source="", *, name="mnt", cache="cache", **options) -> MountHandle`.

    Real daemons via `hffs_neuron.mount`, with tmp_path/cache and `runtime_env` unless given;
    `mounts.unmount(handle_or_mountpoint)` unmounts one; every mount still alive at teardown is
    force-unmounted.
    """
    factory = Mounts(tmp_path, runtime_env)
    try:
        yield factory
    finally:
        factory.close()


def _short(arg: str, limit: int = 80) -> str:
    return arg if len(arg) <= limit else arg[: limit - 3] + "..."


def run_parallel(argvs: list[list[str]], *, env: dict[str, str], timeout: float) -> list[str]:
    """Start one process per argv, all at once; wait for each (`timeout` seconds each, in order).

    Returns their stdout, in order. Each must exit 0: the failure message carries the tail of its
    stderr. A process still running when this returns or raises is killed, so a hung client never
    outlives the test (and keeps a mount busy).
    """
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv in argvs:
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = []
        for argv, proc in zip(argvs, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            command = " ".join(_short(arg) for arg in argv)
            assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{err[-4000:]}"
            outputs.append(out)
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- a second local user (shared hosts, publish trust) -------------------------------------------
@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int
    home: Path  # writable by the user: its HF_HOME

    def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60, groups: tuple[int, ...] = ()
    ):
        """Run `argv` as this user (with supplementary `groups`); returns the CompletedProcess (text)."""
        base = dict(os.environ if env is None else env, HOME=str(self.home), HF_HOME=str(self.home / "hf"))
        base.pop("HF_TOKEN", None)  # the other user has no token of its own
        extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        wrapped = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", extra, *argv]
        return subprocess.run(wrapped, env=base, capture_output=True, text=True, timeout=timeout)

    def python(self, script: str, *args: str, env: dict[str, str] | None = None, groups: tuple[int, ...] = ()):
        return self.run([sys.executable, "-c", script, *args], env=env, groups=groups)


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, useradd and setpriv")
    name = f"hffs-sec-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True, timeout=30)
    home = Path(tempfile.mkdtemp(prefix=f"{name}-home-"))
    try:
        uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
        gid = int(subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True).stdout)
        os.chown(home, uid, gid)
        yield OtherUser(name, uid, gid, home)
    finally:
        subprocess.run(["userdel", name], check=False, timeout=30)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def shared_mounts(runtime_env: dict[str, str]) -> Iterator[Mounts]:
    """Like `mounts`, but under a directory every user can traverse (tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="hffs-sec-mnt-"))
    base.chmod(0o755)
    factory = Mounts(base, runtime_env)
    try:
        yield factory
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)


# The other user's probe: run one file-system call, print its errno name (or "ok" and a result).
PROBE = r"""
import errno, json, os, sys
op, args = sys.argv[1], json.loads(sys.argv[2])
try:
    if op == "read":
        result = len(open(args[0], "rb").read())
    elif op == "write":
        with open(args[0], args[2] if len(args) > 2 else "wb") as f:
            f.write(args[1].encode())
        result = None
    elif op == "replace":  # huggingface_hub's ref update: temp file, then os.replace
        tmp = args[0] + ".0123abcd.tmp"
        with open(tmp, "w") as f:
            f.write(args[1])
        os.replace(tmp, args[0])
        result = None
    else:
        result = getattr(os, op)(*args)
    print(json.dumps(["ok", result]))
except OSError as exc:
    print(json.dumps([errno.errorcode[exc.errno], None]))
"""


def _as(user: OtherUser, op: str, *args: object, groups: tuple[int, ...] = ()) -> str:
    """errno name (or "ok") of `os.<op>(*args)` (or read/write/replace) run as `user`."""
    result = user.python(PROBE, op, json.dumps([str(a) if isinstance(a, Path) else a for a in args]), groups=groups)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])[0]
