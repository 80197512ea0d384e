"""What every remote offers: a handful of methods over a tree of files, fsspec-style."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

_MAX_NAME_BYTES = 255  # NAME_MAX on Linux
_GIT_OID = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_git_oid(value: object) -> bool:
    """True for a git object or commit id as the Hub writes it: 40 lowercase hex digits."""
    return isinstance(value, str) and _GIT_OID.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    """True for an LFS sha256 or a xet hash as the Hub writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


# One file of 1 PiB or more cannot be real: a listing or event that says so is broken or hostile, and
# trusting it would only make the blob store fail (or evict) for nothing.
MAX_FILE_SIZE = 1 << 50


def checked_size(value: object) -> int:
    """A file size from a listing or the event feed: an integer in [0, 2^50), else ValueError."""
    if type(value) is not int or not 0 <= value < MAX_FILE_SIZE:  # bool is an int subclass: excluded
        raise ValueError(f"impossible size {str(value)[:80]!r}")
    return value


XET = "xet"  # Digest algo of bucket files: hashed from the complete file (see store/verify.py)


@dataclass(frozen=True)
class Digest:
    """A content hash the downloaded bytes must match: `algo` is "sha256", "git-sha1" or "xet"."""

    algo: str
    hexdigest: str


@dataclass(frozen=True)
class RemoteEntry:
    """One file or directory of a remote, at the remote's pinned state."""

    path: str  # relative, "/"-separated, validated by `is_safe_path`
    is_dir: bool
    size: int = 0
    # Content identity: the blob-store key (git sha1, LFS sha256 or xet hash).
    content_id: str | None = None
    # What the bytes can be verified against, when the remote gives a verifiable hash.
    digest: Digest | None = None
    mtime: float | None = None
    lfs: bool = False
    git_oid: str | None = None  # the git object id (for LFS files: of the pointer), Hub repos only
    xet_hash: str | None = None  # set when the file can also be reconstructed from the Xet CAS (remote/xet.py)
    commit: str | None = None  # the repo commit it was listed at (remote/repo.py): fetched from that commit

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def is_safe_path(path: object) -> bool:
    """True if a remote path can be shown inside a mount without escaping it.

    Rejects absolute paths, `.`/`..`/empty components, NUL and other control characters, names that
    are not valid UTF-8 (a lone surrogate is legal in JSON) and names longer than the kernel accepts.
    """
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return False
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in part):
            return False
        if len(part.encode("utf-8")) > _MAX_NAME_BYTES:
            return False
    return True


def drop_unsafe(entries: list[RemoteEntry], source: str) -> list[RemoteEntry]:
    """Keep the entries whose paths are safe; log each one dropped (the rest stays served)."""
    kept = []
    for entry in entries:
        if is_safe_path(entry.path):
            kept.append(entry)
        else:
            logger.warning("%s: ignoring remote entry with an unsafe name: %r", source, entry.path)
    return kept


_MAX_DROPPED = 10_000  # dropped entries remembered (to log each once); beyond, the memory starts over


class DropLog:
    """Logs each listing item left out once per path and reason: listings reload every TTL."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, what: str, path: str, exc: ValueError) -> None:
        key = (path, str(exc))
        if key in self._seen:
            return
        if len(self._seen) >= _MAX_DROPPED:
            self._seen.clear()
        self._seen.add(key)
        logger.warning("%s: ignoring %r: %s", what, path, exc)


def direct_children(
    items: Iterable[dict], parent: str, make: Callable[[dict], RemoteEntry], what: str, drop: DropLog
) -> list[RemoteEntry]:
    """The entries of listing `items` that are direct children of remote directory `parent` (full path,
    "" for the root): unsafe names and items `make` refuses (ValueError) are left out and logged.

    Whole-component prefix match, whatever the server does: `foo` never lists `foo.sample`. A file and a
    directory with one name cannot both exist in a filesystem: the directory (which may hold a whole
    module) wins, deterministically.
    """
    start = parent + "/" if parent else ""
    by_name: dict[str, RemoteEntry] = {}
    for item in items:
        item_path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(item_path, str) or not is_safe_path(item_path):
            logger.warning("%s: ignoring remote entry with an unsafe name: %r", what, item_path)
            continue
        if not item_path.startswith(start) or "/" in item_path[len(start) :]:
            continue
        try:
            entry = make(item)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            drop(what, item_path, exc if isinstance(exc, ValueError) else ValueError(f"malformed item ({exc})"))
            continue
        other = by_name.get(entry.name)
        if other is not None and other.is_dir != entry.is_dir:
            logger.warning("%s: %r is both a file and a directory; showing the directory", what, item_path)
            if other.is_dir:
                continue
        by_name[entry.name] = entry
    return list(by_name.values())


class Remote(Protocol):
    """A read-only tree of files (a Hub repo at a commit, or a Storage Bucket)."""

    #: Stable identity of the remote for metadata-cache keys (never contains a token).
    cache_namespace: str

    def list(self, path: str) -> list[RemoteEntry]:
        """Direct children of directory `path` ("" is the root). Raises RemoteNotFound."""
        ...

    def stat(self, path: str) -> RemoteEntry:
        """The entry at `path`. Raises RemoteNotFound."""
        ...

    def download_url(self, entry: RemoteEntry) -> str:
        """An absolute URL whose GET (with Range) returns the entry's bytes."""
        ...

    def read_range(
        self, entry: RemoteEntry, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float
    ) -> None:
        """Stream bytes [start, end) of `entry` to `sink(offset, data)` before `deadline` (monotonic)."""
        ...

    def xet_token_url(self) -> str:
        """The Hub route that gives a Xet read token for this remote's files (see remote/xet.py)."""
        ...
