"""Live status and metrics of a mount daemon (one daemon process serves one mount).

- Process-wide tallies that a layer bumps with one call: FUSE replies by errno (`count_error`, from the
  adapter's error mapping) and upstream requests by status class (`timed_send`, around the HTTP send).
- `StatusServer`: the mount's control socket in the runtime directory (owner-only). It answers each
  connection with the daemon's status, built at that moment, in the JSON schema of README "Status and metrics", so a
  figure read right after an operation already includes it. `query_status` is its client.
- `Metrics`: `--metrics-addr` serves /metrics with prometheus_client from a private registry. Counters
  and gauges are read from the same status snapshot at scrape time (nothing is counted twice, nothing
  costs anything between scrapes); only the latency histograms are observed as operations happen.

Nothing here ever sees the token: the status holds the daemon's own figures and its MountConfig, which
carries no secret.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from . import supervision

logger = logging.getLogger(__name__)

R = TypeVar("R")

# `mountctl status` waits this long (seconds) for a live answer before showing the saved state.
STATUS_TIMEOUT = 2.0
# AF_UNIX addresses hold 107 bytes; longer socket paths are reached through their directory's fd.
_SUN_PATH_MAX = 100

# Parts of the status that other subsystems fill in (`Telemetry.provide`); these values stand until then.
NEUTRAL_SECTIONS: dict[str, Any] = {
    "read_ahead": {"queued": 0, "in_flight": 0, "done": 0},
    "publish": {"mode": "off", "published": 0, "pending": 0, "failed": [], "untrusted": [], "conflicts": []},
    "follow": "ttl",
    "stale_locks": [],
    "threads": {},
}

_lock = threading.Lock()
_errors: dict[str, int] = {}  # errno name -> FUSE replies
_http_status: dict[str, int] = {}  # "2xx".."5xx", "error" (no response) -> upstream requests
_denied: dict[str, int] = {}  # ORG/NAME -> EACCES replies for it (the Hub refused this mount's token)
_MAX_DENIED = 100  # repos remembered in `_denied`; beyond, new ones are counted under "other repos"
_upstream_latency: Any = None  # prometheus Histogram, while metrics are served


def count_error(code: int) -> int:
    """Count one FUSE reply failing with `code`; returns `code` (so the adapter can use it inline)."""
    name = errno.errorcode.get(code, str(code))
    with _lock:
        _errors[name] = _errors.get(name, 0) + 1
    return code


def count_denied(repo: str) -> None:
    """Count one EACCES reply because the Hub refused this mount's token for `repo` (shown by status)."""
    with _lock:
        if repo not in _denied and len(_denied) >= _MAX_DENIED:
            repo = "other repos"
        _denied[repo] = _denied.get(repo, 0) + 1


def denied() -> list[dict[str, Any]]:
    """Status `access_denied`: [{repo, count, message}], one per repo this mount's token cannot read."""
    from .errors import no_access

    with _lock:
        counts = dict(_denied)
    return [{"repo": r, "count": n, "message": str(no_access(r))} for r, n in sorted(counts.items())]


def timed_send(send: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`send(*args, **kwargs)`, an HTTP send returning a response: counted by status class and timed."""
    started = time.perf_counter()
    status_class = "error"
    try:
        response = send(*args, **kwargs)
        status_class = f"{response.status_code // 100}xx"  # type: ignore[attr-defined]
        return response
    finally:
        with _lock:
            _http_status[status_class] = _http_status.get(status_class, 0) + 1
        histogram = _upstream_latency
        if histogram is not None:
            histogram.labels(status_class).observe(time.perf_counter() - started)


def tallies() -> dict[str, dict[str, int]]:
    """Copies of the process-wide tallies: {"errors": {errno name: n}, "http_status": {class: n}}."""
    with _lock:
        return {"errors": dict(_errors), "http_status": dict(_http_status)}


class Telemetry:
    """The sections of a daemon's status that subsystems provide, with neutral values until they do."""

    def __init__(self) -> None:
        self._providers: dict[str, Callable[[], Any]] = {}

    def provide(self, section: str, provider: Callable[[], Any]) -> None:
        """Let `provider()` answer `section` (e.g. "read_ahead") in every status from now on."""
        self._providers[section] = provider

    def sections(self) -> dict[str, Any]:
        out = json.loads(json.dumps(NEUTRAL_SECTIONS))  # fresh copies: callers may modify them
        for section, provider in self._providers.items():
            out[section] = provider()
        return out


# -- the control socket ---------------------------------------------------------------------------
@contextmanager
def _address(path: Path) -> Iterator[str]:
    """`path` as an AF_UNIX address (through /proc/self/fd when too long for sun_path)."""
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class StatusServer:
    """Answers `status` on a Unix socket at `path` (mode 0600, in a 0700 directory) with `answer()`.

    One short-lived exchange per connection, each bounded by a timeout, on a thread of its own: the
    FUSE workers never wait for it and a silent client never blocks it for long.
    """

    def __init__(self, path: Path, answer: Callable[[], dict]):
        self.path = path
        self._answer = answer
        self._stop = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # a directory of sockets only: nobody else has business in it
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _address(path) as address:
                try:
                    os.unlink(address)  # left by a daemon that was killed: its mount is gone
                except FileNotFoundError:
                    pass
                old_umask = os.umask(0o177)  # born 0600: no window where others could connect
                try:
                    self._sock.bind(address)
                finally:
                    os.umask(old_umask)
                self._inode = os.stat(address).st_ino
            self._sock.listen(16)
            self._sock.settimeout(0.5)  # how often the loop looks at the stop flag
        except OSError:
            self._sock.close()
            raise
        self._thread = supervision.thread("hffs-status", self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(1.0)
                    request = conn.recv(64).strip()
                    if request == b"status":
                        conn.sendall(json.dumps(self._answer()).encode())
                except OSError as exc:
                    logger.debug("status request failed: %s", exc)
                except Exception:  # a bug in a status provider must not end the server
                    logger.exception("building the status failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()
        try:
            with _address(self.path) as address:
                # A newer daemon at the same mountpoint (after a lazy detach) may own the path by now.
                if os.stat(address).st_ino == self._inode:
                    os.unlink(address)
        except OSError:
            pass


def query_status(path: Path, timeout: float = STATUS_TIMEOUT) -> dict | None:
    """The live status from the daemon listening at `path`, or None if none answers within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock, _address(path) as address:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"status\n")
            chunks = []
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
        answer = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


# -- Prometheus -----------------------------------------------------------------------------------
# Latency buckets (seconds): sub-millisecond metadata answers up to multi-minute blob fetches.
_FUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30, 120)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """/metrics over HTTP at `host:port` from a private registry; `status()` is read at every scrape."""

    def __init__(self, host: str, port: int, status: Callable[[], dict]):
        from prometheus_client import CollectorRegistry, Histogram, start_http_server

        global _upstream_latency
        self.registry = CollectorRegistry(auto_describe=False)
        self.fuse_latency = Histogram(
            "hffs_fuse_operation_seconds",
            "Time the filesystem took to answer a FUSE operation, by operation",
            ["operation"],
            registry=self.registry,
            buckets=_FUSE_BUCKETS,
        )
        upstream = Histogram(
            "hffs_upstream_request_seconds",
            "Time to the response headers of a request to the Hub, by status class",
            ["status_class"],
            registry=self.registry,
            buckets=_HTTP_BUCKETS,
        )
        self.registry.register(_StatusCollector(status))
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        supervision.adopt("hffs-metrics", self._thread)
        bound = self._server.server_address
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        _upstream_latency = upstream

    def timed(self, call: Callable[..., R]) -> Callable[..., R]:
        """Wrap the adapter's `call(fn, *args)` so each operation's latency lands in the histogram."""
        children: dict[str, Any] = {}  # operation -> its histogram child: no label lookup per call
        histogram = self.fuse_latency

        def timed_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> R:
            started = time.perf_counter()
            try:
                return call(fn, *args, **kwargs)
            finally:
                name = fn.__name__
                child = children.get(name)
                if child is None:
                    child = children.setdefault(name, histogram.labels(name))
                child.observe(time.perf_counter() - started)

        return timed_call

    def close(self) -> None:
        global _upstream_latency
        _upstream_latency = None
        supervision.forget("hffs-metrics")
        self._server.shutdown()
        self._server.server_close()


class _StatusCollector:
    """Counters and gauges from one status snapshot per scrape (labels: bounded sets, never names)."""

    def __init__(self, status: Callable[[], dict]):
        self._status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._status()
        c = s["counters"]
        for name, doc, value in (
            ("hffs_cache_hits", "Opens answered from a complete local blob", c["hits"]),
            ("hffs_cache_misses", "Opens that needed a transfer (or waited for one)", c["misses"]),
            ("hffs_evictions", "Blobs evicted from the cache", c["evictions"]),
            ("hffs_upstream_requests", "Requests sent to the Hub, retries included", c["http_requests"]),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        transfers = CounterMetricFamily("hffs_transfers", "Blob transfers completed, by path", labels=["path"])
        transferred = CounterMetricFamily("hffs_transfer_bytes", "Bytes transferred, by path", labels=["path"])
        for path, figures in s["transfers"].items():
            transfers.add_metric([path], figures["count"])
            transferred.add_metric([path], figures["bytes"])
        errors = CounterMetricFamily("hffs_errors", "FUSE operations that failed, by errno", labels=["errno"])
        for name, count in c["errors"].items():
            errors.add_metric([name], count)
        responses = CounterMetricFamily(
            "hffs_upstream_responses", "Hub responses by status class (error: none)", labels=["status_class"]
        )
        for status_class, count in c["http_status"].items():
            responses.add_metric([status_class], count)
        yield from (transfers, transferred, errors, responses)
        cache = s["cache"]
        for name, doc, value in (
            ("hffs_cache_used_bytes", "Bytes of blobs in the cache", cache["used_bytes"] or 0),
            ("hffs_cache_limit_bytes", "Cache size limit", cache["limit_bytes"] or 0),
            ("hffs_fetches_in_flight", "Blob transfers in progress", len(s["in_flight"])),
            ("hffs_read_ahead_queued", "Read-ahead transfers queued", s["read_ahead"]["queued"]),
            ("hffs_read_ahead_in_flight", "Read-ahead transfers running", s["read_ahead"]["in_flight"]),
            ("hffs_publish_pending", "NEFF modules waiting to be published", s["publish"]["pending"]),
            ("hffs_publish_failed", "NEFF modules whose publication failed", len(s["publish"]["failed"])),
            ("hffs_stale_locks", "Compile locks whose writer is gone", len(s["stale_locks"])),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
