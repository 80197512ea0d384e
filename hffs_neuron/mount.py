"""Mounting: configuration, the daemon's serve loop, and the Python API the CLI is built on.

`mount(...)` starts a fresh daemon process (never a fork of a threaded process), waits until the
mount answers or the daemon reports its error, and returns a `MountHandle` (a context manager).
`serve(config)` is what the daemon runs: build remote -> store -> view -> FUSE adapter, record runtime
state, serve until unmounted or signalled.
"""

from __future__ import annotations

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

logger = logging.getLogger(__name__)

VIEWS = ("neff", "hub-cache")
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
        state["alive"] = _pid_alive(state.get("pid", -1))
        states.append(state)
    return states


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse kernel module or run the container with --device /dev/fuse"
        )
    fusermount()


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
        self.view = self._build_view(cache_dir)
        self.ops = FuseOperations(self.view, negative_timeout=min(config.negative_ttl, 5.0), on_init=self._on_init)
        self.ready = threading.Event()
        self._stop = threading.Event()

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
        return HubCacheView(
            self.http,
            self.store,
            self.meta,
            backing,
            pinned=pinned,
            read_only=config.read_only,
            revision_ttl=config.metadata_ttl,
        )

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

    def write_state(self) -> None:
        _write_json_atomic(state_path(self.config.mountpoint), self.stats())

    def _report_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.write_state()
            except OSError as exc:
                logger.debug("could not write runtime state: %s", exc)

    def close(self) -> None:
        self._stop.set()
        try:
            state_path(self.config.mountpoint).unlink()
        except FileNotFoundError:
            pass
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


def serve(config: MountConfig, ready_fd: int | None = None) -> None:
    """Run a mount in this process until it is unmounted or the process gets SIGTERM/SIGINT."""
    from .fuse_ops import run_fuse

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

    def announce_when_ready() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if runtime.ready.wait(0.05) and os.path.ismount(config.mountpoint):
                runtime.write_state()
                report("READY")
                if ready_fd is not None:
                    os.close(ready_fd)
                return
        report("ERROR MountError the mount did not come up within 30 s")

    threading.Thread(target=announce_when_ready, name="hffs-ready", daemon=True).start()
    options: dict[str, Any] = {"max_threads": config.max_threads}
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

    def unmount(self, timeout: float = 30.0, force: bool = False) -> None:
        unmount(self.mountpoint, timeout=timeout, force=force, pid=self.pid)
        if self.process is not None:
            self.process.wait(timeout=timeout)  # reap the daemon

    def __enter__(self) -> MountHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


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
    process = subprocess.Popen(
        [sys.executable, "-m", "hffs_neuron.daemon", "--ready-fd", str(write_fd), config.to_json()],
        pass_fds=(write_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env,
        start_new_session=True,  # survives the terminal; SIGTERM via `mountctl umount`
    )
    os.close(write_fd)
    message = _read_ready(read_fd, process, ready_timeout)
    if message != "READY":
        if process.poll() is None:
            process.terminate()
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
                    return f"ERROR MountError the mount daemon exited with code {process.returncode}"
                if chunk == b"":
                    break
            time.sleep(0.02)
        return buffer.decode(errors="replace").strip() or "ERROR MountError timed out waiting for the mount"
    finally:
        os.close(fd)


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
        if not force:
            raise MountError(
                f"{mountpoint}: the daemon is dead (Transport endpoint is not connected); "
                f"run: mountctl umount --force {mountpoint}"
            )
        lazy_unmount(mountpoint)
        _forget(mountpoint)
        return f"{mountpoint}: cleared a stale mount (daemon was dead)"
    if status != "mounted":
        _forget(mountpoint)
        raise MountError(f"{mountpoint}: not mounted")
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)  # the daemon unmounts itself cleanly
    else:
        result = subprocess.run([fusermount(), "-u", mountpoint], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            return _busy_or_fail(mountpoint, result.stderr, force)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.ismount(mountpoint) and not _pid_alive(pid):
            _forget(mountpoint)
            return f"{mountpoint}: unmounted"
        time.sleep(0.05)
    # The daemon could not unmount: most likely busy (open files, a shell's cwd).
    result = subprocess.run([fusermount(), "-u", mountpoint], capture_output=True, text=True, timeout=30)
    if result.returncode == 0:
        _forget(mountpoint)
        return f"{mountpoint}: unmounted"
    return _busy_or_fail(mountpoint, result.stderr, force)


def _busy_or_fail(mountpoint: str, stderr: str, force: bool) -> str:
    if not os.path.ismount(mountpoint):
        _forget(mountpoint)
        return f"{mountpoint}: unmounted"
    if "busy" in stderr.lower():
        if force:
            lazy_unmount(mountpoint)
            _forget(mountpoint)
            return f"{mountpoint}: was busy; detached lazily (it disappears when the last user closes it)"
        raise MountError(f"{mountpoint}: busy (open files or a shell inside it); close them or use --force")
    raise MountError(f"{mountpoint}: unmount failed: {stderr.strip() or 'unknown error'}")


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
