"""Verification of a completed download against the digest its remote gave, before it becomes a blob.

Hashes that can be fed byte by byte (sha256, git-sha1) are computed while the bytes arrive and only
compared here; a xet hash (Storage Bucket files) is a hash of the file's chunk tree, so the complete
temp file is hashed once, by path, with the same code the Hub client uses (`hf_xet.hash_files`).
"""

from __future__ import annotations

import os

from ..errors import IntegrityError
from ..remote.base import XET, RemoteEntry
from ..remote.xet import hf_xet_module


def xet_hash(path: str | os.PathLike) -> str:
    """The xet hash of a local file, as the Hub lists it (`xetHash`)."""
    return hf_xet_module().hash_files([os.fspath(path)])[0].hash


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
