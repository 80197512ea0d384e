"""A local emulator of the Hugging Face Hub HTTP surface, serving repos and buckets from a directory.

It speaks exactly the subset of the Hub protocol that ``huggingface_hub`` 2.x uses for reading
(repo info, tree listings, paths-info, ``resolve`` downloads with Range and optional LFS redirects,
Storage Bucket listings and downloads) so that tests and demos run the real client with no network.

Bodies are never held in memory: repo files live content-addressed under ``<root>/blobs/<sha256>``,
bucket files are plain files under ``<root>/buckets/<namespace>/<name>/``, and both are sent with
``sendfile``. Every hash is computed once (when a repo file is added, or the first time a bucket
file is seen with a given size and mtime), never per request.

Tests drive it in-process (:class:`HubEmulator`) or as a subprocess::

    python -m hffs_neuron.testing.hub_emulator --root DIR [--port N] [--page-size N]
        [--redirect-lfs] [--token T] [--sample]

which prints ``READY http://127.0.0.1:PORT`` once serving, and is controlled over HTTP through
``/_emulator/*`` routes (see :class:`EmulatorClient`).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import socketserver
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Union
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import hf_xet

logger = logging.getLogger(__name__)

#: Files at least this large are stored as LFS files by default (the Hub's own rule of thumb).
LFS_MIN_SIZE = 10 * 1024
#: Suffixes always stored as LFS files by default, whatever their size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".neff", ".pb")
REPO_TYPES = ("model", "dataset")
FAULT_KINDS = ("latency", "stall", "status", "reset", "truncate", "corrupt")
# Faults decided before the response is chosen vs. faults that damage a response body.
_PRE_KINDS = frozenset({"latency", "stall", "status"})
_BODY_KINDS = frozenset({"reset", "truncate", "corrupt"})
_CHUNK = 8 * 1024 * 1024
_CORRUPT_BYTES = 64
_HEX = frozenset("0123456789abcdef")

FileSource = Union[bytes, str, "os.PathLike[str]"]


def default_lfs_rule(path: str, size: int) -> bool:
    """Whether a file is stored with LFS by default: large, or a binary weight/compiler artifact."""
    return size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The LFS pointer text git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _hash_file(path: Path, with_git_sha1: bool) -> tuple[str, str | None]:
    """Stream a file once and return (sha256, git blob sha1 or None)."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if with_git_sha1 else None
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), (sha1.hexdigest() if sha1 is not None else None)


def _iso(ts: float) -> str:
    """A timestamp in the Hub's ISO-8601 format (millisecond precision, ``Z`` suffix)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_commit_sha(rev: str) -> bool:
    return len(rev) == 40 and set(rev) <= _HEX


def _clean_rel_path(path: str) -> str | None:
    """A relative POSIX path with no empty, '.' or '..' component, or None if it is not one."""
    path = path.strip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or "\0" in path:
        return None
    return path


def _check_id(kind: str, ident: str) -> None:
    parts = ident.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{kind} id must look like 'namespace/name', got {ident!r}")


def _encode_cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode()).decode()


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------------
# Accounting and fault injection
# --------------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request seen by the emulator (either origin). ``bytes_sent`` counts body bytes only."""

    method: str
    path: str
    query: str
    status: int
    bytes_sent: int
    range_header: str | None
    time: float
    fault: str | None = None


@dataclass
class FaultRule:
    """One fault registered with :meth:`FaultInjector.add`; ``fired`` counts its applications."""

    pattern: str
    kind: str
    count: int | None = None
    rate: float | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: float | None = None
    methods: tuple[str, ...] = ("GET", "HEAD")
    fired: int = 0


class FaultInjector:
    """Thread-safe registry of faults applied to requests whose URL path matches a pattern.

    Kinds ``latency``, ``stall`` and ``status`` apply to any request. ``reset``, ``truncate`` and
    ``corrupt`` damage a response body, so they only apply (and only count) when a non-empty body
    is sent: a ``HEAD`` passes through untouched and the following ``GET`` gets the fault.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._random = random.Random(0)

    def add(
        self,
        pattern: str,
        kind: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        seconds: float = 0.0,
        status: int = 503,
        retry_after: float | None = None,
        methods: Iterable[str] = ("GET", "HEAD"),
    ) -> None:
        """Register a fault for URL paths matching the fnmatch ``pattern``.

        ``count`` limits it to the next N matching requests, ``rate`` applies it with that
        probability (see :meth:`seed`); with neither it applies to every matching request.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        rule = FaultRule(
            pattern=pattern,
            kind=kind,
            count=count,
            rate=rate,
            seconds=float(seconds),
            status=int(status),
            retry_after=retry_after,
            methods=tuple(m.upper() for m in methods),
        )
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._rules.clear()

    def seed(self, n: int) -> None:
        """Reseed the generator used by ``rate`` faults, for reproducible runs."""
        with self._lock:
            self._random.seed(n)

    def rules(self) -> list[FaultRule]:
        """Copies of the registered rules (with their ``fired`` counters)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._rules]

    def take(self, path: str, method: str, kinds: Iterable[str]) -> FaultRule | None:
        """Return (and count) the first rule of one of ``kinds`` that fires for this request."""
        kinds = frozenset(kinds)
        with self._lock:
            for rule in self._rules:
                if rule.kind not in kinds or method not in rule.methods:
                    continue
                if not fnmatch.fnmatchcase(path, rule.pattern):
                    continue
                if rule.count is not None and rule.fired >= rule.count:
                    continue
                if rule.rate is not None and self._random.random() >= rule.rate:
                    continue
                rule.fired += 1
                return dataclasses.replace(rule)
        return None


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


@dataclass
class _Repo:
    """A repo: branches pointing at immutable commits, each a mapping path -> file entry."""

    repo_type: str
    repo_id: str  # canonical spelling (the first one used)
    gated: bool = False
    created: float = field(default_factory=time.time)
    branches: dict[str, str] = field(default_factory=dict)
    # sha -> {"parent": str|None, "time": float, "title": str, "files": {path: entry}}
    # entry: {"size": int, "oid": git sha1, "sha256": content sha256, "lfs": bool, "pointer_size": int|None}
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _TreeIndex:
    """Directory structure of one commit, derived once (commits never change)."""

    files: dict[str, dict[str, Any]]
    dir_oids: dict[str, str]  # "" is the root
    children: dict[str, list[str]]  # dir -> full paths of its direct children


def _build_tree_index(files: dict[str, dict[str, Any]]) -> _TreeIndex:
    children: dict[str, set[str]] = {"": set()}
    contents: dict[str, list[str]] = {"": []}  # dir -> "path oid" lines of all files below it
    for path, entry in files.items():
        parts = path.split("/")
        parent = ""
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            children.setdefault(parent, set()).add(d)
            children.setdefault(d, set())
            contents.setdefault(d, []).append(f"{path} {entry['oid']}")
            parent = d
        children[parent].add(path)
        contents[""].append(f"{path} {entry['oid']}")
    # Include the directory's own path so nested directories with the same files differ.
    dir_oids = {d: hashlib.sha1("\n".join([d, *sorted(lines)]).encode()).hexdigest() for d, lines in contents.items()}
    return _TreeIndex(files, dir_oids, {d: sorted(c) for d, c in children.items()})


@dataclass
class _FileBody:
    path: Path
    offset: int
    length: int


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes | _FileBody = b""

    @property
    def length(self) -> int:
        return self.body.length if isinstance(self.body, _FileBody) else len(self.body)


@dataclass
class _Request:
    """What the routes need from a request: segments are the URL path split on '/' and decoded."""

    role: str
    method: str
    raw_path: str
    segments: list[str]
    query: dict[str, list[str]]
    body: bytes
    headers: Mapping[str, str]

    def param(self, name: str) -> str:
        return self.query.get(name, [""])[-1]


class _HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` and a json ``error``."""

    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def response(self) -> _Response:
        headers = {"Content-Type": "application/json", "X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _Response(self.status, headers, json.dumps({"error": self.message}).encode())


class _RangeNotSatisfiable(Exception):
    pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single ``bytes=`` range, None to serve the whole body.

    Multi-range and malformed headers are ignored (RFC 9110 allows it); raises
    :class:`_RangeNotSatisfiable` for a syntactically valid range beyond the end.
    """
    if not header or not header.strip().startswith("bytes=") or "," in header:
        return None
    spec = header.strip()[len("bytes=") :].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if not first:  # suffix range: the last N bytes
            n = int(last)
            if n <= 0 or size == 0:
                raise _RangeNotSatisfiable
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise _RangeNotSatisfiable
    if end < start:
        return None
    return start, min(end, size - 1)


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256  # many parallel workers (e.g. 32 compile ranks) connect at once

    def __init__(self, address: tuple[str, int], emulator: HubEmulator, role: str):
        self.emulator = emulator
        self.role = role  # "hub" or "cdn"
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can block for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut every open connection, so a stopped emulator no longer answers on pooled keep-alives."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hffs-hub-emulator/1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 120  # idle keep-alive connections eventually free their thread
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # -- request handling --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        emu = self.server.emulator
        split = urlsplit(self.path)
        raw_path, query = split.path, split.query
        path = unquote(raw_path)
        body = self._read_body()
        if path.startswith("/_emulator/") and self.server.role == "hub":
            self._send(self._control(path, query, body), None)
            return
        rec = emu._record(self.command, path, query, self.headers.get("Range"))
        fault = emu.faults.take(path, self.command, _PRE_KINDS)
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "latency":
                emu._stop_event.wait(fault.seconds)
            elif fault.kind == "stall":
                # A server that accepted the request and never answers; give up silently afterwards.
                emu._stop_event.wait(fault.seconds)
                self.close_connection = True
                return
            else:
                headers = {"Content-Type": "application/json"}
                if fault.retry_after is not None:
                    ra = fault.retry_after
                    headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
                self._send(_json({"error": "injected fault"}, fault.status, headers), rec)
                return
        try:
            segments = [unquote(s) for s in raw_path.split("/")[1:]]
            req = _Request(self.server.role, self.command, raw_path, segments, parse_qs(query), body, self.headers)
            resp = emu._route(req)
        except _HubError as e:
            resp = e.response()
        except Exception:
            logger.exception("emulator error on %s %s", self.command, self.path)
            resp = _HubError(500, None, "internal emulator error").response()
        self._send(resp, rec)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _control(self, path: str, query: str, body: bytes) -> _Response:
        """The ``/_emulator/*`` routes: stats and faults for a subprocess-run emulator."""
        emu = self.server.emulator
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/_emulator/stats" and self.command == "GET":
            contains, method = params.get("path_contains", ""), params.get("method")
            return _json(
                {
                    "bytes_served": emu.bytes_served(contains),
                    "requests": [dataclasses.asdict(r) for r in emu.requests(contains, method)],
                }
            )
        if self.command != "POST":
            return _HubError(405, None, "method not allowed").response()
        if path == "/_emulator/faults":
            try:
                emu.faults.add(**json.loads(body or b"{}"))
            except (TypeError, ValueError) as e:
                return _HubError(400, None, str(e)).response()
        elif path == "/_emulator/reset_stats":
            emu.reset_stats()
        elif path == "/_emulator/clear_faults":
            emu.faults.clear()
        else:
            return _HubError(404, None, "not found").response()
        return _json({"ok": True})

    # -- response writing --------------------------------------------------------------------------

    def _send(self, resp: _Response, rec: RequestRecord | None) -> None:
        """Write status, headers and (unless HEAD) the body, applying any body fault."""
        emu = self.server.emulator
        length = resp.length
        fault = None
        if rec is not None and self.command != "HEAD" and length > 0:
            fault = emu.faults.take(rec.path, self.command, _BODY_KINDS)
            if fault is not None:
                rec.fault = fault.kind
        emu._begin_response()
        try:
            self.send_response(resp.status)
            for key, value in resp.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if rec is not None:
                rec.status = resp.status
            if self.command == "HEAD" or length == 0:
                return
            kind = fault.kind if fault is not None else None
            count = length // 2 if kind in ("reset", "truncate") else length
            self._write_body(resp.body, count, kind == "corrupt", rec)
            if kind == "truncate":
                self.close_connection = True
            elif kind == "reset":
                self._abort_connection()
        except OSError as e:  # client gone, or a bucket file vanished mid-body: the response is lost
            logger.debug("aborted %s %s: %s", self.command, self.path, e)
            self.close_connection = True
        finally:
            emu._end_response()

    def _write_body(self, body: bytes | _FileBody, count: int, corrupt: bool, rec: RequestRecord | None) -> None:
        emu = self.server.emulator
        if isinstance(body, bytes):
            data = body[:count]
            if corrupt:
                data = _flip(data)
            self.wfile.write(data)
            emu._count_bytes(rec, len(data))
            return
        with open(body.path, "rb") as f:
            offset, end = body.offset, body.offset + count
            if corrupt:  # the slow path: bytes must pass through user space to be damaged
                f.seek(offset)
                first = True
                while offset < end:
                    chunk = f.read(min(_CHUNK, end - offset))
                    if not chunk:
                        raise ConnectionError("file shrank while serving")
                    if first:
                        chunk, first = _flip(chunk), False
                    self.wfile.write(chunk)
                    offset += len(chunk)
                    emu._count_bytes(rec, len(chunk))
                return
            while offset < end:
                sent = self.connection.sendfile(f, offset, min(_CHUNK, end - offset))
                if sent <= 0:
                    raise ConnectionError("file shrank while serving")
                offset += sent
                emu._count_bytes(rec, sent)

    def _abort_connection(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0, then close (the fd really closes in ``finish()``)."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


def _flip(data: bytes) -> bytes:
    """Invert the first bytes of a chunk: same length, different content."""
    n = min(_CORRUPT_BYTES, len(data))
    return bytes(b ^ 0xFF for b in data[:n]) + data[n:]


# --------------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------------


class HubEmulator:
    """A Hub served from ``root`` on a local port (plus a second "CDN" origin for LFS redirects).

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``page_size`` and
    ``redirect_lfs`` may be changed while it runs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = 1000,
        redirect_lfs: bool = False,
        tokens: Iterable[str] = (),
    ) -> None:
        self.root = Path(root).absolute()
        self.host, self._port = host, port
        self.page_size, self.redirect_lfs = page_size, redirect_lfs
        self._defaults = (page_size, redirect_lfs)
        self.tokens = frozenset(tokens)
        self.faults = FaultInjector()
        self.url = ""
        self.cdn_url: str | None = None
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._trees: dict[str, _TreeIndex] = {}
        self._overrides: dict[str, list[dict[str, Any]]] = {}
        self._hashes: dict[str, tuple[int, int, str]] = {}  # "algo:abs path" -> (size, mtime_ns, hash)
        self._stats_lock = threading.Condition()
        self._records: list[RequestRecord] = []
        self._active = 0  # responses being written right now
        self._servers: list[_Server] = []
        self._stop_event = threading.Event()
        self._counter = 0
        self._init_root()
        self._load_repos()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubEmulator:
        """Bind both origins and serve them from background threads."""
        self._stop_event.clear()
        hub = _Server((self.host, self._port), self, "hub")
        cdn = _Server((self.host, 0), self, "cdn")
        self._servers = [hub, cdn]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        self.url = f"http://{self.host}:{hub.server_port}"
        self.cdn_url = f"http://{self.host}:{cdn.server_port}"
        logger.info("hub emulator serving %s (cdn %s) from %s", self.url, self.cdn_url, self.root)
        return self

    def stop(self) -> None:
        """Stop serving; stalled requests are woken up and dropped."""
        self._stop_event.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        self._servers = []

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, buckets (wiping ``root``), stats and faults; restore page size/redirects."""
        with self._lock:
            self._repos.clear()
            self._trees.clear()
            self._overrides.clear()
            self._hashes.clear()
            for child in self.root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self._init_root()
        self.page_size, self.redirect_lfs = self._defaults
        self.faults.clear()
        self.reset_stats()

    def _init_root(self) -> None:
        for sub in ("blobs", "repos", "buckets", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- repos -------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        repo_type: str = "model",
        revision: str = "main",
        lfs: Callable[[str, int], bool] | None = None,
        gated: bool = False,
        parent: str | None = None,
    ) -> str:
        """Commit ``files`` to branch ``revision`` (creating the repo if needed); return the commit sha.

        Values are contents (bytes/str) or paths of existing files, which are hard-linked into
        the blob store (copied across filesystems); don't modify such a file afterwards. With
        ``parent`` (a branch or commit) the new commit starts from that commit's files.
        """
        _check_id("repo", repo_id)
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if _is_commit_sha(revision):
            raise ValueError("revision must be a branch name, not a commit sha")
        rule = lfs or default_lfs_rule
        entries = {}
        for name, source in files.items():
            path = _clean_rel_path(name)
            if path is None:
                raise ValueError(f"invalid path in repo: {name!r}")
            entries[path] = self._ingest(path, source, rule)
        with self._lock:
            key = self._repo_key(repo_type, repo_id)
            repo = self._repos.setdefault(key, _Repo(repo_type, repo_id))
            repo.gated = repo.gated or gated
            base: dict[str, dict[str, Any]] = {}
            if parent is not None:
                parent_sha = self._resolve_revision(repo, parent)
                if parent_sha is None:
                    raise ValueError(f"unknown parent revision {parent!r}")
                base = dict(repo.commits[parent_sha]["files"])
            base.update(entries)
            self._counter += 1
            seed = json.dumps([key, revision, parent, sorted(base), self._counter, time.time_ns()])
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = {
                "parent": repo.branches.get(revision),
                "time": time.time(),
                "title": f"Commit {self._counter}",
                "files": base,
            }
            repo.branches[revision] = sha
            self._save_repo(repo)
        return sha

    def set_gated(self, repo_id: str, gated: bool, *, repo_type: str = "model") -> None:
        """Gate (or ungate) a repo: downloads then need ``Authorization: Bearer <token>``."""
        with self._lock:
            repo = self._repos[self._repo_key(repo_type, repo_id)]
            repo.gated = gated
            self._save_repo(repo)

    def _ingest(self, path: str, source: FileSource, rule: Callable[[str, int], bool]) -> dict[str, Any]:
        """Store one file's content in the blob store and return its entry (hashes computed here)."""
        if isinstance(source, (bytes, str)):
            data = source.encode() if isinstance(source, str) else source
            is_lfs = rule(path, len(data))
            sha256 = hashlib.sha256(data).hexdigest()
            blob = self.root / "blobs" / sha256
            if not blob.exists():
                tmp = self.root / "tmp" / f"{sha256}.{threading.get_ident()}"
                tmp.write_bytes(data)
                os.replace(tmp, blob)
            size, sha1 = len(data), (None if is_lfs else git_blob_sha1(data))
        else:
            src = Path(source)
            size = src.stat().st_size
            is_lfs = rule(path, size)
            sha256, sha1 = _hash_file(src, with_git_sha1=not is_lfs)
            blob = self.root / "blobs" / sha256
            if not blob.exists():
                try:
                    os.link(src, blob)
                except FileExistsError:
                    pass
                except OSError:  # another filesystem: copy aside then rename, never a partial blob
                    tmp = self.root / "tmp" / f"{sha256}.{threading.get_ident()}"
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, blob)
        if is_lfs:
            pointer = lfs_pointer(sha256, size)
            return {
                "size": size,
                "oid": git_blob_sha1(pointer),
                "sha256": sha256,
                "lfs": True,
                "pointer_size": len(pointer),
            }
        return {"size": size, "oid": sha1, "sha256": sha256, "lfs": False, "pointer_size": None}

    @staticmethod
    def _repo_key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}:{repo_id.lower()}"

    def _repo_file(self, repo: _Repo) -> Path:
        return self.root / "repos" / repo.repo_type / (repo.repo_id.lower().replace("/", "--") + ".json")

    def _save_repo(self, repo: _Repo) -> None:
        """Persist a repo's index (tmp + rename) so a restarted emulator on the same root sees it."""
        target = self._repo_file(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(repo)))
        os.replace(tmp, target)

    def _load_repos(self) -> None:
        for index in (self.root / "repos").glob("*/*.json"):
            repo = _Repo(**json.loads(index.read_text()))
            self._repos[self._repo_key(repo.repo_type, repo.repo_id)] = repo

    @staticmethod
    def _resolve_revision(repo: _Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None

    def _tree(self, repo: _Repo, sha: str) -> _TreeIndex:
        with self._lock:
            index = self._trees.get(sha)
            if index is None:
                index = self._trees[sha] = _build_tree_index(repo.commits[sha]["files"])
            return index

    # -- buckets -----------------------------------------------------------------------------------

    def add_bucket(self, bucket_id: str, files: Mapping[str, FileSource] | None = None) -> Path:
        """Create a bucket (if needed) holding ``files``; return its directory.

        Files written into that directory later are served too (listings are never cached).
        """
        _check_id("bucket", bucket_id)
        found = self._find_bucket(bucket_id)
        directory = found[1] if found else self.root / "buckets" / bucket_id
        directory.mkdir(parents=True, exist_ok=True)
        for name, source in (files or {}).items():
            path = _clean_rel_path(name)
            if path is None:
                raise ValueError(f"invalid path in bucket: {name!r}")
            target = directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, (bytes, str)):
                target.write_bytes(source.encode() if isinstance(source, str) else source)
            else:
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
        return directory

    def bucket_dir(self, bucket_id: str) -> Path:
        """The directory holding a bucket's files (KeyError if there is no such bucket)."""
        found = self._find_bucket(bucket_id)
        if found is None:
            raise KeyError(bucket_id)
        return found[1]

    def add_listing_override(
        self, target_id: str, items: Iterable[Mapping[str, Any]], *, repo_type: str | None = None
    ) -> None:
        """Inject raw listing items (e.g. hostile names such as ``../x``) that don't exist on disk.

        ``target_id`` is a bucket id, or a repo id when ``repo_type`` is given. The items are
        returned verbatim, bypassing the direct-children rule, by every tree listing whose prefix
        is empty or a whole-component prefix of the item's path, and by paths-info on an exact path.
        """
        key = f"bucket:{target_id.lower()}" if repo_type is None else self._repo_key(repo_type, target_id)
        with self._lock:
            self._overrides.setdefault(key, []).extend(dict(i) for i in items)

    def _overrides_for(self, key: str, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._overrides.get(key, ()))
        return [i for i in items if not prefix or str(i.get("path", "")).startswith(prefix + "/")]

    def _find_bucket(self, bucket_id: str) -> tuple[str, Path] | None:
        """(canonical id, directory) of a bucket, matching the id case-insensitively."""
        parts = bucket_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            return None
        exact = self.root / "buckets" / bucket_id
        if exact.is_dir():
            return bucket_id, exact
        wanted = bucket_id.lower()
        for ns in (self.root / "buckets").iterdir():
            if ns.name.lower() == parts[0].lower() and ns.is_dir():
                for b in ns.iterdir():
                    if f"{ns.name}/{b.name}".lower() == wanted and b.is_dir():
                        return f"{ns.name}/{b.name}", b
        return None

    def _content_hash(self, path: Path, st: os.stat_result, algo: str = "sha256") -> str:
        """sha256 (the ETag) or xet hash (the listing's ``xetHash``, computed as clients do with
        ``hf_xet.hash_files``) of a bucket file, cached by (size, mtime_ns): rewriting it invalidates it."""
        key = f"{algo}:{path}"
        with self._lock:
            cached = self._hashes.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        if algo == "xet":
            digest = hf_xet.hash_files([str(path)])[0].hash
        else:
            digest = _hash_file(path, with_git_sha1=False)[0]
        with self._lock:
            self._hashes[key] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def _bucket_file_item(self, directory: Path, rel: str, st: os.stat_result) -> dict[str, Any]:
        return {
            "type": "file",
            "path": rel,
            "size": st.st_size,
            "xetHash": self._content_hash(directory / rel, st, "xet"),
            "mtime": _iso(st.st_mtime),
            "uploadedAt": _iso(st.st_mtime),
        }

    def _bucket_listing(self, directory: Path, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Items under ``prefix`` matched by whole path components (``foo`` never matches ``foo.x``)."""
        if prefix and _clean_rel_path(prefix) is None:
            return []
        target = directory / prefix if prefix else directory
        if prefix and target.is_file():
            return [self._bucket_file_item(directory, prefix, target.stat())]
        if not target.is_dir():
            return []
        items = []
        if recursive:
            for dirpath, _dirs, names in os.walk(target):
                for name in names:
                    full = Path(dirpath) / name
                    rel = full.relative_to(directory).as_posix()
                    items.append(self._bucket_file_item(directory, rel, full.stat()))
            return items
        with os.scandir(target) as it:
            for entry in it:
                rel = Path(entry.path).relative_to(directory).as_posix()
                st = entry.stat()
                if entry.is_dir():
                    items.append({"type": "directory", "path": rel, "uploadedAt": _iso(st.st_mtime)})
                else:
                    items.append(self._bucket_file_item(directory, rel, st))
        return items

    # -- accounting --------------------------------------------------------------------------------

    def _record(self, method: str, path: str, query: str, range_header: str | None) -> RequestRecord:
        rec = RequestRecord(method, path, query, 0, 0, range_header, time.time())
        with self._stats_lock:
            self._records.append(rec)
        return rec

    def _count_bytes(self, rec: RequestRecord | None, n: int) -> None:
        if rec is not None:
            with self._stats_lock:
                rec.bytes_sent += n

    def _begin_response(self) -> None:
        with self._stats_lock:
            self._active += 1

    def _end_response(self) -> None:
        with self._stats_lock:
            self._active -= 1
            self._stats_lock.notify_all()

    def _settle(self) -> None:
        # A client may hold the last bytes before the server thread has counted them: wait for
        # responses in flight to finish so stats taken right after a download are exact.
        self._stats_lock.wait_for(lambda: self._active == 0, timeout=5)

    def requests(self, path_contains: str = "", method: str | None = None) -> list[RequestRecord]:
        """Copies of the recorded requests whose (decoded) URL path contains ``path_contains``."""
        with self._stats_lock:
            self._settle()
            return [
                dataclasses.replace(r)
                for r in self._records
                if path_contains in r.path and (method is None or r.method == method.upper())
            ]

    def bytes_served(self, path_contains: str = "") -> int:
        """File bytes sent (200/206 bodies of GET ``resolve`` and CDN requests) whose path contains the string.

        Error bodies (e.g. an injected 503) are not file bytes and are not counted.
        """
        with self._stats_lock:
            self._settle()
            return sum(
                r.bytes_sent
                for r in self._records
                if r.method == "GET"
                and r.status in (200, 206)
                and path_contains in r.path
                and _is_download_path(r.path)
            )

    def reset_stats(self) -> None:
        """Forget recorded requests."""
        with self._stats_lock:
            self._records.clear()

    # -- routing -----------------------------------------------------------------------------------

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        auth = headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self.tokens

    def _route(self, req: _Request) -> _Response:
        """Map a request to a response; errors are raised as :class:`_HubError`."""
        seg, method = req.segments, req.method
        if req.role == "cdn":
            if len(seg) >= 5 and seg[0] == "lfs" and method in ("GET", "HEAD"):
                return self._serve_cdn(seg[4], req)
            raise _HubError(404, None, "not found")
        if seg[:2] == ["api", "agent-harnesses"]:
            return _json({"standardEnvVars": [], "harnesses": {}})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in ("models", "datasets"):
            return self._route_repo_api(seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[4:], req)
        if len(seg) >= 4 and seg[:2] == ["api", "buckets"]:
            return self._route_bucket_api(f"{seg[2]}/{seg[3]}", seg[4:], req)
        if method in ("GET", "HEAD"):
            if len(seg) >= 6 and seg[0] == "datasets" and seg[3] == "resolve":
                return self._resolve_repo_file("dataset", f"{seg[1]}/{seg[2]}", seg[4], seg[5:], req)
            if len(seg) >= 5 and seg[0] == "buckets" and seg[3] == "resolve":
                return self._resolve_bucket_file(f"{seg[1]}/{seg[2]}", seg[4:], req)
            if len(seg) >= 5 and seg[2] == "resolve":
                return self._resolve_repo_file("model", f"{seg[0]}/{seg[1]}", seg[3], seg[4:], req)
        raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    # -- repo routes -------------------------------------------------------------------------------

    def _get_repo(self, repo_type: str, repo_id: str, req: _Request) -> _Repo:
        with self._lock:
            repo = self._repos.get(self._repo_key(repo_type, repo_id))
        if repo is None:
            # Like the Hub: anonymous callers get 401 (the repo could be private), others 404.
            status = 404 if req.headers.get("Authorization") else 401
            raise _HubError(status, "RepoNotFound", "Repository not found")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> str:
        with self._lock:
            sha = self._resolve_revision(repo, revision)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _route_repo_api(self, repo_type: str, repo_id: str, rest: list[str], req: _Request) -> _Response:
        repo = self._get_repo(repo_type, repo_id, req)
        if req.method in ("GET", "HEAD"):
            if not rest:
                return self._repo_info(repo, "main", req)
            if rest[0] == "revision" and len(rest) == 2:
                return self._repo_info(repo, rest[1], req)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._repo_tree(repo, rest[1], "/".join(rest[2:]), req)
        if req.method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            return self._repo_paths_info(repo, rest[1], req)
        raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _repo_info(self, repo: _Repo, revision: str, req: _Request) -> _Response:
        sha = self._get_commit(repo, revision)
        commit = repo.commits[sha]
        with_blobs = _truthy(req.param("blobs"))
        siblings = []
        for path, e in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    sibling["lfs"] = {"size": e["size"], "sha256": e["sha256"], "pointerSize": e["pointer_size"]}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.lower().encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": _iso(repo.created),
            "lastModified": _iso(commit["time"]),
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _json(info)

    @staticmethod
    def _repo_item(index: _TreeIndex, path: str, sha: str, commit: dict[str, Any], expand: bool) -> dict:
        if path in index.files:
            e = index.files[path]
            item: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
            if e["lfs"]:
                item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": e["pointer_size"]}
        else:
            item = {"type": "directory", "oid": index.dir_oids[path], "size": 0, "path": path}
        if expand:
            item["lastCommit"] = {"id": sha, "title": commit["title"], "date": _iso(commit["time"])}
        return item

    def _repo_tree(self, repo: _Repo, revision: str, path: str, req: _Request) -> _Response:
        sha = self._get_commit(repo, revision)
        index = self._tree(repo, sha)
        path = path.strip("/")
        if path and path not in index.dir_oids:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {revision} or is not a directory")
        expand = _truthy(req.param("expand"))
        if _truthy(req.param("recursive")):
            start = path + "/" if path else ""
            names = [p for p in (*index.files, *index.dir_oids) if p and p.startswith(start)]
        else:
            names = index.children.get(path, [])
        commit = repo.commits[sha]
        items = [self._repo_item(index, p, sha, commit, expand) for p in names]
        items += self._overrides_for(self._repo_key(repo.repo_type, repo.repo_id), path)
        return self._paginated(items, req)

    def _repo_paths_info(self, repo: _Repo, revision: str, req: _Request) -> _Response:
        sha = self._get_commit(repo, revision)
        index = self._tree(repo, sha)
        form = _parse_form_or_json(req.body, req.headers)
        expand = _truthy(str(form.get("expand", [""])[-1]))
        commit = repo.commits[sha]
        overrides = {i.get("path"): i for i in self._overrides_for(self._repo_key(repo.repo_type, repo.repo_id), "")}
        out = []
        for raw in form.get("paths", []):
            path = str(raw).strip("/")
            if path in index.files or (path and path in index.dir_oids):
                out.append(self._repo_item(index, path, sha, commit, expand))
            elif raw in overrides:
                out.append(overrides[raw])
        return _json(out)

    def _paginated(self, items: list[dict[str, Any]], req: _Request) -> _Response:
        """One page of ``items`` sorted by path after the cursor, with a ``Link`` to the next page.

        The cursor is the last path served, so a listing that changes between pages still progresses.
        """
        items.sort(key=lambda i: str(i.get("path", "")))
        cursor = req.param("cursor")
        if cursor:
            last = _decode_cursor(cursor)
            items = [i for i in items if str(i.get("path", "")) > last]
        size = max(1, int(self.page_size))
        page = items[:size]
        headers = {}
        if len(items) > size:
            params = [(k, v) for k, vs in req.query.items() if k != "cursor" for v in vs]
            params.append(("cursor", _encode_cursor(str(page[-1].get("path", "")))))
            headers["Link"] = f'<{self.url}{req.raw_path}?{urlencode(params)}>; rel="next"'
        return _json(page, headers=headers)

    def _resolve_repo_file(
        self, repo_type: str, repo_id: str, revision: str, path_parts: list[str], req: _Request
    ) -> _Response:
        repo = self._get_repo(repo_type, repo_id, req)
        sha = self._get_commit(repo, revision)
        if repo.gated and not self._authorized(req.headers):
            raise _HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
        path = "/".join(path_parts)
        entry = repo.commits[sha]["files"].get(path)
        if entry is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            common.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
            if self.redirect_lfs and self.cdn_url:
                # Like the Hub: HEAD and GET both get the 302, which carries the file's metadata.
                location = f"{self.cdn_url}/lfs/{repo_type}s/{repo.repo_id}/{entry['sha256']}/{quote(path)}"
                return _Response(302, {**common, "Location": location, "ETag": f'"{entry["sha256"]}"'})
            etag = entry["sha256"]
        else:
            etag = entry["oid"]
        return _file_response(self.root / "blobs" / entry["sha256"], entry["size"], etag, req, common)

    def _serve_cdn(self, sha256: str, req: _Request) -> _Response:
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise _HubError(404, None, "not found")
        blob = self.root / "blobs" / sha256
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise _HubError(404, None, "not found") from None
        return _file_response(blob, size, sha256, req, {"Accept-Ranges": "bytes"})

    # -- bucket routes -----------------------------------------------------------------------------

    def _get_bucket(self, bucket_id: str) -> tuple[str, Path]:
        found = self._find_bucket(bucket_id)
        if found is None:
            # huggingface_hub maps RepoNotFound on /api/buckets/ URLs to BucketNotFoundError.
            raise _HubError(404, "RepoNotFound", f"Bucket {bucket_id} not found")
        return found

    def _route_bucket_api(self, bucket_id: str, rest: list[str], req: _Request) -> _Response:
        canonical, directory = self._get_bucket(bucket_id)
        key = f"bucket:{canonical.lower()}"
        if req.method in ("GET", "HEAD") and not rest:
            sizes = [p.stat().st_size for p in directory.rglob("*") if p.is_file()]  # no hashing: just totals
            return _json(
                {
                    "id": canonical,
                    "private": False,
                    "createdAt": _iso(directory.stat().st_ctime),
                    "size": sum(sizes),
                    "totalFiles": len(sizes),
                }
            )
        if req.method in ("GET", "HEAD") and rest[:1] == ["tree"]:
            prefix = "/".join(rest[1:]).strip("/")
            recursive = _truthy(req.param("recursive"))
            items = self._bucket_listing(directory, prefix, recursive) + self._overrides_for(key, prefix)
            return self._paginated(items, req)
        if req.method == "POST" and rest == ["paths-info"]:
            try:
                paths = json.loads(req.body or b"{}").get("paths", [])
            except (ValueError, AttributeError):
                raise _HubError(400, None, "expected a json body {'paths': [...]}") from None
            overrides = {i.get("path"): i for i in self._overrides_for(key, "")}
            out = []
            for raw in paths:
                rel = _clean_rel_path(str(raw))
                target = directory / rel if rel else None
                if rel and target is not None and target.is_file():
                    out.append(self._bucket_file_item(directory, rel, target.stat()))
                elif raw in overrides:
                    out.append(overrides[raw])
            return _json(out)
        raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _resolve_bucket_file(self, bucket_id: str, path_parts: list[str], req: _Request) -> _Response:
        _, directory = self._get_bucket(bucket_id)
        rel = _clean_rel_path("/".join(path_parts))
        target = directory / rel if rel else None
        if target is None or not target.is_file():
            raise _HubError(404, "EntryNotFound", "Entry not found")
        st = target.stat()
        sha256 = self._content_hash(target, st)
        return _file_response(target, st.st_size, sha256, req, {"Accept-Ranges": "bytes"})


def _file_response(blob: Path, size: int, etag: str, req: _Request, extra: Mapping[str, str]) -> _Response:
    """200 with the whole file, 206 for a satisfiable Range, 416 otherwise."""
    base = {**extra, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
    try:
        rng = _parse_range(req.headers.get("Range"), size)
    except _RangeNotSatisfiable:
        return _Response(416, {**base, "Content-Range": f"bytes */{size}"})
    if rng is None:
        return _Response(200, base, _FileBody(blob, 0, size))
    start, end = rng
    return _Response(
        206, {**base, "Content-Range": f"bytes {start}-{end}/{size}"}, _FileBody(blob, start, end - start + 1)
    )


def _is_download_path(path: str) -> bool:
    return "/resolve/" in path or path.startswith("/lfs/")


def _parse_form_or_json(body: bytes, headers: Mapping[str, str]) -> dict[str, list[Any]]:
    """Parse a form-encoded (what huggingface_hub sends) or json paths-info body into lists."""
    if "json" in (headers.get("Content-Type") or ""):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _HubError(400, None, "invalid json body") from None
        return {k: v if isinstance(v, list) else [v] for k, v in data.items()}
    return parse_qs(body.decode(), keep_blank_values=True)


# --------------------------------------------------------------------------------------------------
# Remote control of a subprocess-run emulator
# --------------------------------------------------------------------------------------------------


class EmulatorClient:
    """Drive the stats and faults of an emulator running in another process, over its HTTP port."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, route: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(
            f"{self.url}{route}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def _stats(self, path_contains: str = "", method: str | None = None) -> dict[str, Any]:
        params = {"path_contains": path_contains, **({"method": method} if method else {})}
        return self._call("GET", f"/_emulator/stats?{urlencode(params)}")

    def bytes_served(self, path_contains: str = "") -> int:
        return int(self._stats(path_contains)["bytes_served"])

    def requests(self, path_contains: str = "", method: str | None = None) -> list[RequestRecord]:
        return [RequestRecord(**r) for r in self._stats(path_contains, method)["requests"]]

    def reset_stats(self) -> None:
        self._call("POST", "/_emulator/reset_stats")

    def faults_add(self, pattern: str, kind: str, **kwargs: Any) -> None:
        """Same arguments as :meth:`FaultInjector.add`."""
        if "methods" in kwargs:
            kwargs["methods"] = list(kwargs["methods"])
        self._call("POST", "/_emulator/faults", {"pattern": pattern, "kind": kind, **kwargs})

    def faults_clear(self) -> None:
        self._call("POST", "/_emulator/clear_faults")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve a Hub emulator until SIGTERM/SIGINT; print ``READY <url>`` once listening."""
    parser = argparse.ArgumentParser(prog="python -m hffs_neuron.testing.hub_emulator", description=__doc__)
    parser.add_argument("--root", required=True, help="directory holding the emulator's data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--redirect-lfs", action="store_true", help="answer LFS downloads with a 302 to the CDN")
    parser.add_argument("--token", action="append", default=[], help="accepted token for gated repos (repeatable)")
    parser.add_argument("--sample", action="store_true", help="populate the demo NEFF bucket and sharded repo")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    emulator = HubEmulator(
        args.root,
        host=args.host,
        port=args.port,
        page_size=args.page_size,
        redirect_lfs=args.redirect_lfs,
        tokens=args.token,
    )
    if args.sample:
        from hffs_neuron.testing.sample_data import build_neff_bucket, build_sharded_model_repo

        logger.info("sample bucket: %s", build_neff_bucket(emulator)["bucket_id"])
        logger.info("sample repo: %s", build_sharded_model_repo(emulator)["repo_id"])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with emulator:
        print(f"READY {emulator.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
