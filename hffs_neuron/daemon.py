"""The mount daemon: `python -m hffs_neuron.daemon --config-fd N [--ready-fd N] MOUNTPOINT`.

Started as a fresh process by `hffs_neuron.mount()` (or run in the foreground by `mountctl mount
--foreground`). Its configuration (JSON) arrives on a pipe, never on the command line, where every
user could read it (private repo names); the mountpoint is there only to tell daemons apart in `ps`.
`serve(config)` builds remote -> store -> view -> FUSE adapter (`MountRuntime`),
reports `READY` or `ERROR <class> <message>` on the ready fd, records its runtime state every second
and serves until unmounted or signalled.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import hashlib
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants

from . import constants, supervision, telemetry
from .config import MountConfig, mount_fsname, parse_host_port, parse_repo_spec, parse_size
from .errors import HffsError, MountError, RemoteNotFound, RemoteUnavailable, UsageError
from .mount_checks import NOT_CHECKED, OK, MountChecks, check_endpoint_and_token
from .proc import HOST, pid_alive
from .process_tuning import tune_process, tune_readahead
from .runtime import (
    check_fuse_available,
    check_mountpoint,
    control_address,
    ensure_private_dir,
    forget_state,
    open_private_file,
    read_state,
    write_state,
)

# Named, not __name__: run with `python -m`, this module is "__main__".
logger = logging.getLogger("hffs_neuron.daemon")

# Mount-time resolution of the bucket / pinned repos: deadline (seconds) and retries.
SETUP_TIMEOUT = 10.0
SETUP_RETRIES = 2
# Longest the kernel keeps a "not found" (seconds; at most half of --negative-ttl too).
KERNEL_NEGATIVE_TIMEOUT = 1.0


def kernel_negative_timeout(negative_ttl: float) -> float:
    """How long the kernel keeps a "not found": a second at most, and half of --negative-ttl. A module
    published by another node shows within --negative-ttl, kernel caches included: probe mode asks about
    a missing name again this much sooner than the TTL (`NameProber`), and event mode drops the kernel's
    entry when the feed reports the name (`FuseOperations.invalidate`)."""
    return min(negative_ttl / 2, KERNEL_NEGATIVE_TIMEOUT)


class MountRuntime:
    """The objects of one live mount: remote, store, view, FUSE adapter, stats reporting."""

    def __init__(self, config: MountConfig):
        from .fuse_ops import FuseOperations
        from .remote.http import HubHttp
        from .remote.xet import XetDownloader, configure_hf_xet, xet_available
        from .store.blobstore import BlobStore
        from .store.metacache import MetadataCache
        from .store.scheduler import transfer_connections

        self.config = config
        self.started = time.time()
        self.group_gid = resolve_group(config.group)
        cache_dir = Path(config.cache_dir)
        for owned in (cache_dir, cache_dir / "blobs-store", cache_dir / "neff-layers", constants.RUNTIME_DIR):
            ensure_private_dir(owned)
        self.http = HubHttp(
            config.endpoint,
            operation_timeout=config.timeout,
            max_connections=config.max_connections,
            offline=hf_constants.HF_HUB_OFFLINE,  # serve what is cached, never ask the Hub
        )
        # hf_xet's own files (downloads here, uploads of --publish) live under the cache directory and take
        # a bounded share of --cache-size.
        cache_size = parse_size(config.cache_size)
        xet_reserve = min(constants.XET_CACHE_RESERVE, cache_size // 8)
        configure_hf_xet(cache_dir, xet_reserve)
        xet = None
        if xet_available(config.xet):
            xet = XetDownloader(self.http, max_connections=config.max_connections)
        self.store = BlobStore(
            cache_dir / "blobs-store",
            max_size=cache_size - xet_reserve,
            max_connections=transfer_connections(config.max_connections),
            timeout=config.timeout,
            xet=xet,
        )
        self.meta = MetadataCache(
            ttl=config.metadata_ttl, negative_ttl=config.negative_ttl, wait_timeout=config.timeout
        )
        self.view = self._build_view_checked(cache_dir)
        self.publisher = self._neff_follow_and_publish()
        self.ops = FuseOperations(
            self.view, negative_timeout=kernel_negative_timeout(config.negative_ttl), on_init=self._on_init
        )
        self.stale_locks, self.follow = self._neff_watchers()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._reporter: threading.Thread | None = None
        self.device: int | None = None  # st_dev of the live mount, to notice a lazy detach
        self.telemetry = telemetry.Telemetry()
        self._disk_usage = telemetry.CachedFigure(
            lambda: self.store.usage() + _tree_bytes(cache_dir / "xet"),
            lambda: (self.store.stats.fetches, self.store.stats.evictions),  # measured again once they move
            telemetry.DISK_USAGE_MAX_AGE,
        )
        self.telemetry.provide("read_ahead", self.store.scheduler.read_ahead_status)
        # `publish` and `follow` stay neutral ("off", "ttl") but on NEFF mounts (probe mode, --publish).
        if self.publisher is not None:
            self.telemetry.provide("publish", self.publisher.stats)
        if config.view == "neff":
            self.telemetry.provide("follow", self.follow.mode if self.follow is not None else lambda: "probe")
            # `mountctl push` asks for these: a module with a file open for writing is not finished.
            self.telemetry.provide("open_for_writing", lambda: sorted(self.view.writing()))
        if self.stale_locks is not None:
            self.telemetry.provide("stale_locks", self.stale_locks.status)
        self.telemetry.provide("threads", supervision.health)
        self.metrics: telemetry.Metrics | None = None
        self.status_server: telemetry.StatusServer | None = None
        self._start_telemetry()

    def _build_view_checked(self, cache_dir: Path):
        """Make the mount-time checks (`mount_checks`) and build the view, resolving the bucket or pinned
        repos (the source check), with a short deadline and few retries.

        `mountctl mount` waits for this: a wrong endpoint, token or source must fail in seconds, not after
        the full operation timeout meant for reads of a live mount; a transient failure is a warning.
        """
        http = self.http
        saved = http.operation_timeout, http.max_retries
        http.operation_timeout = min(http.operation_timeout, SETUP_TIMEOUT)
        http.max_retries = min(http.max_retries, SETUP_RETRIES)
        try:
            if http.offline:
                self.checks = MountChecks.skipped("skipped: HF_HUB_OFFLINE=1")
            elif not self.config.check:
                self.checks = MountChecks.skipped("skipped: --no-check")
            else:
                self.checks = check_endpoint_and_token(http)
            return self._build_view(cache_dir)
        except RemoteNotFound as exc:
            if http.has_token or http.offline or "token" in str(exc):
                raise
            raise RemoteNotFound(f"{exc} (if it is private, give the mount a token: --token-file)") from exc
        finally:
            http.operation_timeout, http.max_retries = saved

    def _build_view(self, cache_dir: Path):
        config = self.config
        if config.view == "neff":
            from .sources import parse_source
            from .views.neff import NeffView

            bucket = self._open_source(parse_source(config.source, config.prefix))
            if config.publish:
                from .publish import check_write_access

                check_write_access(bucket)  # a repo without write access: one line now, not a failed commit
            # Layers are per host (README "Sharing one cache between nodes"): a cache dir on a cluster filesystem
            # gives each host its own.
            layer = f"{self.http.endpoint}|{bucket.layer_identity}|{HOST}"
            key = hashlib.sha256(layer.encode()).hexdigest()[:16]
            return NeffView(
                bucket,
                self.store,
                self.meta,
                cache_dir / "neff-layers" / key,
                read_only=config.read_only,
                show_model_area=config.show_model_area,
                listing_ttl=config.metadata_ttl,
                private=bucket.private,
                group_gid=self.group_gid,
            )
        from .views.hubcache import HubCacheView

        if config.backing:
            warn_if_shared(config.backing)
        backing = config.backing or str(cache_dir / "hub-cache-backing")
        state_key = hashlib.sha256(f"{os.path.realpath(backing)}|{HOST}".encode()).hexdigest()[:16]
        pinned = [parse_repo_spec(spec) for spec in config.repos]
        view = HubCacheView(
            self.http,
            self.store,
            self.meta,
            backing,
            cache_dir / "hub-cache-state" / state_key,
            read_only=config.read_only,
            revision_ttl=config.metadata_ttl,
            group_gid=self.group_gid,
            shared=config.allow_other,
            max_resolutions_per_s=config.max_resolutions_per_s,
        )
        self._pin_repos(view, pinned)
        if config.read_ahead != "off":
            from .views.shardsets import ReadAhead

            view.read_ahead = ReadAhead(self.store, config.read_ahead, view).opened
        return view

    def _open_source(self, source: Any) -> Any:
        """The NEFF view's remote; opening it (a request to the Hub) is the source check.

        A bucket not checked (--no-check, HF_HUB_OFFLINE=1, an endpoint that did not answer) or whose check
        failed transiently is mounted without its info: served as private (the owner and --group only)
        until the next mount, since its visibility is unknown. A repo source is likewise served as private
        when the Hub did not answer, and its commit is resolved on first use.
        """
        from .remote.bucket import Bucket

        checking = self.checks.source == NOT_CHECKED
        if source.is_repo:
            remote = source.open(self.http, self.config.metadata_ttl, defer=True)
            if remote.commit is None:
                self.checks.warn("source", f"{source.canonical}: {remote.unresolved_reason}; resolved on first use")
            elif checking:
                self.checks.source = OK
            return remote
        if checking:
            try:
                remote = source.open(self.http, self.config.metadata_ttl)
            except RemoteUnavailable as exc:
                self.checks.warn("source", f"bucket {source.repo_id}: {exc}")
            else:
                self.checks.source = OK
                return remote
        logger.warning("bucket %s mounted without its info from the Hub: served as private", source.repo_id)
        return Bucket(self.http, source.repo_id, source.prefix, info={"private": True})

    def _pin_repos(self, view: Any, pinned: list[tuple[str, str, str]]) -> None:
        """Resolve each --repo now (the source check): one that does not exist, or that this mount's token
        cannot read, fails the mount; one the Hub did not answer for (or all, when the checks were not
        made) is resolved on its first lookup instead, like any repo."""
        if self.checks.source != NOT_CHECKED:
            return
        failing = []
        for repo_type, repo_id, revision in pinned:
            try:
                view.pin_repo(repo_type, repo_id, revision, limited=False)
                self._check_download_access(view, repo_type, repo_id, revision)
            except RemoteUnavailable as exc:
                failing.append(f"{repo_id}@{revision}: {exc}")
        if failing:
            self.checks.warn("source", "; ".join(failing))
        else:
            self.checks.source = OK

    def _neff_follow_and_publish(self) -> Any:
        """NEFF view: probe mode for names published elsewhere, and the publisher if `--publish`."""
        if self.config.view != "neff":
            return None
        from .neff_publisher import NeffPublisher
        from .views.neff_probe import NameProber

        ttl = self.config.negative_ttl
        self.view.prober = NameProber(self.view.remote, ttl, kernel_negative_timeout(ttl))
        if not self.config.publish:
            return None
        from . import publish

        checks = publish.Checks(
            self.view.creators,
            publish.TrustedWriters.parse(os.getuid(), self.config.publish_from),
            publish.HashCache(Path(self.view.state_dir)),
            writing=self.view.writing,
            max_bytes=self.config.publish_max_bytes,
        )
        publisher = NeffPublisher(
            os.path.join(self.view.state_dir, self.view.upper),
            self.view.remote,
            checks,
            stall_timeout=self.config.timeout,
            commit_interval=self.config.commit_interval,
        )
        self.view.on_change = publisher.notify
        return publisher

    def _neff_watchers(self) -> tuple[Any, Any]:
        """NEFF view: the stale compile-lock watch (writable mounts) and event mode (unless
        --no-follow-events). Both drop the kernel's cached entries of what they change."""
        if self.config.view != "neff":
            return None, None
        from .views.neff_follow import EventFollow
        from .views.stale_locks import StaleLocks

        stale_locks = None
        if not self.config.read_only:
            stale_locks = StaleLocks(
                self.view,
                grace=self.config.stale_lock_grace,
                remove=not self.config.keep_stale_locks,
                invalidate=self.ops.invalidate,
            )
        follow = None
        if self.config.follow_events and self.view.remote.event_feed:  # buckets have one, repos not
            on_change = self.publisher.remote_changed if self.publisher is not None else None
            follow = EventFollow(self.view, self.view.remote, self.http.endpoint, self.ops.invalidate, on_change)
            self.view.events_live = follow.live
        return stale_locks, follow

    def _check_download_access(self, view: Any, repo_type: str, repo_id: str, revision: str) -> None:
        """Read one byte of a pinned gated repo: its metadata is public, its files are not.

        Without this, a missing token shows up only later, as EACCES deep inside `from_pretrained`.
        """
        repo = view._hub_repo(repo_type, repo_id, revision, limited=False)  # resolved by the view: no request
        if repo.gated:
            repo.check_download_access()

    def _on_init(self) -> None:
        if self.publisher is not None:
            self.publisher.start()
        for watcher in (self.stale_locks, self.follow):
            if watcher is not None:
                watcher.start()
        self.ready.set()
        self._reporter = supervision.thread("hffs-stats", self._report_loop)
        self._reporter.start()

    def stats(self, disk_age: float | None = None) -> dict:
        """This mount's status: the `mountctl status --json` schema (README "Status and metrics") and `push`'s fields.

        `disk_age`: include the cache's disk use, measured at most that many seconds ago (a walk of the
        blob store: 0 for `mountctl status`, `DISK_USAGE_MAX_AGE` for scrapes); None (the once-a-second
        state file) leaves it out (`mountctl status` measures it for a saved state).
        """
        s = self.store.stats
        tallies = telemetry.tallies()
        status = {
            "pid": os.getpid(),
            "view": self.config.view,
            "source": self.config.source or "hub",
            "fsname": mount_fsname(self.config),  # the source as fstab, findmnt and df write it
            "mountpoint": os.path.realpath(self.config.mountpoint),
            "alive": True,
            "uptime_s": round(time.time() - self.started, 1),
            "endpoint": self.http.endpoint,
            "started": self.started,
            "updated": time.time(),
            "log_file": self.config.log_file,
            "cache_dir": self.config.cache_dir,
            "layer_dir": getattr(self.view, "state_dir", None) or self.view.local.root,
            "options": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("mountpoint",)},
            "cache": {
                "dir": self.config.cache_dir,
                "used_bytes": self._disk_usage.get(disk_age) if disk_age is not None else None,
                "limit_bytes": parse_size(self.config.cache_size),
            },
            "counters": {
                "hits": s.hits,
                "misses": s.misses,
                "fetches": s.fetches,
                "bytes_fetched": s.bytes_fetched,
                "evictions": s.evictions,
                "http_requests": self.http.requests_sent,
                "xet_requests": tallies["xet"],
                "errors": tallies["errors"],
                "http_status": tallies["http_status"],
            },
            "transfers": {way: {"count": n, "bytes": b} for way, (n, b) in s.transfers.items()},
            "xet": "on" if self.store.xet is not None else "off",
            "in_flight": [dataclasses.asdict(p) for p in self.store.in_flight()],
            "metrics_addr": self.metrics.address if self.metrics else None,
            "checks": self.checks.as_dict(),
            "access_denied": telemetry.denied(),
        }
        status.update(self.telemetry.sections())
        return status

    def _start_telemetry(self) -> None:
        """The control socket `mountctl status` asks, and /metrics if `--metrics-addr` is set."""
        if self.config.metrics_addr:
            host, port = parse_host_port(self.config.metrics_addr)
            try:
                self.metrics = telemetry.Metrics(host, port, lambda: self.stats(telemetry.DISK_USAGE_MAX_AGE))
            except OSError as exc:
                raise MountError(f"--metrics-addr {self.config.metrics_addr}: {exc.strerror or exc}") from exc
            self.ops._call = self.metrics.timed(self.ops._call)  # type: ignore[method-assign]
        try:
            self.status_server = telemetry.StatusServer(
                control_address(self.config.mountpoint), lambda: self.stats(disk_age=0)
            )
        except OSError as exc:  # the name is taken (e.g. a lazily detached daemon of this mountpoint)
            logger.warning("no control socket (%s): mountctl status shows this mount's saved state", exc)

    def _stop_telemetry(self) -> None:
        if self.status_server is not None:
            self.status_server.close()
        if self.metrics is not None:
            self.metrics.close()

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
        supervision.every(1.0, self._stop, "writing the runtime state", self.write_state)

    def close(self) -> None:
        self._stop.set()
        self._stop_telemetry()
        if self._reporter is not None:
            # A write in progress would otherwise land after the state file is forgotten below,
            # leaving a record of a mount that is gone.
            self._reporter.join(timeout=5.0)
        state = read_state(self.config.mountpoint)
        if state is not None and state.get("pid") == os.getpid():
            forget_state(self.config.mountpoint)
        for watcher in (self.follow, self.stale_locks):
            if watcher is not None:
                watcher.close()
        self.view.close()
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()
        self.http.close()


def warn_if_shared(backing: str) -> None:
    """A user's --backing is never chmodded (group-shared caches are common); say what its mode allows."""
    mode = stat.S_IMODE(os.stat(backing).st_mode)
    allowed = [
        f"{who} can {'read and change' if mode & write else 'read (not change)'}"
        for who, bits, write in (("its group", 0o070, 0o020), ("other users", 0o007, 0o002))
        if mode & bits
    ]
    if allowed:
        logger.warning(
            "--backing %s (mode %04o): %s what it holds directly, gated and private repos' files included, "
            "bypassing the mount's rules (the daemon never follows symlinks planted there)",
            backing,
            mode,
            "; ".join(allowed),
        )


def resolve_group(group: str | None) -> int | None:
    """--group NAME or GID -> gid (None: no group)."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--group {group}: no such group") from None


def configure_logging(config: MountConfig) -> None:
    """Log to `config.log_file` (0600, never through a symlink: MountError) or to stderr."""
    handlers: list[logging.Handler] = []
    if config.log_file:
        Path(config.log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = os.fdopen(open_private_file(config.log_file), "a", buffering=1, encoding="utf-8", errors="replace")
        handlers.append(logging.StreamHandler(stream))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # its request lines would carry URLs only, but are noise


def read_config(fd: int) -> MountConfig:
    """The mount's configuration, as JSON written by `mount()` to the pipe `fd` (read to its end)."""
    with os.fdopen(fd, "rb") as pipe:
        return MountConfig.from_json(pipe.read().decode())


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (hf_xet's logs and shard cache)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


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

    tune_process()
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
                runtime.ops.attach(config.mountpoint, runtime.device)
                tune_readahead(runtime.device)
                runtime.write_state()
                report("READY", close=True)
                return
        report("ERROR MountError the mount did not come up within 30 s")

    threading.Thread(target=announce_when_ready, name="hffs-ready", daemon=True).start()
    # Idle libfuse workers beyond 16 retire, so a burst of callers does not pin threads forever.
    options: dict[str, Any] = {
        "max_threads": config.max_threads,
        "max_idle_threads": 16,
        "fsname": mount_fsname(config),  # the source as findmnt/df/mount(8) show it
        "subtype": "hffs",  # type fuse.hffs
    }
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
    parser = argparse.ArgumentParser(prog="hffs_neuron.daemon", allow_abbrev=False)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("mountpoint", help="informational: which mount this daemon serves")
    args = parser.parse_args(argv)
    config = read_config(args.config_fd)
    try:
        configure_logging(config)
        serve(config, ready_fd=args.ready_fd)
    except HffsError as exc:
        print(f"hffs daemon: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
