"""The Xet path: a second way for a remote to fill a blob, beside HTTP Range (remote/http.py).

A file the Hub lists with a xet hash is reconstructed from the Xet CAS by `hf_xet`, as `hf_hub_download`
does (huggingface_hub's `xet_get`): the same token route and token refresh. The first token of a route is
asked for with the mount's own `HubHttp` (its deadline, per-attempt timeouts, retries and connections),
not huggingface_hub's shared session (no timeout), one request in flight per route, outside any lock that
closing a transfer takes: a stalled token route costs a read at most `--timeout`, then HTTP Range.

Unlike `hf_hub_download`, the mount takes the bytes from hf_xet's ordered byte streams
(`XetDownloadStreamGroup.download_stream(start, end)`) and writes them itself: a Xet transfer is then a
transfer like any other for the store's scheduler (one connection budget, foreground before read-ahead,
byte ranges over several connections, progress deadlines) and its bytes reach the verifying hash in order
while they arrive, instead of a second pass over the finished file.

The store asks for this path first and falls back to HTTP Range on any failure (logged once per mount);
the file it fills is the store's private temp file, verified and renamed by the store, so a blob is
never half from each path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import constants
from ..errors import HffsError, RemoteUnavailable
from ..telemetry import count_xet_stream
from .base import RemoteEntry

if TYPE_CHECKING:
    from .http import HubHttp

logger = logging.getLogger(__name__)

# After a failure the Xet path is skipped for this long (seconds): a broken CAS costs one file's deadline,
# not every file's (HFFS_XET_PAUSE_AFTER_FAILURE).
_PAUSE_AFTER_FAILURE = constants.XET_PAUSE_AFTER_FAILURE
# A cached token is asked for again this long before it expires (seconds), as huggingface_hub does.
_TOKEN_SAFETY_PERIOD = 60
# Idle stream groups kept per token route for the next transfer: a new group loads the system's root
# certificates and opens new connections (the daemon's CPU per 1 MiB NEFF read over Xet: 21 ms, 7 ms with
# reused groups).
_IDLE_GROUPS = 2
_lock = threading.Lock()
_module: Any = None


def hf_xet_module() -> Any:
    """hf_xet, its runtime started with the process's SIGINT action kept.

    Starting its runtime replaces the SIGINT action with its own, once, from whichever thread: in a FUSE
    worker that would take Ctrl-C from libfuse, and `mount --foreground` would no longer exit on it.
    """
    global _module
    with _lock:
        if _module is None:
            import hf_xet  # comes with huggingface_hub; imported here so other paths never pay for it

            _keeping_sigint(lambda: hf_xet.hash_files([]))  # starts the runtime
            _module = hf_xet
    return _module


def _keeping_sigint(start: Callable[[], Any]) -> Any:
    """`start()`, with the SIGINT action it may install (hf_xet's runtime) undone."""
    libc = ctypes.CDLL(None, use_errno=True)
    action = ctypes.create_string_buffer(256)  # an opaque struct sigaction (152 bytes on x86-64)
    if libc.sigaction(signal.SIGINT, None, action) != 0:
        raise OSError(ctypes.get_errno(), "sigaction")
    try:
        return start()
    finally:
        libc.sigaction(signal.SIGINT, action, None)


def xet_available(mode: str) -> bool:
    """Whether the Xet path is on for a mount whose `--xet` is `mode` (and this process's environment)."""
    if mode == "off" or constants.HF_HUB_DISABLE_XET:
        return False
    try:
        import hf_xet  # noqa: F401
    except ImportError:
        return False
    return True


def configure_hf_xet(cache_dir: str | os.PathLike, reserve: int) -> None:
    """Before hf_xet is first used in this process: its files (logs, shard cache of uploads) go under the
    mount's cache directory, owner-only, within `reserve` bytes, and no chunk cache is kept (blobs are
    the cache)."""
    root = os.path.join(os.fspath(cache_dir), "xet")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    os.environ["HF_XET_CACHE"] = root
    os.environ["HF_XET_CHUNK_CACHE_SIZE_BYTES"] = "0"
    os.environ["HF_XET_SHARD_CACHE_SIZE_LIMIT"] = str(reserve // 2)
    os.environ["HF_XET_LOG_DIR_MAX_SIZE"] = str(reserve // 4)


@dataclass(frozen=True)
class XetSource:
    """Where a file's Xet reconstruction comes from: its hash and the remote's read-token route."""

    file_hash: str
    token_url: str


@dataclass(frozen=True)
class _Token:
    """A Xet read token as the token route grants it (its `X-Xet-*` headers)."""

    endpoint: str
    access_token: str
    expiry: int  # unix seconds

    def fresh(self) -> bool:
        return self.expiry > int(time.time()) + _TOKEN_SAFETY_PERIOD


class _TokenRequest:
    """One token request in flight for a route: its waiters wait on `done` for `token` or `error`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: _Token | None = None
        self.error: BaseException | None = None


class XetDownloader:
    """Reads byte ranges of files from the Xet CAS with the mount's identity; one per daemon."""

    def __init__(self, http: HubHttp, *, max_connections: int):
        """`http`: the mount's client; token requests go through it (its deadline, retries, connections)."""
        self._http = http
        self._headers = dict(http.headers)  # the Hub's auth headers: sent to the token route only
        self._cas_headers = {k: v for k, v in http.headers.items() if k.lower() != "authorization"}
        self._max_connections = max_connections
        self._session: Any = None
        self._lock = threading.Lock()
        self._warned = False
        self._paused_until = 0.0
        self._tokens: dict[str, _Token] = {}  # by token route
        self._token_requests: dict[str, _TokenRequest] = {}  # by token route, while one is in flight
        self._idle_groups: dict[str, list[tuple[Any, _Token]]] = {}  # by token route: (group, its token)

    def limit_connections(self, n: int) -> None:
        """Let hf_xet's session hold at most `n` connections (the transfer scheduler's Xet share); before
        the first transfer."""
        with self._lock:
            self._max_connections = min(self._max_connections, max(1, n))

    def _get_session(self) -> Any:
        with self._lock:
            if self._session is None:
                hf_xet = hf_xet_module()
                n = max(1, self._max_connections)
                # hf_xet has no per-connection hook: its concurrent CAS downloads (the adaptive-concurrency
                # ceiling, and where it starts) and its pool of idle connections are what can be capped.
                config = hf_xet.XetConfig().with_config(
                    {
                        "client.ac_max_download_concurrency": n,
                        "client.ac_initial_download_concurrency": n,
                        "client.max_idle_connections": n,
                    }
                )
                self._session = _keeping_sigint(lambda: hf_xet.XetSession(config))
            return self._session

    def source(self, remote: object, entry: RemoteEntry) -> XetSource | None:
        """The Xet source of `entry` if it has a xet hash and its remote a token route, else None."""
        token_url = getattr(remote, "xet_token_url", None)
        if not entry.xet_hash or token_url is None or entry.size == 0:
            return None
        if time.monotonic() < self._paused_until:
            return None
        return XetSource(entry.xet_hash, token_url())

    def reader(self, source: XetSource, entry: RemoteEntry) -> XetFileReader:
        """A reader of `entry`'s byte ranges for one transfer; `close()` it when the transfer ends."""
        return XetFileReader(self, source, entry)

    def token(self, source: XetSource, deadline: float) -> _Token:
        """A read token of `source`'s route: cached while fresh, else asked for with the mount's `HubHttp`
        by one caller at a time per route; the others wait for its answer until `deadline` (monotonic).

        No lock is held while the request runs. A failure raises `HffsError`, never `RemoteUnavailable`,
        by `deadline`: the scheduler then fails the transfer at once (the store falls back to HTTP Range)
        instead of asking again with a new deadline.
        """
        url = source.token_url
        with self._lock:
            token = self._tokens.get(url)
            if token is not None and token.fresh():
                return token
            request = self._token_requests.get(url)
            leader = request is None
            if leader:
                request = self._token_requests[url] = _TokenRequest()
        assert request is not None
        if not leader:
            if not request.done.wait(max(0.0, deadline - time.monotonic())):
                raise HffsError(f"xet read token: not answered by {url} within the deadline")
            if request.token is None:
                raise HffsError(f"xet read token: {request.error}")
            return request.token
        try:
            request.token = self._ask_token(url, deadline)
            with self._lock:
                self._tokens[url] = request.token
            return request.token
        except BaseException as exc:
            request.error = exc
            if isinstance(exc, HffsError):
                raise HffsError(f"xet read token: {exc}") from exc
            raise
        finally:
            with self._lock:
                self._token_requests.pop(url, None)
            request.done.set()

    @property
    def operation_timeout(self) -> float:
        return self._http.operation_timeout

    def _ask_token(self, url: str, deadline: float) -> _Token:
        response = self._http.request("GET", url, "xet read token", deadline=deadline, headers=self._headers)
        try:
            return _Token(
                endpoint=response.headers["X-Xet-Cas-Url"],
                access_token=response.headers["X-Xet-Access-Token"],
                expiry=int(response.headers["X-Xet-Token-Expiration"]),
            )
        except (KeyError, ValueError) as exc:
            raise HffsError(f"xet read token: the answer of {url} has no usable X-Xet-* headers") from exc

    def take_group(self, source: XetSource, deadline: float) -> tuple[Any, _Token]:
        """A stream group for one transfer of `source` and the token it was opened with: an idle one whose
        token is still fresh, else a new one (its token from `token`, bounded by `deadline`)."""
        with self._lock:
            idle = self._idle_groups.get(source.token_url, [])
            while idle:
                group, token = idle.pop()
                if token.fresh():
                    return group, token
                _abort(group)
        token = self.token(source, deadline)
        group = self._get_session().new_download_stream_group(
            endpoint=token.endpoint,
            token=token.access_token,
            token_expiry_unix_secs=token.expiry,
            token_refresh_url=source.token_url,
            token_refresh_headers=self._headers,
            custom_headers=self._cas_headers,
        )
        return group, token

    def give_back_group(self, source: XetSource, group: Any, token: _Token) -> None:
        """A transfer ended with every stream of `group` read to its end: keep the group for the next one
        (up to `_IDLE_GROUPS` per route), else close it."""
        with self._lock:
            idle = self._idle_groups.setdefault(source.token_url, [])
            if token.fresh() and len(idle) < _IDLE_GROUPS:
                idle.append((group, token))
                return
        _abort(group)

    def fell_back(self, entry: RemoteEntry, exc: BaseException) -> None:
        """Record a failure of the Xet path: logged once per mount (at WARNING, then at DEBUG); the path is
        skipped for a while."""
        with self._lock:
            first, self._warned = not self._warned, True
            self._paused_until = time.monotonic() + _PAUSE_AFTER_FAILURE
        level = logging.WARNING if first else logging.DEBUG
        logger.log(level, "xet path failed (%s); fetching over HTTP Range instead (logged once)", exc)


class XetFileReader:
    """Byte ranges of one file from the Xet CAS, for the scheduler's workers (its `ReadRange`).

    One hf_xet stream group per transfer, taken by the first range read: its `abort()` is the only way
    to stop a stream that another thread is iterating (a stream's own `cancel()` fails while it is being
    iterated), so `close()` (the transfer ended, failed or was abandoned) stops exactly this file's
    streams, and a stalled CAS never holds a worker past it. A transfer whose every read ended at its
    end hands the group back to the downloader for the next transfer instead.
    """

    def __init__(self, downloader: XetDownloader, source: XetSource, entry: RemoteEntry):
        self._downloader = downloader
        self._source = source
        self._entry = entry
        self._lock = threading.Lock()
        self._group: Any = None
        self._token: _Token | None = None
        self._closed = False
        self._reading = 0  # reads in flight
        self._clean = True  # every read so far ended at its end

    def _stream_group(self, deadline: float) -> Any:
        """The transfer's stream group, taken by the first caller. The token request and the group's
        creation run outside `_lock`, so `close()` never waits on the network; a group taken by a caller
        that lost the race (or after `close()`) is aborted."""
        with self._lock:
            if self._closed:
                raise RemoteUnavailable(f"{self._entry.path}: xet transfer stopped")
            if self._group is not None:
                return self._group
        group, token = self._downloader.take_group(self._source, deadline)
        with self._lock:
            if self._group is None and not self._closed:
                self._group, self._token = group, token
                return group
            kept, closed = self._group, self._closed
        _abort(group)
        if closed:
            raise RemoteUnavailable(f"{self._entry.path}: xet transfer stopped")
        return kept

    def read(self, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float) -> None:
        """Stream bytes [start, end) to `sink(offset, data)` in order.

        Ends early (the scheduler resumes or fails the piece) when the group is aborted; hf_xet retries
        transient CAS failures itself, and the scheduler's progress deadline bounds a stall (then the
        transfer is closed, which aborts the group). `deadline` bounds the token request (with the mount's
        `--timeout`); the CAS reads have no timeout of their own to set. Any hf_xet error is an
        HffsError, which makes the store fall back to HTTP.
        """
        hf_xet = hf_xet_module()
        pos = start
        with self._lock:
            self._reading += 1
        try:
            deadline = min(deadline, time.monotonic() + self._downloader.operation_timeout)
            stream = self._stream_group(deadline).download_stream(
                hf_xet.XetFileInfo(self._source.file_hash, self._entry.size), start, end
            )
            count_xet_stream()  # one reconstruction request to the CAS (status counters.xet_requests)
            for data in stream:
                if pos + len(data) > end:
                    raise HffsError(f"{self._entry.path}: xet stream sent bytes past {end}")
                sink(pos, data)
                pos += len(data)
        except HffsError:
            raise
        except Exception as exc:  # hf_xet's own errors (RuntimeError, XetObjectNotFoundError, ...)
            raise HffsError(f"{self._entry.path}: xet download failed: {exc}") from exc
        finally:
            with self._lock:
                self._reading -= 1
                self._clean = self._clean and pos == end

    def close(self) -> None:
        """The transfer is over: hand the group back if every read ended at its end, else stop any stream
        still running (a no-op once they all ended)."""
        with self._lock:
            self._closed = True
            group, self._group = self._group, None
            reusable = self._clean and self._reading == 0 and self._token is not None
        if group is None:
            return
        if reusable:
            self._downloader.give_back_group(self._source, group, self._token)  # type: ignore[arg-type]
        else:
            _abort(group)


def _abort(group: Any) -> None:
    try:
        group.abort()
    except Exception:  # already finished or failed: nothing more to stop
        pass
