"""Verification of a completed download against the digest its remote gave, before it becomes a blob.

Hashes that can be fed byte by byte (sha256, git-sha1) are computed while the bytes arrive and only
compared here; a xet hash (Storage Bucket files) is a hash of the file's chunk tree, so the complete
temp file is hashed once, by path, with the same code the Hub client uses (`hf_xet.hash_files`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Any

from ..errors import IntegrityError
from ..remote.base import XET, RemoteEntry

_xet_lock = threading.Lock()
_xet: Any = None


def _hf_xet() -> Any:
    """hf_xet, its runtime started with the process's SIGINT action kept.

    Starting its runtime replaces the SIGINT action with its own, once, from whichever thread: in a FUSE
    worker that would take Ctrl-C from libfuse, and `mount --foreground` would no longer exit on it.
    """
    global _xet
    with _xet_lock:
        if _xet is None:
            import hf_xet  # comes with huggingface_hub; imported here so other paths never pay for it

            libc = ctypes.CDLL(None, use_errno=True)
            action = ctypes.create_string_buffer(256)  # an opaque struct sigaction (152 bytes on x86-64)
            if libc.sigaction(signal.SIGINT, None, action) != 0:
                raise OSError(ctypes.get_errno(), "sigaction")
            try:
                hf_xet.hash_files([])  # starts the runtime, which installs its handler
            finally:
                libc.sigaction(signal.SIGINT, action, None)
            _xet = hf_xet
    return _xet


def xet_hash(path: str | os.PathLike) -> str:
    """The xet hash of a local file, as the Hub lists it (`xetHash`)."""
    return _hf_xet().hash_files([os.fspath(path)])[0].hash


def verify_download(path: str | os.PathLike, entry: RemoteEntry, streamed: str | None) -> None:
    """Raise IntegrityError unless the complete file at `path` matches `entry.digest`.

    `streamed` is the hex digest computed during the transfer (None for xet, hashed here from the file).
    """
    digest = entry.digest
    if digest is None:
        return
    actual = xet_hash(path) if digest.algo == XET else streamed
    if actual != digest.hexdigest:
        raise IntegrityError(f"{entry.path}: content does not match its {digest.algo} hash; discarded")
