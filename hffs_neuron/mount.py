"""The Python API of hffs-neuron, which `mountctl` is built on: mount, unmount, status, prefetch, cache.

`mount(...)` starts a fresh daemon process (`python -m hffs_neuron.daemon`, never a fork of a threaded
process), waits until the mount answers or the daemon reports its error, and returns a `MountHandle`
(a context manager). Configuration lives in `config`, state files and mountpoint checks in `runtime`,
the serving process in `daemon`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants, errors
from .config import VIEWS, MountConfig, parse_size, validate_config
from .errors import HffsError, MountError, PathNotFound, UsageError
from .proc import pid_alive
from .process_tuning import with_huge_page_malloc
from .runtime import (
    MountEntry,
    check_fuse_available,
    check_mountpoint,
    control_address,
    ensure_private_dir,
    forget_state,
    fuse_fstype,
    fusermount_unmount,
    hffs_mounts,
    lazy_unmount,
    mountpoint_status,
    open_private_file,
    read_state,
    read_states,
    state_path,
    users_of,
)
from .sources import parse_source
from .telemetry import STATUS_TIMEOUT, query_status

logger = logging.getLogger(__name__)

# Seconds between two progress reports of `prefetch` (each asks the daemons for their transfers).
PROGRESS_INTERVAL = 0.5


@dataclass
class MountHandle:
    """A running mount daemon. Use as a context manager, or call `unmount()`."""

    mountpoint: str
    pid: int
    process: subprocess.Popen | None = None

    def unmount(self, timeout: float = 30.0, force: bool = False) -> str:
        """Unmount and wait for the daemon, like `mountctl umount [--force]`; returns what was done.

        A busy mount raises MountError naming its users, unless `force` (then it is detached lazily
        and the daemon exits once they are gone).
        """
        message = unmount(self.mountpoint, timeout=timeout, force=force, pid=self.pid)
        if self.process is not None and not pid_alive(self.pid):
            self.process.wait(timeout=timeout)  # reap the daemon
        return message

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        # Leaving the block must never leave a mount behind, even with a file still open.
        if os.path.ismount(self.mountpoint) or mountpoint_status(self.mountpoint) == "stale":
            self.unmount(force=True)


def mount(
    view: str,
    mountpoint: str | os.PathLike,
    source: str = "",
    *,
    token: str | None = None,
    ready_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    **options: Any,
) -> MountHandle:
    """Mount `view` ("neff" with `source`=bucket id, or "hub-cache") in a background daemon.

    Returns once the mount answers; raises `MountError`/`UsageError`/... with the daemon's own message
    otherwise. `options` are `MountConfig` fields (prefix, read_only, backing, repos, cache_dir, ...).
    """
    if view not in VIEWS:
        raise UsageError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    config = MountConfig(view=view, mountpoint=os.path.abspath(mountpoint), source=source, **options)
    if view == "neff":  # any accepted spelling (hffs_neuron/sources.py) is kept in its one canonical form
        config.source, config.prefix = parse_source(config.source, config.prefix).config_fields()
    validate_config(config)
    check_fuse_available()
    check_mountpoint(config.mountpoint)
    if config.log_file is None:
        config.log_file = str(constants.RUNTIME_DIR / f"{state_path(config.mountpoint).stem}.log")
    child_env = dict(os.environ if env is None else env)
    if token:
        child_env["HF_TOKEN"] = token  # never on the command line, where `ps` would show it
    child_env["GLIBC_TUNABLES"] = with_huge_page_malloc(child_env.get("GLIBC_TUNABLES"))
    ensure_private_dir(constants.RUNTIME_DIR)
    Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
    # The daemon's stdout/stderr (libfuse prints its errors there, Python its tracebacks) go to the log.
    log_fd = open_private_file(config.log_file)
    read_fd, write_fd = os.pipe()
    config_read, config_write = os.pipe()
    try:
        process = subprocess.Popen(
            # The config travels on a pipe: on the command line every user could read it (`ps`).
            [sys.executable, "-m", "hffs_neuron.daemon", "--ready-fd", str(write_fd)]
            + ["--config-fd", str(config_read), config.mountpoint],
            pass_fds=(write_fd, config_read),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=child_env,
            start_new_session=True,  # survives the terminal; SIGTERM via `mountctl umount`
        )
    except BaseException:
        os.close(read_fd)
        os.close(config_write)
        raise
    finally:
        os.close(write_fd)
        os.close(config_read)
        os.close(log_fd)
    _send_config(config_write, config)
    message = _read_ready(read_fd, process, ready_timeout, config.log_file)
    if message != "READY":
        _stop_daemon(process)
        if os.path.ismount(config.mountpoint):  # nothing left half-done
            lazy_unmount(config.mountpoint)
        _, _, detail = message.partition(" ")
        kind, _, text = detail.partition(" ")
        error_class = getattr(errors, kind, MountError)
        if not (isinstance(error_class, type) and issubclass(error_class, HffsError)):
            error_class = MountError
        raise error_class(text or detail or "the mount daemon exited before the mount was ready")
    return MountHandle(config.mountpoint, process.pid, process)


def _send_config(fd: int, config: MountConfig) -> None:
    """Write the daemon's configuration to its pipe and close it (the daemon reads to the end)."""
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(config.to_json().encode())
    except BrokenPipeError:  # the daemon died before reading: _read_ready reports how
        pass


def _stop_daemon(process: subprocess.Popen) -> None:
    """Stop a daemon that failed to come up, and reap it (each wait bounded)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stuck in the kernel: nothing more to do from here
            logger.warning("mount daemon pid %d did not exit after SIGKILL", process.pid)


def _read_ready(fd: int, process: subprocess.Popen, timeout: float, log_file: str | None) -> str:
    """The daemon's first line on the ready pipe (`READY` or `ERROR <class> <message>`), or an ERROR line
    of our own if it exits or `timeout` passes without one. Closes `fd`."""
    deadline = time.monotonic() + timeout
    buffer = b""
    try:
        os.set_blocking(fd, False)
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                buffer += chunk
                if b"\n" in buffer:
                    return buffer.split(b"\n", 1)[0].decode(errors="replace")
            elif chunk == b"" or (process.poll() is not None and not buffer):
                break  # end of the pipe, or the daemon died without a word
            time.sleep(0.02)
    finally:
        os.close(fd)
    said = buffer.decode(errors="replace").strip()
    if said:
        return said
    # The pipe reaches its end a moment before the exit status is available: wait for it (bounded), so
    # a crash is reported as one, not as a timeout.
    try:
        process.wait(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        return "ERROR MountError timed out waiting for the mount"
    return f"ERROR MountError the mount daemon exited with code {process.returncode}{_log_hint(log_file)}"


def _log_hint(log_file: str | None) -> str:
    """`: <last line of the daemon's log>`, so a crash is diagnosable from the one-line error."""
    if not log_file:
        return ""
    try:
        lines = [line for line in Path(log_file).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()[:300]} (see {log_file})" if lines else f" (see {log_file})"


def unmount(
    mountpoint: str | os.PathLike, *, timeout: float = 30.0, force: bool = False, pid: int | None = None
) -> str:
    """Unmount and wait for the daemon to exit. Returns what was done (for the CLI to print)."""
    mountpoint = os.path.abspath(mountpoint)
    status = mountpoint_status(mountpoint)
    if pid is None:  # recorded here, or a daemon of ours started with another runtime dir
        state = read_state(mountpoint) or query_status(control_address(mountpoint))
        pid = state.get("pid", -1) if state else -1
    if status == "stale":
        # Dead daemon ("Transport endpoint is not connected"): nothing is served any more, so a plain
        # unmount is safe; only users still inside (EBUSY) need --force to detach lazily.
        result = fusermount_unmount(mountpoint)
        if result.returncode != 0 and mountpoint_status(mountpoint) == "stale":
            if not force:
                users = users_of(mountpoint)
                raise MountError(
                    f"{mountpoint}: the daemon is dead (Transport endpoint is not connected) and the mount is busy"
                    f"{' (used by ' + ', '.join(users[:5]) + ')' if users else ''}; "
                    f"run: mountctl umount --force {mountpoint}"
                )
            lazy_unmount(mountpoint)
        forget_state(mountpoint)
        return f"{mountpoint}: cleared a stale mount (daemon was dead)"
    if status != "mounted":
        forget_state(mountpoint)
        raise MountError(f"{mountpoint}: not mounted")
    fstype = fuse_fstype(mountpoint)
    if fstype is not None and fstype != "fuse.hffs":
        raise MountError(f"{mountpoint}: not an hffs mount ({fstype}); use umount")
    # A plain (non-lazy) unmount first: it fails with EBUSY while anything uses the mount, which we
    # report. SIGTERM would make libfuse detach lazily and exit, leaving those users with a dead mount.
    result = fusermount_unmount(mountpoint)
    if result.returncode != 0 and os.path.ismount(mountpoint):
        return _busy_or_fail(mountpoint, result.stderr, force, pid)
    # Unmounted: the daemon sees its session end, cleans up and exits. Wait for that.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            forget_state(mountpoint)
            return f"{mountpoint}: unmounted"
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGTERM)  # unmounted but still running after `timeout`: make it exit
    except ProcessLookupError:  # it exited just now
        pass
    forget_state(mountpoint)
    return f"{mountpoint}: unmounted (daemon pid {pid} did not exit in {timeout:.0f}s; sent SIGTERM)"


def _busy_or_fail(mountpoint: str, stderr: str, force: bool, pid: int) -> str:
    if "busy" not in stderr.lower():
        raise MountError(f"{mountpoint}: unmount failed: {stderr.strip() or 'unknown error'}")
    users = users_of(mountpoint)
    who = f"used by {', '.join(users[:5])}{' ...' if len(users) > 5 else ''}" if users else "open files"
    if not force:
        raise MountError(
            f"{mountpoint}: busy ({who}); close them, or detach lazily with: mountctl umount --force {mountpoint}"
        )
    # The daemon keeps serving the remaining users and exits when the kernel drops the last reference.
    lazy_unmount(mountpoint)
    forget_state(mountpoint)
    return f"{mountpoint}: was busy ({who}); detached lazily, the daemon (pid {pid}) exits when they are done"


# -- status, prefetch and cache: the rest of the API the CLI prints --------------------------------
def status(mountpoint: str | os.PathLike | None = None) -> list[dict]:
    """Status of every hffs mount on the host (or the one at `mountpoint`), in the schema of README
    "Status and metrics".

    Mounts are found in /proc/self/mountinfo, whatever runtime dir started them, and asked on their
    control socket (`runtime.control_address`): a daemon that answers gives the figures of this moment
    (`live`: true). Another user's mount is listed with its source and `health` "not yours" (its
    daemon answers its own user and root only). A daemon that is dead or silent is shown from the state
    it saved in this user's runtime dir, if any (`live`: false, and `alive`: false if dead); recorded
    mounts no longer in the mount table are listed too. Derived fields: `health` ("running", "dead",
    "not mounted", "not answering", "not yours"), `mounted`, `uptime`, `cache_used`.
    """
    wanted = os.path.realpath(mountpoint) if mountpoint is not None else None
    saved = {s.get("mountpoint"): s for s in read_states() if wanted in (None, s.get("mountpoint"))}
    me = os.geteuid()
    found = []
    for entry in hffs_mounts():
        if wanted not in (None, entry.mountpoint):
            continue
        state = saved.pop(entry.mountpoint, None)
        if me != 0 and entry.uid not in (None, me):
            found.append(_not_yours(entry))
            continue
        live = query_status(control_address(entry.mountpoint), entry.uid)
        if live is not None:
            found.append(_derived(live, live=True))
        elif state is not None:
            found.append(_derived(state, live=False))
        else:
            found.append(_unanswered(entry))
    found += [_derived(state, live=False) for state in saved.values()]
    if wanted is not None and not found:
        raise MountError(f"{mountpoint}: no hffs mount here (see mountctl status)")
    return found


def _not_yours(entry: MountEntry) -> dict:
    """Another user's mount: what mountinfo says, nothing its daemon knows."""
    return {
        "mountpoint": entry.mountpoint,
        "source": entry.source,
        "fsname": entry.source,
        "owner_uid": entry.uid,
        "mounted": True,
        "live": False,
        "health": "not yours",
    }


def _unanswered(entry: MountEntry) -> dict:
    """A mount of ours whose daemon does not answer and left no state in this runtime dir."""
    try:
        stale = mountpoint_status(entry.mountpoint) == "stale"
    except OSError:
        stale = False
    return {
        "mountpoint": entry.mountpoint,
        "source": entry.source,
        "fsname": entry.source,
        "owner_uid": entry.uid,
        "mounted": not stale,
        "live": False,
        "alive": not stale,
        "health": "dead" if stale else "not answering",
    }


def _derived(state: dict, live: bool) -> dict:
    """`state` (a live answer or a saved state) with the derived fields added."""
    state["live"] = live
    try:
        where = mountpoint_status(state.get("mountpoint", ""))
    except OSError:
        where = "unknown"
    state["mounted"] = where == "mounted"
    if not state["alive"] or where == "stale":
        state["health"] = "dead"
    else:
        state["health"] = "running" if state["mounted"] else "not mounted"
    state["uptime"] = state["uptime_s"] = round(time.time() - state.get("started", time.time()), 1)
    cache = state.setdefault("cache", {"dir": state.get("cache_dir"), "used_bytes": None, "limit_bytes": None})
    if cache.get("used_bytes") is None:
        cache["used_bytes"] = cache_usage(state.get("cache_dir") or "/nonexistent")[0]
    state["cache_used"] = cache["used_bytes"]
    return state


def mount_state_of(path: str | os.PathLike) -> dict | None:
    """The status of the hffs mount whose mountpoint holds `path` (the innermost one), or None."""
    real = os.path.realpath(path)
    mountpoints = [m.mountpoint for m in hffs_mounts()] + [s["mountpoint"] for s in read_states() if "mountpoint" in s]
    inside = [mp for mp in mountpoints if real == mp or real.startswith(mp.rstrip("/") + "/")]
    return status(max(inside, key=len))[0] if inside else None


@dataclass
class PrefetchResult:
    files: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)


def prefetch(
    paths: list[str | os.PathLike],
    *,
    jobs: int = 4,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PrefetchResult:
    """Materialize files (directories recursively) of running mounts, `jobs` at a time, each blob once.

    Each file is opened through the mount: the daemon's single-flight store does the transfer, so
    warming while other clients read the same files never fetches anything twice. Files are told apart
    by their resolved path, so a repo folder's `snapshots/` (links into its `blobs/`) adds nothing twice.
    `on_total(bytes)` is called once before the first file; `on_progress(bytes)` with the bytes done so
    far, never going back: whole files finished plus the daemons' transfers in flight (asked every
    0.5 s, capped at the total). Raises PathNotFound for a missing path, MountError for a path outside
    a running mount.
    """
    from concurrent.futures import ThreadPoolExecutor

    files: dict[str, None] = {}  # resolved paths, in order, each once
    mountpoints: set[str] = set()
    for path in map(os.fspath, paths):
        if not os.path.lexists(path):
            raise PathNotFound(f"{path}: no such file or directory")
        state = mount_state_of(path)
        if state is None or not state.get("alive"):
            raise MountError(f"{path}: not inside a running hffs mount (see mountctl status)")
        mountpoints.add(state["mountpoint"])
        if os.path.isdir(path) and not os.path.islink(path):
            for root, _dirs, names in os.walk(path):
                files.update(dict.fromkeys(os.path.realpath(os.path.join(root, n)) for n in sorted(names)))
        else:
            files[os.path.realpath(path)] = None
    total = sum(os.stat(f).st_size for f in files if os.path.isfile(f))
    if on_total is not None:
        on_total(total)
    result = PrefetchResult()
    lock = threading.Lock()

    def warm(path: str) -> None:
        try:
            with open(path, "rb") as fh:  # open() returns once the blob is complete and verified
                size = os.fstat(fh.fileno()).st_size
                fh.read(1)
        except OSError as exc:
            with lock:
                result.failures.append(f"{path}: {exc.strerror or exc}")
            return
        with lock:
            result.files += 1
            result.bytes += size

    def in_flight() -> int:
        answers = (query_status(control_address(mp)) or {} for mp in mountpoints)
        return sum(f.get("done", 0) for answer in answers for f in answer.get("in_flight", []))

    finished = threading.Event()

    def report() -> None:
        shown = 0
        while not finished.wait(PROGRESS_INTERVAL):
            with lock:
                done = result.bytes
            now = min(total, done + in_flight())
            if now > shown:
                on_progress(now)  # type: ignore[misc]
                shown = now

    reporter = threading.Thread(target=report, name="hffs-prefetch-progress", daemon=True)
    if on_progress is not None:
        reporter.start()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(warm, files))
    finally:
        finished.set()
    if on_progress is not None:
        reporter.join(timeout=STATUS_TIMEOUT + PROGRESS_INTERVAL)
        on_progress(result.bytes)
    return result


def cache_usage(cache_dir: str | os.PathLike) -> tuple[int, int]:
    """(bytes, number of blobs) in the blob store under `cache_dir` (read without locking anything)."""
    root = Path(cache_dir) / "blobs-store" / "blobs"
    sizes = [f.stat().st_size for f in root.glob("*/*") if f.is_file()] if root.is_dir() else []
    return sum(sizes), len(sizes)


def cache_prune(cache_dir: str | os.PathLike, max_size: int | str = 0) -> tuple[int, int]:
    """Evict least recently used blobs not open in any mount until at most `max_size` remain.

    Returns (bytes freed, bytes left).
    """
    from .store.blobstore import BlobStore

    root = Path(cache_dir) / "blobs-store"
    if not root.is_dir():
        return 0, 0
    store = BlobStore(root)
    try:
        freed = store.evict_if_needed(parse_size(max_size))
        return freed, store.usage()
    finally:
        store.close()
