"""The mount daemon: `python -m hffs_neuron.daemon [--ready-fd N] CONFIG_JSON`.

Started as a fresh process by `hffs_neuron.mount()` (or run in the foreground by `mountctl mount
--foreground`). `serve(config)` builds remote -> store -> view -> FUSE adapter (`MountRuntime`),
reports `READY` or `ERROR <class> <message>` on the ready fd, records its runtime state every second
and serves until unmounted or signalled.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .config import MountConfig, parse_repo_spec, parse_size
from .errors import HffsError, MountError
from .proc import pid_alive
from .runtime import check_fuse_available, check_mountpoint, forget_state, read_state, write_state

# Named, not __name__: run with `python -m`, this module is "__main__".
logger = logging.getLogger("hffs_neuron.daemon")

# Mount-time resolution of the bucket / pinned repos: deadline (seconds) and retries.
SETUP_TIMEOUT = 10.0
SETUP_RETRIES = 2
# Longest the kernel keeps a "not found" (seconds; at most half of --negative-ttl too).
KERNEL_NEGATIVE_TIMEOUT = 1.0


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
        self.publisher = self._neff_follow_and_publish()
        # A module published by another node must show within --negative-ttl + 1 s, kernel caches included:
        # the daemon's answer may be a TTL old, so the kernel keeps a "not found" a second at most.
        negative_timeout = min(config.negative_ttl / 2, KERNEL_NEGATIVE_TIMEOUT)
        self.ops = FuseOperations(self.view, negative_timeout=negative_timeout, on_init=self._on_init)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._reporter: threading.Thread | None = None
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

    def _neff_follow_and_publish(self) -> Any:
        """NEFF view: probe mode for names published elsewhere, and the publisher if `--publish`."""
        if self.config.view != "neff":
            return None
        from .neff_publisher import NeffPublisher
        from .views.neff_probe import NameProber

        self.view.prober = NameProber(self.view.remote, self.config.negative_ttl)
        if not self.config.publish:
            return None
        publisher = NeffPublisher(self.view.local_root, self.view.remote)
        self.view.on_change = publisher.notify
        return publisher

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
        if self.publisher is not None:
            self.publisher.start()
        self.ready.set()
        self._reporter = threading.Thread(target=self._report_loop, name="hffs-stats", daemon=True)
        self._reporter.start()

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
            "publish": self.publisher.stats()
            if self.publisher
            else {"mode": "off", "published": 0, "pending": 0, "failed": []},
            "follow": "probe" if self.config.view == "neff" else "ttl",
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
        state = read_state(self.config.mountpoint)
        return state is None or state.get("pid") == os.getpid() or not pid_alive(state.get("pid", -1))

    def write_state(self) -> None:
        # After `umount --force` detached us lazily, a new mount may live at the same mountpoint:
        # its state file is not ours to overwrite.
        if self.attached() and self._owns_state():
            write_state(self.config.mountpoint, self.stats())

    def _report_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.write_state()
            except OSError as exc:
                logger.debug("could not write runtime state: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._reporter is not None:
            # A write in progress would otherwise land after the state file is forgotten below,
            # leaving a record of a mount that is gone.
            self._reporter.join(timeout=5.0)
        state = read_state(self.config.mountpoint)
        if state is not None and state.get("pid") == os.getpid():
            forget_state(self.config.mountpoint)
        if self.publisher is not None:
            self.publisher.close()
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


def bound_malloc() -> None:
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


class _ReadyPipe:
    """The pipe `mount()` waits on: a line `READY` or `ERROR <class> <message>`.

    Closed once READY is sent. Later messages are dropped: after the close the fd number may belong to
    another file (a log, a blob), which must never receive them.
    """

    def __init__(self, fd: int | None):
        self._fd = fd
        self._lock = threading.Lock()  # the ready thread and the serving thread both report

    def send(self, message: str, close: bool = False) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, (message + "\n").encode())
            except OSError:
                pass
            if close:
                os.close(self._fd)
                self._fd = None


def serve(config: MountConfig, ready_fd: int | None = None) -> None:
    """Run a mount in this process until it is unmounted or the process gets SIGTERM/SIGINT."""
    from .fuse_ops import run_fuse

    bound_malloc()
    report = _ReadyPipe(ready_fd).send

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
                report("READY", close=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hffs_neuron.daemon")
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("config")
    args = parser.parse_args(argv)
    config = MountConfig.from_json(args.config)
    configure_logging(config)
    try:
        serve(config, ready_fd=args.ready_fd)
    except HffsError as exc:
        print(f"hffs daemon: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
