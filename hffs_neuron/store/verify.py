"""Verification of a completed download against the digest its remote gave, before it becomes a blob.

Hashes that can be fed byte by byte (sha256, git-sha1) are computed while the bytes arrive and only
compared here; a xet hash (Storage Bucket files) is a hash of the file's chunk tree, so the complete
temp file is hashed once, by path, with the same code the Hub client uses (`hf_xet.hash_files`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from ..errors import IntegrityError
from ..remote.base import XET, RemoteEntry
from ..remote.xet import hf_xet_module

# How often `beat` is called while a file is hashed (seconds).
_BEAT_EVERY = 0.25


def xet_hash(path: str | os.PathLike) -> str:
    """The xet hash of a local file, as the Hub lists it (`xetHash`)."""
    return hf_xet_module().hash_files([os.fspath(path)])[0].hash


def verify_download(
    path: str | os.PathLike, entry: RemoteEntry, streamed: str | None, beat: Callable[[], None]
) -> None:
    """Raise IntegrityError unless the complete file at `path` matches `entry.digest`.

    `streamed` is the hex digest computed during the transfer (None for xet, hashed here from the file,
    with `beat()` called every 0.25 s meanwhile: threads waiting for this one can tell it is alive).
    """
    digest = entry.digest
    if digest is None:
        return
    actual = _beating(lambda: xet_hash(path), beat) if digest.algo == XET else streamed
    if actual != digest.hexdigest:
        raise IntegrityError(f"{entry.path}: content does not match its {digest.algo} hash; discarded")


def _beating(work: Callable[[], str], beat: Callable[[], None]) -> str:
    """`work()` on a helper thread (hf_xet's hash is one blocking call), `beat()` here until it is done."""
    result: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="hffs-verify", daemon=True)
    thread.start()
    while thread.is_alive():
        beat()
        thread.join(_BEAT_EVERY)
    if errors:
        raise errors[0]
    return result[0]
