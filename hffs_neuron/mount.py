"""Mounting: configuration, the daemon's serve loop, and the Python API the CLI is built on.

`mount(...)` starts a fresh daemon process (never a fork of a threaded process), waits until the
mount answers or the daemon reports its error, and returns a `MountHandle` (a context manager).
`serve(config)` is what the daemon runs: build remote -> store -> view -> FUSE adapter, record runtime
state, serve until unmounted or signalled.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants
from .errors import HffsError, MountError, UsageError
from .proc import pid_alive

logger = logging.getLogger(__name__)

VIEWS = ("neff", "hub-cache")
# Mount-time resolution of the bucket / pinned repos: deadline (seconds) and retries.
SETUP_TIMEOUT = 10.0
SETUP_RETRIES = 2
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`50G`, `512M`, `1.5T`, `1024` (bytes) -> bytes. Powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 50G")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGTP".index(unit or " "))


def parse_duration(text: str | float) -> float:
    """`30`, `30s`, `500ms`, `5m`, `1h` -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise UsageError(f"bad duration {text!r}: use seconds or a suffix, e.g. 30s, 500ms, 5m")
    number, unit = float(match.group(1)), (match.group(2) or "s").lower()
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class MountConfig:
    """Everything a mount needs, minus secrets (the token travels in the daemon's environment)."""

    view: str
    mountpoint: str
    source: str = ""  # bucket id (neff) or "" (hub-cache)
    prefix: str | None = None
    read_only: bool = False
    show_model_area: bool = False
    backing: str | None = None
    repos: list[str] = field(default_factory=list)  # "type:id@rev" or "id@rev"
    cache_dir: str = str(constants.CACHE_DIR)
    cache_size: str = constants.CACHE_SIZE
    metadata_ttl: float = constants.METADATA_TTL
    negative_ttl: float = constants.NEGATIVE_TTL
    endpoint: str | None = None
    allow_other: bool = False
    log_file: str | None = None
    log_level: str = "INFO"
    timeout: float = constants.OPERATION_TIMEOUT
    max_threads: int = 64

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        return cls(**json.loads(text))


def parse_repo_spec(spec: str) -> tuple[str, str, str]:
    """`Org/Name`, `Org/Name@rev`, `datasets/Org/Name@rev` -> (repo_type, repo_id, revision)."""
    from .remote.hub import check_repo_id

    repo_type = "model"
    body, _, revision = spec.partition("@")
    for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
        if body.startswith(prefix) and body.count("/") == 2:
            repo_type, body = kind, body[len(prefix) :]
    check_repo_id(body)
    return repo_type, body, revision or "main"


# -- runtime state ------------------------------------------------------------------------------
def state_path(mountpoint: str) -> Path:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return constants.RUNTIME_DIR / f"{digest}.json"


def read_states() -> list[dict]:
    """Runtime state of every mount this user started (stale ones included, marked by `alive`)."""
    states = []
    if not constants.RUNTIME_DIR.is_dir():
        return states
    for path in sorted(constants.RUNTIME_DIR.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        state["alive"] = pid_alive(state.get("pid", -1))
        states.append(state)
    return states


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# -- mountpoint checks --------------------------------------------------------------------------
def mountpoint_status(path: str) -> str:
    """ "ok", "missing", "not-a-directory", "not-empty", "mounted" or "stale" (dead FUSE daemon)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "stale"
        raise
    if os.path.ismount(path):
        # The kernel answers stat of the root from its attribute cache even after the daemon died
        # (kill -9): statfs always reaches the daemon, so it tells a live mount from a stale one.
        try:
            os.statvfs(path)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return "stale"
            raise
        return "mounted"
    if not os.path.isdir(path):
        return "not-a-directory"
    del st
    if os.listdir(path):
        return "not-empty"
    return "ok"


def fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name)
        if found:
            return found
    raise MountError("fusermount3 not found: install FUSE 3 (sudo apt-get install -y fuse3 libfuse3-3)")


def check_fuse_available() -> None:
    """Raise a one-line MountError naming what to install if FUSE cannot work here."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse kernel module or run the container with --device /dev/fuse"
        )
    fusermount()
    # Found the way mfusepy looks for it (fuse_ops sets FUSE_LIBRARY_NAME=fuse3): a missing library
    # would otherwise only surface as an import error inside the daemon.
    from ctypes.util import find_library

    path = os.environ.get("FUSE_LIBRARY_PATH")
    if path:
        if not os.path.exists(path):
            raise MountError(f"libfuse not found at FUSE_LIBRARY_PATH={path}")
    elif not find_library(os.environ.get("FUSE_LIBRARY_NAME", "fuse3")):
        raise MountError("libfuse3 not found: install it (sudo apt-get install -y fuse3 libfuse3-3)")


def fuse_fstype(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at `mountpoint` (e.g. "fuse.hffs"), from /proc/self/mountinfo."""
    wanted = os.path.abspath(mountpoint)
    found = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        if point == wanted:
            found = fields[fields.index("-") + 1]  # the last one wins: mounts stack
    return found


def users_of(mountpoint: str) -> list[str]:
    """Processes keeping `mountpoint` busy, as "name (pid N)": working directory, root or open files inside it."""
    root = os.path.realpath(mountpoint)
    inside = (root, root.rstrip("/") + "/")
    users = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        links = [f"/proc/{entry.name}/cwd", f"/proc/{entry.name}/root"]
        try:
            links += [f"/proc/{entry.name}/fd/{fd}" for fd in os.listdir(f"/proc/{entry.name}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)  # never touches the FUSE mount itself
            except OSError:
                continue
            if target == inside[0] or target.startswith(inside[1]):
                try:
                    name = Path(f"/proc/{entry.name}/comm").read_text().strip()
                except OSError:
                    name = "?"
                users.append(f"{name} (pid {entry.name})")
                break
    return users


def lazy_unmount(mountpoint: str) -> None:
    subprocess.run([fusermount(), "-u", "-z", mountpoint], capture_output=True, timeout=30)


def check_mountpoint(mountpoint: str) -> None:
    """Raise a one-line MountError unless `mountpoint` can be mounted on (recovering a stale mount)."""
    status = mountpoint_status(mountpoint)
    if status == "stale":
        logger.warning("%s: stale mount of a dead daemon; unmounting it", mountpoint)
        lazy_unmount(mountpoint)
        status = mountpoint_status(mountpoint)
        if status == "stale":
            raise MountError(f"{mountpoint}: stale mount could not be cleared; run: fusermount3 -uz {mountpoint}")
    messages = {
        "missing": f"{mountpoint}: mountpoint does not exist; create it with: mkdir -p {mountpoint}",
        "not-a-directory": f"{mountpoint}: mountpoint is not a directory",
        "not-empty": f"{mountpoint}: mountpoint is not empty; use an empty directory",
        "mounted": f"{mountpoint}: already mounted; unmount it first with: mountctl umount {mountpoint}",
    }
    if status in messages:
        raise MountError(messages[status])


# -- the daemon ---------------------------------------------------------------------------------
class MountRuntime:
    """The objects of one live mount: remote, store, view, FUSE adapter, stats reporting."""

    def __init__(self, config: MountConfig):
        from .fuse_ops import FuseOperations
        from .remote.http import HubHttp
        from .store.blobstore import BlobStore
        from .store.metacache import MetadataCache

        self.config = config
        self.started = time.time()
        cache_dir = Path(config.cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.http = HubHttp(config.endpoint, operation_timeout=config.timeout)
        self.store = BlobStore(cache_dir / "blobs-store", max_size=parse_size(config.cache_size))
        self.meta = MetadataCache(ttl=config.metadata_ttl, negative_ttl=config.negative_ttl)
        self.view = self._build_view_failing_fast(cache_dir)
        self.ops = FuseOperations(self.view, negative_timeout=min(config.negative_ttl, 5.0), on_init=self._on_init)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.device: int | None = None  # st_dev of the live mount, to notice a lazy detach

    def _build_view_failing_fast(self, cache_dir: Path):
        """Build the view (resolving the bucket or pinned repos) with a short deadline and few retries.

        `mountctl mount` waits for this: a wrong or unreachable endpoint must fail in seconds, not
        after the full operation timeout meant for reads of a live mount.
        """
        from .errors import RemoteNotFound, RemoteUnavailable

        http = self.http
        saved = http.operation_timeout, http.max_retries
        http.operation_timeout = min(http.operation_timeout, SETUP_TIMEOUT)
        http.max_retries = min(http.max_retries, SETUP_RETRIES)
        try:
            return self._build_view(cache_dir)
        except RemoteUnavailable as exc:
            raise RemoteUnavailable(
                f"Hub endpoint {http.endpoint} unreachable or failing ({exc}); check --endpoint / HF_ENDPOINT"
            ) from exc
        except RemoteNotFound as exc:
            if http.has_token or "HF_TOKEN" in str(exc):
                raise
            raise RemoteNotFound(f"{exc} (if it is private, set HF_TOKEN)") from exc
        finally:
            http.operation_timeout, http.max_retries = saved

    def _build_view(self, cache_dir: Path):
        config = self.config
        if config.view == "neff":
            from .remote.bucket import Bucket
            from .views.neff import NeffView

            bucket = Bucket(self.http, config.source, config.prefix)
            key = hashlib.sha256(f"{self.http.endpoint}|{bucket.bucket_id}|{bucket.prefix}".encode()).hexdigest()[:16]
            return NeffView(
                bucket,
                self.store,
                self.meta,
                cache_dir / "neff-layers" / key,
                read_only=config.read_only,
                show_model_area=config.show_model_area,
                listing_ttl=config.metadata_ttl,
            )
        from .views.hubcache import HubCacheView

        backing = config.backing or str(cache_dir / "hub-cache-backing")
        pinned = [parse_repo_spec(spec) for spec in config.repos]
        view = HubCacheView(
            self.http,
            self.store,
            self.meta,
            backing,
            pinned=pinned,
            read_only=config.read_only,
            revision_ttl=config.metadata_ttl,
        )
        for spec in pinned:
            self._check_download_access(view, *spec)
        return view

    def _check_download_access(self, view: Any, repo_type: str, repo_id: str, revision: str) -> None:
        """Read one byte of a pinned gated repo: its metadata is public, its files are not.

        Without this, a missing token shows up only later, as EACCES deep inside `from_pretrained`.
        """
        from .errors import RemoteAccessDenied

        repo = view._hub_repo(repo_type, repo_id, revision)  # already resolved by the view: no request
        if not getattr(repo, "gated", False):
            return
        files = [e for e in repo.files() if e.size > 0]
        if not files:
            return
        smallest = min(files, key=lambda e: e.size)
        try:
            repo.read_range(smallest, 0, 1, lambda _o, _d: None, time.monotonic() + self.http.operation_timeout)
        except RemoteAccessDenied as exc:
            raise RemoteAccessDenied(f"{repo_type} {repo.repo_id} is gated: {exc}") from exc

    def _on_init(self) -> None:
        self.ready.set()
        threading.Thread(target=self._report_loop, name="hffs-stats", daemon=True).start()

    def stats(self) -> dict:
        s = self.store.stats
        return {
            "pid": os.getpid(),
            "view": self.config.view,
            "source": self.config.source or "hub",
            "mountpoint": os.path.realpath(self.config.mountpoint),
            "endpoint": self.http.endpoint,
            "started": self.started,
            "updated": time.time(),
            "log_file": self.config.log_file,
            "cache_dir": self.config.cache_dir,
            "layer_dir": getattr(self.view, "state_dir", None) or getattr(self.view, "local_root", None),
            "options": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("mountpoint",)},
            "counters": {
                "hits": s.hits,
                "misses": s.misses,
                "fetches": s.fetches,
                "bytes_fetched": s.bytes_fetched,
                "evictions": s.evictions,
                "http_requests": self.http.requests_sent,
            },
            "in_flight": [dataclasses.asdict(p) for p in self.store.in_flight()],
        }

    def attached(self) -> bool:
        """Is this daemon's mount still the one at the mountpoint (not lazily detached, not replaced)?"""
        if self.device is None:
            return True
        try:
            return os.stat(self.config.mountpoint).st_dev == self.device
        except OSError:
            return False

    def _owns_state(self) -> bool:
        state = _state_for(self.config.mountpoint)
        return state is None or state.get("pid") == os.getpid() or not pid_alive(state.get("pid", -1))

    def write_state(self) -> None:
        # After `umount --force` detached us lazily, a new mount may live at the same mountpoint:
        # its state file is not ours to overwrite.
        if self.attached() and self._owns_state():
            _write_json_atomic(state_path(self.config.mountpoint), self.stats())

    def _report_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.write_state()
            except OSError as exc:
                logger.debug("could not write runtime state: %s", exc)

    def close(self) -> None:
        self._stop.set()
        state = _state_for(self.config.mountpoint)
        if state is not None and state.get("pid") == os.getpid():
            _forget(self.config.mountpoint)
        self.store.close()
        self.http.close()


def configure_logging(config: MountConfig) -> None:
    handlers: list[logging.Handler] = []
    if config.log_file:
        Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(config.log_file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # its request lines would carry URLs only, but are noise


READ_AHEAD_KB = 16 * 1024


def tune_readahead(device: int, kb: int = READ_AHEAD_KB) -> None:
    """Raise the mount's block-device readahead (default 128 KiB) so sequential reads arrive as 1 MiB
    FUSE requests. Needs root (sysfs); silently skipped otherwise."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        logger.debug("could not set %s: %s", path, exc)


def _bound_malloc() -> None:
    """Keep the daemon's memory flat under many parallel readers (glibc only; a no-op elsewhere).

    glibc gives every busy thread (libfuse workers, range downloads) its own arena, and after the first
    free of a large block serves large buffers from arenas that never shrink: measured 330 MB peak for
    8 cold 256 MiB readers. Two arenas and a fixed 1 MiB mmap threshold (libfuse's 1 MiB request
    buffers are mapped and unmapped; download pieces, ~64 KiB, stay on the heap where mapping each one
    would slow transfers) bring that to about 75 MB.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable; memory tuning skipped")


def serve(config: MountConfig, ready_fd: int | None = None) -> None:
    """Run a mount in this process until it is unmounted or the process gets SIGTERM/SIGINT."""
    from .fuse_ops import run_fuse

    _bound_malloc()

    def report(message: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (message + "\n").encode())
            except OSError:
                pass

    try:
        check_fuse_available()
        check_mountpoint(config.mountpoint)
        runtime = MountRuntime(config)
    except HffsError as exc:
        report(f"ERROR {type(exc).__name__} {exc}")
        raise
    except OSError as exc:  # e.g. an unusable --cache-dir: still one precise line for the caller
        error = MountError(f"cannot set up the mount: {exc.filename or ''}: {exc.strerror or exc}")
        report(f"ERROR MountError {error}")
        raise error from exc

    def announce_when_ready() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if runtime.ready.wait(0.05) and os.path.ismount(config.mountpoint):
                runtime.device = os.stat(config.mountpoint).st_dev
                tune_readahead(runtime.device)
                runtime.write_state()
                report("READY")
                if ready_fd is not None:
                    os.close(ready_fd)
                return
        report("ERROR MountError the mount did not come up within 30 s")

    threading.Thread(target=announce_when_ready, name="hffs-ready", daemon=True).start()
    # Idle libfuse workers beyond 16 retire, so a burst of callers does not pin threads forever.
    options: dict[str, Any] = {"max_threads": config.max_threads, "max_idle_threads": 16}
    if config.allow_other:
        options["allow_other"] = True
    if config.read_only:
        options["ro"] = True
    logger.info("mounting %s view of %s on %s", config.view, config.source or "the Hub", config.mountpoint)
    try:
        run_fuse(runtime.ops, config.mountpoint, foreground=True, **options)
    except Exception as exc:
        if runtime.ready.is_set() and not os.path.ismount(config.mountpoint):
            logger.info("mount removed externally (fusermount -u): %s", exc)
            return
        logger.exception("FUSE failed on %s", config.mountpoint)
        report(f"ERROR MountError FUSE failed on {config.mountpoint}: {exc} (see {config.log_file or 'the log'})")
        raise MountError(f"FUSE failed on {config.mountpoint}: {exc}") from exc
    finally:
        runtime.close()
        logger.info("unmounted %s", config.mountpoint)


# -- the API the CLI and tests share -------------------------------------------------------------
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
    validate_config(config)
    check_fuse_available()
    check_mountpoint(config.mountpoint)
    if config.log_file is None:
        config.log_file = str(constants.RUNTIME_DIR / f"{state_path(config.mountpoint).stem}.log")
    read_fd, write_fd = os.pipe()
    child_env = dict(os.environ if env is None else env)
    if token:
        child_env["HF_TOKEN"] = token  # never on the command line, where `ps` would show it
    constants.RUNTIME_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
    # The daemon's stdout/stderr (libfuse prints its errors there, Python its tracebacks) go to the log.
    log_fd = os.open(config.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "hffs_neuron.daemon", "--ready-fd", str(write_fd), config.to_json()],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=child_env,
            start_new_session=True,  # survives the terminal; SIGTERM via `mountctl umount`
        )
    finally:
        os.close(write_fd)
        os.close(log_fd)
    process.hffs_log_file = config.log_file  # type: ignore[attr-defined]
    message = _read_ready(read_fd, process, ready_timeout)
    if message != "READY":
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if os.path.ismount(config.mountpoint):  # nothing left half-done
            lazy_unmount(config.mountpoint)
        _, _, detail = message.partition(" ")
        kind, _, text = detail.partition(" ")
        error_class = {"UsageError": UsageError}.get(kind)
        if error_class is None:
            from . import errors

            error_class = getattr(errors, kind, MountError)
            if not (isinstance(error_class, type) and issubclass(error_class, HffsError)):
                error_class = MountError
        raise error_class(text or detail or "the mount daemon exited before the mount was ready")
    return MountHandle(config.mountpoint, process.pid, process)


def _read_ready(fd: int, process: subprocess.Popen, timeout: float) -> str:
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
            elif chunk == b"" or process.poll() is not None:
                if process.poll() is not None and not buffer:
                    code = process.returncode
                    return f"ERROR MountError the mount daemon exited with code {code}{_log_hint(process)}"
                if chunk == b"":
                    break
            time.sleep(0.02)
        return buffer.decode(errors="replace").strip() or "ERROR MountError timed out waiting for the mount"
    finally:
        os.close(fd)


def _log_hint(process: subprocess.Popen) -> str:
    """`: <last line of the daemon's log>`, so a crash is diagnosable from the one-line error."""
    log_file = getattr(process, "hffs_log_file", None)
    if not log_file:
        return ""
    try:
        lines = [line for line in Path(log_file).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()[:300]} (see {log_file})" if lines else f" (see {log_file})"


def validate_config(config: MountConfig) -> None:
    """Raise UsageError for input problems detectable before contacting anything."""
    from .remote.bucket import check_bucket_id

    if config.view == "neff":
        check_bucket_id(config.source)
    for spec in config.repos:
        parse_repo_spec(spec)
    parse_size(config.cache_size)
    if config.backing and not os.path.isdir(config.backing):
        raise UsageError(f"--backing {config.backing}: not a directory")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"bad log level {config.log_level!r}: use DEBUG, INFO, WARNING or ERROR")


def unmount(
    mountpoint: str | os.PathLike, *, timeout: float = 30.0, force: bool = False, pid: int | None = None
) -> str:
    """Unmount and wait for the daemon to exit. Returns what was done (for the CLI to print)."""
    mountpoint = os.path.abspath(mountpoint)
    status = mountpoint_status(mountpoint)
    if pid is None:
        state = _state_for(mountpoint)
        pid = state.get("pid", -1) if state else -1
    if status == "stale":
        # Dead daemon ("Transport endpoint is not connected"): nothing is served any more, so a plain
        # unmount is safe; only users still inside (EBUSY) need --force to detach lazily.
        result = subprocess.run([fusermount(), "-u", mountpoint], capture_output=True, text=True, timeout=30)
        if result.returncode != 0 and mountpoint_status(mountpoint) == "stale":
            if not force:
                users = users_of(mountpoint)
                raise MountError(
                    f"{mountpoint}: the daemon is dead (Transport endpoint is not connected) and the mount is busy"
                    f"{' (used by ' + ', '.join(users[:5]) + ')' if users else ''}; "
                    f"run: mountctl umount --force {mountpoint}"
                )
            lazy_unmount(mountpoint)
        _forget(mountpoint)
        return f"{mountpoint}: cleared a stale mount (daemon was dead)"
    if status != "mounted":
        _forget(mountpoint)
        raise MountError(f"{mountpoint}: not mounted")
    fstype = fuse_fstype(mountpoint)
    if fstype is not None and fstype != "fuse.hffs":
        raise MountError(f"{mountpoint}: not an hffs mount ({fstype}); use umount")
    # A plain (non-lazy) unmount first: it fails with EBUSY while anything uses the mount, which we
    # report. SIGTERM would make libfuse detach lazily and exit, leaving those users with a dead mount.
    result = subprocess.run([fusermount(), "-u", mountpoint], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 and os.path.ismount(mountpoint):
        return _busy_or_fail(mountpoint, result.stderr, force, pid)
    # Unmounted: the daemon sees its session end, cleans up and exits. Wait for that.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            _forget(mountpoint)
            return f"{mountpoint}: unmounted"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)  # unmounted but still running after `timeout`: make it exit
    _forget(mountpoint)
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
    _forget(mountpoint)
    return f"{mountpoint}: was busy ({who}); detached lazily, the daemon (pid {pid}) exits when they are done"


def _state_for(mountpoint: str) -> dict | None:
    try:
        return json.loads(state_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None


def _forget(mountpoint: str) -> None:
    try:
        state_path(mountpoint).unlink()
    except FileNotFoundError:
        pass


# -- status, prefetch and cache: the rest of the API the CLI prints --------------------------------
def status(mountpoint: str | os.PathLike | None = None) -> list[dict]:
    """Runtime state of every recorded mount (or the one at `mountpoint`), plus derived fields.

    Each dict holds the daemon's own record (pid, view, source, mountpoint, counters, in_flight, ...)
    and `alive`, `health` ("running", "dead", "not mounted"), `mounted`, `uptime` (s), `cache_used` (B).
    """
    states = read_states()
    if mountpoint is not None:
        wanted = os.path.realpath(mountpoint)
        states = [s for s in states if s.get("mountpoint") == wanted]
        if not states:
            raise MountError(f"{mountpoint}: no hffs mount recorded here (see mountctl status)")
    for state in states:
        try:
            where = mountpoint_status(state.get("mountpoint", ""))
        except OSError:
            where = "unknown"
        state["mounted"] = where == "mounted"
        if not state["alive"] or where == "stale":
            state["health"] = "dead"
        else:
            state["health"] = "running" if state["mounted"] else "not mounted"
        state["uptime"] = round(time.time() - state.get("started", time.time()), 1)
        state["cache_used"] = cache_usage(state.get("cache_dir") or "/nonexistent")[0]
    return states


def mount_state_of(path: str | os.PathLike) -> dict | None:
    """The recorded mount whose mountpoint holds `path` (the innermost one), or None."""
    real = os.path.realpath(path)
    best = None
    for state in read_states():
        mp = state.get("mountpoint", "")
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best["mountpoint"])
        ):
            best = state
    return best


@dataclass
class PrefetchResult:
    files: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)


def prefetch(
    paths: list[str | os.PathLike],
    *,
    jobs: int = 4,
    on_total: Any = None,
    on_file: Any = None,
) -> PrefetchResult:
    """Materialize files (directories recursively) of running mounts, `jobs` at a time.

    Each file is opened through the mount: the daemon's single-flight store does the transfer, so
    warming while other clients read the same files never fetches anything twice. `on_total(bytes)` is
    called once before the first file and `on_file(size)` after each (progress bars). Raises
    UsageError/MountError for paths outside a mount.
    """
    from concurrent.futures import ThreadPoolExecutor

    files: list[str] = []
    for path in map(os.fspath, paths):
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory")
        state = mount_state_of(path)
        if state is None or not state.get("alive"):
            raise MountError(f"{path}: not inside a running hffs mount (see mountctl status)")
        if os.path.isdir(path) and not os.path.islink(path):
            for root, _dirs, names in os.walk(path):
                files.extend(os.path.join(root, n) for n in sorted(names))
        else:
            files.append(path)
    if on_total is not None:
        on_total(sum(os.stat(f).st_size for f in files if os.path.isfile(f)))
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
        if on_file is not None:
            on_file(size)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(warm, files))
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
