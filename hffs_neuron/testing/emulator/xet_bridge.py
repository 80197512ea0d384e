"""Files placed in the emulator (repo blobs, bucket files) seen as Xet files.

Their Xet hashes come from ``hf_xet.hash_files`` (computed once per file version). Their content
reaches the CAS lazily, the first time a client asks for a reconstruction: the real ``hf_xet``
uploads the file to the emulator's own CAS, so no chunker or xorb writer lives here. Bucket writes
go the other way: :meth:`XetBridge.materialize` downloads a CAS file with ``hf_xet`` into the
bucket's directory.

The bridge's own CAS requests carry :data:`INTERNAL_HEADER`: the server serves them without
faults, network simulation or accounting, so tests see only their clients' traffic.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from hffs_neuron.testing.emulator.protocol import EmulatorHub

logger = logging.getLogger(__name__)

INTERNAL_HEADER = "X-Emulator-Internal"
#: The Xet hash of an empty file (it has no chunks and is never uploaded).
EMPTY_HASH = "0" * 64
_BRIDGE_TOKEN_TTL_S = 3600.0
#: Xet hashes remembered per file version and per hash source; beyond this the oldest are forgotten.
_MAX_ENTRIES = 100_000


class XetBridge:
    """Xet hashes of local files and their lazy upload to (or download from) the emulator's CAS."""

    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, xet hash)
        self._sources: dict[str, Path] = {}  # xet hash -> a local file with that content
        self._flights: dict[str, threading.Lock] = {}  # xet hash -> lock of its upload
        self._session: Any = None

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()
            self._sources.clear()

    def _xet_session(self) -> Any:
        with self._lock:
            if self._session is None:
                from hf_xet import XetSession

                self._session = XetSession()
            return self._session

    def _auth(self, scope: str) -> dict[str, Any]:
        # Long enough for any conversion: the bridge has no refresh route (unlike real clients).
        grant = self.hub.cas.issue_token(scope, ttl=_BRIDGE_TOKEN_TTL_S)
        return {
            "endpoint": self.hub.url,
            "token": grant["accessToken"],
            "token_expiry_unix_secs": grant["exp"],
            "custom_headers": {INTERNAL_HEADER: "1"},
        }

    # -- hashes ------------------------------------------------------------------------------------

    def hash_of(self, path: Path, st: os.stat_result) -> str:
        """The Xet hash of a local file, computed once per (size, mtime)."""
        with self._lock:
            cached = self._hashes.get(str(path))
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            xet_hash = cached[2]
        else:
            from hf_xet import hash_files

            xet_hash = hash_files([str(path)])[0].hash
        self._record(path, st, xet_hash)
        return xet_hash

    def remember(self, path: Path, xet_hash: str) -> None:
        """Record a file just written with known content (a bucket write), so it is never rehashed."""
        self._record(path, path.stat(), xet_hash)

    def _record(self, path: Path, st: os.stat_result, xet_hash: str) -> None:
        with self._lock:
            if len(self._hashes) >= _MAX_ENTRIES:
                del self._hashes[next(iter(self._hashes))]
            if len(self._sources) >= _MAX_ENTRIES:
                del self._sources[next(iter(self._sources))]
            self._hashes[str(path)] = (st.st_size, st.st_mtime_ns, xet_hash)
            self._sources[xet_hash] = path

    # -- content -----------------------------------------------------------------------------------

    def ensure_uploaded(self, xet_hash: str) -> None:
        """Upload the local file with this hash to the CAS unless the CAS has it (single flight)."""
        if xet_hash == EMPTY_HASH or self.hub.cas.has_file(xet_hash):
            return
        with self._lock:
            source = self._sources.get(xet_hash)
            if source is None:
                return
            flight = self._flights.setdefault(xet_hash, threading.Lock())
        try:
            with flight:
                if self.hub.cas.has_file(xet_hash):
                    return
                with self._xet_session().new_upload_commit(**self._auth("write")) as commit:
                    handle = commit.start_upload_file(str(source))
                uploaded = handle.result().xet_info.hash
                if uploaded != xet_hash:  # the file changed since it was hashed: the request gets a 404
                    logger.warning("%s changed while being converted to xet (%s != %s)", source, uploaded, xet_hash)
        finally:
            with self._lock:
                self._flights.pop(xet_hash, None)

    def convert(self, paths: list[Path]) -> int:
        """Hash ``paths`` and upload, in one commit, those the CAS lacks; return how many were uploaded."""
        missing: dict[str, Path] = {}
        for path in paths:
            xet_hash = self.hash_of(path, path.stat())
            if xet_hash != EMPTY_HASH and not self.hub.cas.has_file(xet_hash):
                missing[xet_hash] = path
        if missing:
            with self._xet_session().new_upload_commit(**self._auth("write")) as commit:
                for path in missing.values():
                    commit.start_upload_file(str(path))
        return len(missing)

    def materialize(self, xet_hash: str, target: Path) -> None:
        """Write the CAS file ``xet_hash`` to ``target`` (tmp file + rename); KeyError if unknown."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.hub.root / "tmp" / f"{xet_hash}.{threading.get_ident()}"
        if xet_hash == EMPTY_HASH:
            tmp.write_bytes(b"")
        else:
            self.ensure_uploaded(xet_hash)  # a copy of a file that was placed, never downloaded
            size = self.hub.cas.file_size(xet_hash)
            if size is None:
                raise KeyError(xet_hash)
            from hf_xet import XetFileInfo

            with self._xet_session().new_file_download_group(**self._auth("read")) as group:
                group.start_download_file(XetFileInfo(xet_hash, size), str(tmp))
        os.replace(tmp, target)
        self.remember(target, xet_hash)
