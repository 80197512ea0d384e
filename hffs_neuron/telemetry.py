"""Live status and metrics of a mount daemon (one daemon process serves one mount).

- Process-wide tallies that a layer bumps with one call: FUSE replies by errno (`count_error`, from the
  adapter's error mapping) and upstream requests by status class (`timed_send`, around the HTTP send).
- `StatusServer`: the mount's control socket (an abstract name derived from the mountpoint, answering
  the daemon's user and root only). It answers each connection with the daemon's status, built at that
  moment, in the JSON schema of README "Status and metrics", so a figure read right after an operation
  already includes it. `query_status` is its client.
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
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import supervision

logger = logging.getLogger(__name__)

R = TypeVar("R")

# `mountctl status` waits this long (seconds) for a live answer before showing the saved state.
STATUS_TIMEOUT = 2.0

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
# Xet traffic: token requests (counted exactly, as they are sent through the mount's HTTP client) and
# reconstruction requests to the CAS (one per hf_xet download stream: hf_xet has no per-request hook, so
# its xorb range requests and its own retries are not counted; their bytes are, in `transfers.xet`).
_xet: dict[str, int] = {"token": 0, "reconstruction": 0}
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


def count_xet_stream() -> None:
    """Count one hf_xet download stream: one reconstruction request to the Xet CAS."""
    with _lock:
        _xet["reconstruction"] += 1


def timed_send(send: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`send(request, ...)`, an HTTP send returning a response: counted by status class (and Xet token
    requests by kind) and timed."""
    path = getattr(getattr(args[0], "url", None), "path", "") if args else ""
    if "/xet-read-token" in path or "/xet-write-token" in path:
        with _lock:
            _xet["token"] += 1
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
    """Copies of the process-wide tallies: {"errors": {errno name: n}, "http_status": {class: n},
    "xet": {"token": n, "reconstruction": n}}."""
    with _lock:
        return {"errors": dict(_errors), "http_status": dict(_http_status), "xet": dict(_xet)}


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
def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


class StatusServer:
    """Answers `status` on the abstract AF_UNIX socket `address` (`runtime.control_address`) with `answer()`.

    Anyone on the host may connect to an abstract socket, so each connection's peer is checked first
    (SO_PEERCRED): only this daemon's user and root get an answer, anyone else is hung up on. One
    short-lived exchange per connection, each bounded by a timeout, on a thread of its own: the FUSE
    workers never wait for it and a silent client never blocks it for long.
    """

    def __init__(self, address: str, answer: Callable[[], dict]):
        self._answer = answer
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(address)  # EADDRINUSE: another process holds the name (the caller decides)
            self._sock.listen(16)
            self._sock.settimeout(0.5)  # how often the loop looks at the stop flag
        except OSError:
            self._sock.close()
            raise
        self._thread = supervision.thread("hffs-status", self._serve)
        self._thread.start()

    def _serve(self) -> None:
        allowed = {os.geteuid(), 0}
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                try:
                    if peer_uid(conn) not in allowed:
                        continue  # another user: nothing said, not even that this is a mount
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


def query_status(address: str, owner: int | None = None, timeout: float = STATUS_TIMEOUT) -> dict | None:
    """The live status from the daemon listening at `address`, or None if none answers within `timeout`.

    The answer counts only if the peer runs as `owner` (the mount's uid in mountinfo), or, without one,
    as this user or root: a name taken by another user's process is never believed.
    """
    deadline = time.monotonic() + timeout
    trusted = {owner} if owner is not None else {os.geteuid(), 0}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            if peer_uid(sock) not in trusted:
                return None
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
# The metrics server: seconds a connection has to send its request and read the answer, connections
# kept at once (beyond, the oldest is closed), bytes a request may have.
METRICS_TIMEOUT = 5.0
METRICS_MAX_CONNECTIONS = 256
METRICS_MAX_REQUEST = 8192
# How old the cache's disk-use figure may be in a scrape (seconds) when this mount fetched and evicted
# nothing since (other mounts may share the cache dir): measuring it walks the blob store.
DISK_USAGE_MAX_AGE = 30.0
_EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets (seconds): sub-millisecond metadata answers up to multi-minute blob fetches.
_FUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30, 120)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """/metrics over HTTP at `host:port` from a private registry; `status()` is read at every scrape
    (the daemon passes one whose disk-use figure is cached: `CachedFigure`)."""

    def __init__(self, host: str, port: int, status: Callable[[], dict]):
        from prometheus_client import CollectorRegistry, Histogram, generate_latest

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
        self._server = MetricsServer(host, port, lambda: generate_latest(self.registry))
        bound = self._server.address
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
        self._server.close()


class MetricsServer:
    """A minimal HTTP/1.0 server for /metrics: one thread answers every connection (`selectors`), so
    idle or slow clients cost a socket each, never a thread; each connection gets `METRICS_TIMEOUT`
    seconds to send its request and read the answer, and at most `METRICS_MAX_CONNECTIONS` are kept
    (the oldest is closed to make room). `body()` builds the exposition (prometheus text format)."""

    def __init__(self, host: str, port: int, body: Callable[[], bytes]):
        self._body = body
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._conns: dict[socket.socket, _Exchange] = {}  # oldest first
        self._stop = threading.Event()
        self._thread = supervision.thread("hffs-metrics", self._serve)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(timeout=0.5):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif events & selectors.EVENT_READ:
                        self._read(sock)  # type: ignore[arg-type]
                    else:
                        self._write(sock)  # type: ignore[arg-type]
                now = time.monotonic()
                for sock in [s for s, x in self._conns.items() if x.deadline < now]:
                    self._drop(sock)
        finally:
            for sock in list(self._conns):
                self._drop(sock)
            self._selector.close()
            self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: the connections already held are served, then room comes
                logger.debug("metrics: accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= METRICS_MAX_CONNECTIONS:
                self._drop(next(iter(self._conns)))
            self._conns[sock] = _Exchange(time.monotonic() + METRICS_TIMEOUT)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        exchange = self._conns[sock]
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        exchange.request += data
        if not data or len(exchange.request) > METRICS_MAX_REQUEST:
            self._drop(sock)
            return
        if b"\n\r\n" not in exchange.request and b"\n\n" not in exchange.request:
            return  # the headers are not all here yet
        exchange.response = memoryview(self._answer(bytes(exchange.request)))
        self._selector.modify(sock, selectors.EVENT_WRITE)
        self._write(sock)

    def _answer(self, request: bytes) -> bytes:
        parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        method, path = (parts[0], parts[1].split(b"?", 1)[0]) if len(parts) >= 2 else (b"", b"")
        if method not in (b"GET", b"HEAD") or path not in (b"/metrics", b"/"):
            status, body, kind = "404 Not Found", b"not found: GET /metrics\n", "text/plain"
        else:
            try:
                status, body, kind = "200 OK", self._body(), _EXPOSITION
            except Exception:  # a bug in a status provider: the scrape fails, the server goes on
                logger.exception("building the metrics failed")
                status, body, kind = "500 Internal Server Error", b"error\n", "text/plain"
        head = f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return head.encode() + (body if method == b"GET" else b"")

    def _write(self, sock: socket.socket) -> None:
        exchange = self._conns[sock]
        try:
            sent = sock.send(exchange.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sock)
            return
        exchange.response = exchange.response[sent:]
        if not exchange.response:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._conns.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def close(self) -> None:
        supervision.forget("hffs-metrics")
        self._stop.set()
        self._thread.join(timeout=2.0)


@dataclass
class _Exchange:
    """One connection to the metrics server: its deadline, the request so far, the answer left to send."""

    deadline: float
    request: bytes = b""
    response: memoryview = field(default_factory=lambda: memoryview(b""))


class CachedFigure:
    """`compute()` again only when `version()` changed or the last value is older than `max_age` seconds
    (a figure that walks a directory tree, read at every scrape); callers in between get the last value."""

    def __init__(self, compute: Callable[[], int], version: Callable[[], object], max_age: float):
        self._compute = compute
        self._version = version
        self._max_age = max_age
        self._lock = threading.Lock()
        self._value: int | None = None
        self._seen: object = None
        self._at = 0.0

    def get(self, max_age: float | None = None) -> int:
        """The figure, at most `max_age` (default: the one given at creation) seconds old."""
        limit = self._max_age if max_age is None else max_age
        with self._lock:
            version = self._version()
            if self._value is None or version != self._seen or time.monotonic() - self._at > limit:
                self._value, self._seen, self._at = self._compute(), version, time.monotonic()
            return self._value


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
        xet = CounterMetricFamily(
            "hffs_xet_requests",
            "Xet requests: token (exact) and CAS reconstructions (one per hf_xet stream; xorb requests not seen)",
            labels=["kind"],
        )
        for kind, count in c["xet_requests"].items():
            xet.add_metric([kind], count)
        yield from (transfers, transferred, errors, responses, xet)
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
