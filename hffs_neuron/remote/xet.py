"""The Xet path: a second way for a remote to fill a blob, beside HTTP Range (remote/http.py).

A file the Hub lists with a xet hash is reconstructed from the Xet CAS by `hf_xet`, as `hf_hub_download`
does (huggingface_hub's `xet_get`): the same token route and connection-info cache
(`refresh_xet_connection_info`), the same token refresh. Unlike `hf_hub_download`, the mount takes the
bytes from hf_xet's ordered byte streams (`XetDownloadStreamGroup.download_stream(start, end)`) and
writes them itself: a Xet transfer is then a transfer like any other for the store's scheduler (one
connection budget, foreground before read-ahead, byte ranges over several connections, progress
deadlines) and its bytes reach the verifying hash in order while they arrive, instead of a second pass
over the finished file.

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
from typing import Any

from .. import constants
from ..errors import HffsError, RemoteUnavailable
from .base import RemoteEntry

logger = logging.getLogger(__name__)

# After a failure the Xet path is skipped for this long (seconds): a broken CAS costs one file's deadline,
# not every file's.
_PAUSE_AFTER_FAILURE = 60.0
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


class XetDownloader:
    """Reads byte ranges of files from the Xet CAS with the mount's identity; one per daemon."""

    def __init__(self, headers: dict[str, str], *, max_connections: int):
        self._headers = dict(headers)  # the Hub's auth headers: sent to the token route only
        self._cas_headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        self._max_connections = max_connections
        self._session: Any = None
        self._lock = threading.Lock()
        self._warned = False
        self._paused_until = 0.0

    def _get_session(self) -> Any:
        with self._lock:
            if self._session is None:
                hf_xet = hf_xet_module()
                n = max(1, self._max_connections)
                config = hf_xet.XetConfig().with_config(
                    {"client.ac_max_download_concurrency": n, "client.ac_initial_download_concurrency": n}
                )
                self._session = _keeping_sigint(lambda: hf_xet.XetSession(config))
            return self._session

    def source(self, remote: object, entry: RemoteEntry) -> XetSource | None:
        """The Xet source of `entry` if it has a xet hash and its remote a token route, else None."""
        token_url = getattr(remote, "xet_token_url", None)
        if not entry.xet_hash or token_url is None or entry.size == 0 or time.monotonic() < self._paused_until:
            return None
        return XetSource(entry.xet_hash, token_url())

    def reader(self, source: XetSource, entry: RemoteEntry) -> XetFileReader:
        """A reader of `entry`'s byte ranges for one transfer; `close()` it when the transfer ends."""
        return XetFileReader(self, source, entry)

    def _new_group(self, source: XetSource) -> Any:
        from huggingface_hub.utils._xet import XetFileData, refresh_xet_connection_info

        info = refresh_xet_connection_info(
            file_data=XetFileData(source.file_hash, source.token_url), headers=self._headers
        )
        return self._get_session().new_download_stream_group(
            endpoint=info.endpoint,
            token=info.access_token,
            token_expiry_unix_secs=info.expiration_unix_epoch,
            token_refresh_url=source.token_url,
            token_refresh_headers=self._headers,
            custom_headers=self._cas_headers,
        )

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

    One hf_xet stream group per transfer, opened by the first range read: its `abort()` is the only way
    to stop a stream that another thread is iterating, so `close()` (the transfer ended, failed or was
    abandoned) stops exactly this file's streams, and a stalled CAS never holds a worker past it.
    """

    def __init__(self, downloader: XetDownloader, source: XetSource, entry: RemoteEntry):
        self._downloader = downloader
        self._source = source
        self._entry = entry
        self._lock = threading.Lock()
        self._group: Any = None
        self._closed = False

    def _stream_group(self) -> Any:
        with self._lock:
            if self._group is None and not self._closed:
                self._group = self._downloader._new_group(self._source)
            if self._closed:
                raise RemoteUnavailable(f"{self._entry.path}: xet transfer stopped")
            return self._group

    def read(self, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float) -> None:
        """Stream bytes [start, end) to `sink(offset, data)` in order.

        Ends early (the scheduler resumes or fails the piece) when the group is aborted; hf_xet retries
        transient CAS failures itself, and the scheduler's progress deadline bounds a stall (then the
        transfer is closed, which aborts the group). `deadline` is not used: a xet read has no timeout
        of its own to set. Any hf_xet error is an HffsError, which makes the store fall back to HTTP.
        """
        hf_xet = hf_xet_module()
        try:
            stream = self._stream_group().download_stream(
                hf_xet.XetFileInfo(self._source.file_hash, self._entry.size), start, end
            )
            pos = start
            for data in stream:
                if pos + len(data) > end:
                    raise HffsError(f"{self._entry.path}: xet stream sent bytes past {end}")
                sink(pos, data)
                pos += len(data)
        except HffsError:
            raise
        except Exception as exc:  # hf_xet's own errors (RuntimeError, XetObjectNotFoundError, ...)
            raise HffsError(f"{self._entry.path}: xet download failed: {exc}") from exc

    def close(self) -> None:
        """The transfer is over: stop any stream still running (a no-op once they all ended)."""
        with self._lock:
            self._closed = True
            group, self._group = self._group, None
        if group is not None:
            try:
                group.abort()
            except Exception:  # already finished or failed: nothing more to stop
                pass
