"""The Xet path: a second way for a remote to fill a blob, beside HTTP Range (remote/http.py).

A file the Hub lists with a xet hash can be reconstructed by `hf_xet` from the Xet CAS, as
`hf_hub_download` does (huggingface_hub's `xet_get`): the same token route and connection-info cache
(`refresh_xet_connection_info`), the same download group. The store asks for it first and falls back
to HTTP Range on any failure (logged once per mount); the file it fills is the store's private temp file,
verified and renamed by the store, so a blob is never half from each path.

`hf_xet` runs its own threads: a call is driven from a worker thread and watched from the caller's,
which abandons it (aborting its group) when no byte arrived for `timeout` seconds.
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

_POLL = 0.05
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class XetSource:
    """Where a file's Xet reconstruction comes from: its hash and the remote's read-token route."""

    file_hash: str
    token_url: str


class XetDownloader:
    """Fills files from the Xet CAS with the mount's identity; one per daemon."""

    def __init__(self, headers: dict[str, str], *, max_connections: int, timeout: float):
        self._headers = dict(headers)  # the Hub's auth headers: sent to the token route only
        self._cas_headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        self._max_connections = max_connections
        self.timeout = timeout
        self._session: Any = None
        self._lock = threading.Lock()
        self._warned = False
        self._paused_until = 0.0

    def _get_session(self) -> Any:
        with self._lock:
            if self._session is None:
                hf_xet = hf_xet_module()
                config = hf_xet.XetConfig().with_config(
                    "client.ac_max_download_concurrency", max(1, self._max_connections)
                )
                self._session = _keeping_sigint(lambda: hf_xet.XetSession(config))
            return self._session

    def source(self, remote: object, entry: RemoteEntry) -> XetSource | None:
        """The Xet source of `entry` if it has a xet hash and its remote a token route, else None."""
        token_url = getattr(remote, "xet_token_url", None)
        if not entry.xet_hash or token_url is None or entry.size == 0 or time.monotonic() < self._paused_until:
            return None
        return XetSource(entry.xet_hash, token_url())

    def fill(self, source: XetSource, entry: RemoteEntry, path: str, progress: Callable[[int], None]) -> None:
        """Reconstruct `entry` into the existing file `path`; `progress(bytes_done)` is called as it grows.

        Raises RemoteUnavailable when no byte arrived for `timeout` seconds (the call is abandoned) and
        HffsError for any other failure.
        """
        done = threading.Event()
        state: dict[str, Any] = {}

        def run() -> None:
            try:
                from huggingface_hub.utils._xet import XetFileData, refresh_xet_connection_info

                hf_xet = hf_xet_module()
                info = refresh_xet_connection_info(
                    file_data=XetFileData(source.file_hash, source.token_url), headers=self._headers
                )
                group = self._get_session().new_file_download_group(
                    endpoint=info.endpoint,
                    token=info.access_token,
                    token_expiry_unix_secs=info.expiration_unix_epoch,
                    token_refresh_url=source.token_url,
                    token_refresh_headers=self._headers,
                    custom_headers=self._cas_headers,
                )
                state["group"] = group
                state["handle"] = group.start_download_file(hf_xet.XetFileInfo(source.file_hash, entry.size), path)
                if state.get("abandoned"):  # the caller gave up while this thread was still starting
                    group.abort()
                    _unlink(path)  # the caller's temp file is gone: never leave a new one behind
                    return
                group.wait_to_finish()  # drives the download (a handle alone is not polled forward)
            except BaseException as exc:  # reported to the waiting caller
                state["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"xet {entry.name}", daemon=True).start()
        last, since = -1, time.monotonic()
        while not done.wait(_POLL):
            handle = state.get("handle")
            report = handle.progress() if handle is not None else None
            current = report.bytes_completed if report is not None else 0
            now = time.monotonic()
            if current != last:
                last, since = current, now
                progress(current)
            elif now - since > self.timeout:
                state["abandoned"] = True
                group = state.get("group")
                if group is not None:
                    try:
                        group.abort()
                    except Exception:  # already failed or finished: nothing more to stop
                        pass
                raise RemoteUnavailable(f"{entry.path}: xet download made no progress for {self.timeout:.0f}s")
        error = state.get("error")
        if error is not None:
            raise HffsError(f"{entry.path}: xet download failed: {error}") from error
        progress(entry.size)

    def fell_back(self, entry: RemoteEntry, exc: BaseException) -> None:
        """Record a failure of the Xet path: logged once per mount (at WARNING, then at DEBUG); the path is
        skipped for a while."""
        with self._lock:
            first, self._warned = not self._warned, True
            self._paused_until = time.monotonic() + _PAUSE_AFTER_FAILURE
        level = logging.WARNING if first else logging.DEBUG
        logger.log(level, "xet path failed (%s); fetching over HTTP Range instead (logged once)", exc)
