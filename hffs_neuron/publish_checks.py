"""What judges a local module before it may be published (README "Publishing: what reaches the bucket").

- `TrustedWriters`: whose files may be published (the owner, root, `--publish-from`);
- `HashCache`: xet hashes of local files, kept across restarts, to compare with the bucket's by content;
- `Checks`: the above with the creator record, the files open for writing and the size bound, as
  `publish.publishable_files` uses them.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import constants
from .errors import UsageError
from .proc import HOST
from .remote.base import XET, Digest
from .store.blobstore import new_hasher
from .store.verify import xet_hash
from .views.creators import CreatorLog
from .views.localfs import LocalTree

logger = logging.getLogger(__name__)

# Local xet hashes, cached in the layer state by (device, inode, size, mtime): a restart re-hashes nothing.
_HASHES_FILE = "publish-hashes.jsonl"
_HASHES_MAX = 100_000
_HASHES_SLACK = 1_000  # lines beyond twice the live entries before the log is rewritten


@dataclass(frozen=True)
class TrustedWriters:
    """Whose files may be published: the mount's owner, root, and `--publish-from` users and groups."""

    uids: frozenset[int]
    gids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, owner_uid: int, names: Iterable[str]) -> TrustedWriters:
        """`names`: user names, uids, `@group` names or `@gid`s; UsageError for a name that does not exist.

        Numeric ids are taken as they are: in containers the users compiling are often in no passwd file.
        """
        import grp

        uids, gids = {0, owner_uid}, set()
        for name in names:
            try:
                if name.startswith("@"):
                    key = name[1:]
                    gids.add(int(key) if key.isdigit() else grp.getgrnam(key).gr_gid)
                else:
                    uids.add(int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid)
            except KeyError:
                what = "group" if name.startswith("@") else "user"
                raise UsageError(f"--publish-from {name}: no such {what} on this host") from None
        return cls(frozenset(uids), frozenset(gids))

    def trusts(self, uid: int) -> bool:
        if uid in self.uids:
            return True
        if not self.gids:
            return False
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return not self.gids.isdisjoint(os.getgrouplist(user.pw_name, user.pw_gid))


def _stream_hash(fd: int, digest: Digest, size: int) -> str:
    """The `digest.algo` hash of the file open at `fd` (read with pread: its offset is left alone)."""
    hasher = new_hasher(digest, size)
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


class HashCache:
    """Content hashes of local files by (device, inode, size, mtime_ns), kept in the layer state.

    The record is an append-only log (one JSON line per file hashed; a path's last line wins), rewritten
    only when it has grown to twice its live entries: publishing a module appends a few lines, never a
    rewrite of every module's. The daemon and `push` may both append; a line lost to a concurrent
    rewrite costs one re-hash.
    """

    def __init__(self, state: Path):
        self._path = state / _HASHES_FILE
        self._lock = threading.Lock()
        self._hashes: dict[str, list] = {}
        self._pending: list[str] = []
        self._lines = 0
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(fd) as f:
            for line in f:
                self._lines += 1
                try:
                    key, *entry = json.loads(line)
                except (ValueError, TypeError):  # a torn last line after a crash
                    continue
                if isinstance(key, str) and len(entry) == 5:
                    self._remember(key, entry)

    def _remember(self, key: str, entry: list) -> None:
        self._hashes.pop(key, None)  # re-inserted last: the oldest entries go first when over the bound
        self._hashes[key] = entry
        while len(self._hashes) > _HASHES_MAX:
            del self._hashes[next(iter(self._hashes))]

    def hash_of(self, key: str, fd: int, algo: str = XET) -> str:
        """The `algo` hash ("xet", as buckets list files; "sha256" or "git-sha1", as repos list LFS and
        plain git files) of the file open at `fd`, known by `key` (its path in the layer)."""
        st = os.fstat(fd)
        identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        key = key if algo == XET else f"{algo}:{key}"
        with self._lock:
            known = self._hashes.get(key)
        if known is not None and known[:4] == identity:
            return known[4]
        digest = xet_hash(f"/proc/self/fd/{fd}") if algo == XET else _stream_hash(fd, Digest(algo, ""), st.st_size)
        with self._lock:
            self._remember(key, [*identity, digest])
            self._pending.append(json.dumps([key, *identity, digest]) + "\n")
        return digest

    def save(self) -> None:
        """Persist the hashes computed since the last save."""
        with self._lock:
            lines, self._pending = self._pending, []
            self._lines += len(lines)
            rewrite = self._lines > 2 * len(self._hashes) + _HASHES_SLACK
            if rewrite:
                lines = [json.dumps([key, *entry]) + "\n" for key, entry in self._hashes.items()]
                self._lines = len(lines)
        if not lines:
            return
        target = self._path.with_name(f"{_HASHES_FILE}.{HOST}.{os.getpid()}.tmp") if rewrite else self._path
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if rewrite else os.O_APPEND)
        try:
            fd = os.open(target, flags, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(lines))
            if rewrite:
                os.replace(target, self._path)
        except OSError as exc:  # a cache: losing it costs a re-hash
            logger.warning("could not save the publish hash cache: %s", exc)


@dataclass
class Checks:
    """What judges a module beyond its names: who wrote it, what is open, the bounds, content hashes."""

    creators: CreatorLog
    trust: TrustedWriters | None  # None: everyone (`push --include-untrusted`)
    hashes: HashCache
    writing: Callable[[], frozenset[tuple[int, int]]] = frozenset  # (dev, ino) of files open for writing
    max_bytes: int = constants.PUBLISH_MAX_BYTES

    @classmethod
    def for_layer(cls, upper: Path, trust: TrustedWriters, **kwargs: Any) -> Checks:
        """Checks reading the layer state beside `upper` (its creator record, read-only; its hash cache)."""
        return cls(CreatorLog(LocalTree(str(upper.parent)), read_only=True), trust, HashCache(upper.parent), **kwargs)

    def untrusted(self, module: str, entries: dict[str, os.stat_result]) -> tuple[int, int] | None:
        """(an untrusted uid, how many files it touched) if anyone untrusted created or wrote in `module`.

        An entry without a creator record (made before records existed) is judged by its owner on disk.
        """
        if self.trust is None:
            return None
        bad = [u for u in self.creators.writers(module) if not self.trust.trusts(u)]
        count = 0
        for name, st in entries.items():
            key = f"{module}/{name}"
            creator = self.creators.get(key)
            uids = {creator.uid if creator is not None else st.st_uid, *self.creators.writers(key)}
            untrusted = [u for u in uids if not self.trust.trusts(u)]
            if untrusted:
                count += 1
                bad += untrusted
        return (min(bad), max(count, 1)) if bad else None
