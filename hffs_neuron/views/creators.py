"""Who created each entry of a local layer (uid, pid and the pid's start time), and who else wrote it.

Writers are recorded only when they are not the mount's owner or root (see `CreatorLog.note_writer`):
publish trust (`publish.Checks.untrusted`) needs to know whether anyone else ever wrote a file or touched a
module, and the owner's own writes, by far the most, then cost nothing.

The record lives in the layer state as an append-only log (one JSON line per change, file mode 0600),
compacted when the view starts, so a create costs one short append and never a rewrite of the whole
record. Stale-lock tracking reads it: a `*.lock` whose creator (pid, start time) is gone is stale.
A pid of 0 (a caller in another pid namespace) is an unknown creator.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

from cachetools import TTLCache

from ..proc import pid_alive, pid_start_time, thread_group_id
from .localfs import LocalTree

logger = logging.getLogger(__name__)

# Compact when the log holds this many more lines than twice the live records (at start, and while
# running: lock files created and removed all day must not grow it without bound).
_COMPACT_SLACK = 10_000


@dataclass(frozen=True)
class Caller:
    """The process a filesystem request comes from (FUSE request context)."""

    uid: int
    gid: int
    pid: int = 0


@dataclass(frozen=True)
class Creator:
    uid: int
    pid: int  # 0: unknown (another pid namespace)
    start: int  # /proc/<pid>/stat field 22; 0 when unknown

    @classmethod
    def of(cls, caller: Caller) -> Creator:
        """The creator of an entry `caller` makes: the caller's process, not its thread (FUSE gives the
        thread's id; a worker thread that took a lock may exit while its process goes on)."""
        process = _PROCESSES.get(caller.pid)
        if process is None:
            tgid = thread_group_id(caller.pid)
            process = _PROCESSES[caller.pid] = (tgid, pid_start_time(tgid))
        return cls(caller.uid, *process)


# A compiler creates several files in a row: its thread's process and that process's start time are
# read once. Keyed by thread id; entries live one second: an id is reused only after the kernel has
# cycled through the whole pid space. Not thread-safe: used under CreatorLog's lock.
_PROCESSES: TTLCache = TTLCache(maxsize=1024, ttl=1.0)


def creator_alive(creator: Creator) -> bool | None:
    """Is the process that created an entry still running? None: unknown (another pid namespace, or no
    start time recorded). A reused pid has another start time: the creator is gone."""
    if creator.pid <= 0 or creator.start <= 0:
        return None
    return pid_alive(creator.pid) and pid_start_time(creator.pid) == creator.start


class CreatorLog:
    """{layer path: Creator} for the local entries clients created, persisted in `tree`/`name`."""

    def __init__(self, tree: LocalTree, name: str = "creators.jsonl", *, read_only: bool = False):
        """`read_only`: a snapshot for another process (`mountctl push`), never written."""
        self._tree = tree
        self._name = name
        self._lock = threading.Lock()
        self._records: dict[str, Creator] = {}
        self._writers: dict[str, frozenset[int]] = {}  # path -> uids other than owner and root that wrote it
        self._lines = self._load()
        self._fd = -1
        if read_only:
            return
        if self._lines == 0 or self._too_long():
            self._compact()
        else:
            self._fd = tree.open(name, os.O_WRONLY | os.O_APPEND, 0o600)

    def _too_long(self) -> bool:
        return self._lines > 2 * (len(self._records) + len(self._writers)) + _COMPACT_SLACK

    def _load(self) -> int:
        try:
            fd = self._tree.open(self._name, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        lines = 0
        with os.fdopen(fd, "rb") as f:
            for line in f:
                lines += 1
                try:
                    op, path, *rest = json.loads(line)
                except ValueError:  # a torn last line after a crash
                    continue
                if op == "+":
                    self._records[path] = Creator(*rest)
                elif op == "w":
                    self._writers[path] = self._writers.get(path, frozenset()) | {int(rest[0])}
                elif op == "-":
                    self._records.pop(path, None)
                    self._writers.pop(path, None)
        return lines

    def _compact(self) -> None:
        """Rewrite the log as one line per live record (the caller holds the lock, or is __init__)."""
        tmp = f"{self._name}.tmp"
        fd = self._tree.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for path, c in self._records.items():
                f.write(json.dumps(["+", path, c.uid, c.pid, c.start]) + "\n")
            for path, uids in self._writers.items():
                f.writelines(json.dumps(["w", path, uid]) + "\n" for uid in sorted(uids))
        self._tree.rename(tmp, self._name)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._tree.open(self._name, os.O_WRONLY | os.O_APPEND, 0o600)
        self._lines = len(self._records) + sum(len(u) for u in self._writers.values())

    def _append(self, *items: list) -> None:
        data = "".join(json.dumps(item) + "\n" for item in items).encode()
        try:
            os.write(self._fd, data)
            self._lines += len(items)
            if self._too_long():
                self._compact()
        except OSError as exc:  # a full disk must not fail the client's create
            logger.warning("could not record a creator: %s", exc)

    def get(self, path: str) -> Creator | None:
        with self._lock:
            return self._records.get(path)

    def matching(self, suffix: str) -> dict[str, Creator]:
        """A snapshot of the records whose path ends with `suffix` (e.g. the `*.lock` files)."""
        with self._lock:
            return {p: c for p, c in self._records.items() if p.endswith(suffix)}

    def writers(self, path: str) -> frozenset[int]:
        """The uids other than the owner's and root that wrote `path` (or, for a directory, in it)."""
        with self._lock:
            return self._writers.get(path, frozenset())

    def note_writer(self, paths: tuple[str, ...], uid: int) -> None:
        """`uid` wrote (or created, renamed, removed) `paths`; recorded once per path and uid."""
        with self._lock:
            new = [p for p in paths if uid not in self._writers.get(p, ())]
            for path in new:
                self._writers[path] = self._writers.get(path, frozenset()) | {uid}
            if new:
                self._append(*(["w", p, uid] for p in new))

    def record(self, path: str, caller: Caller) -> None:
        with self._lock:
            creator = Creator.of(caller)
            self._records[path] = creator
            self._append(["+", path, creator.uid, creator.pid, creator.start])

    def forget(self, path: str) -> None:
        with self._lock:
            had_writers = self._writers.pop(path, None) is not None
            if self._records.pop(path, None) is not None or had_writers:
                self._append(["-", path])

    def move(self, old: str, new: str) -> None:
        """`old` (and everything below it) was renamed to `new`."""
        prefix = f"{old}/"
        with self._lock:
            items: list[list] = []
            known = self._records.keys() | self._writers.keys()
            for path in [p for p in known if p == new or p.startswith(f"{new}/")]:
                self._records.pop(path, None)
                self._writers.pop(path, None)
                items.append(["-", path])
            for path in [p for p in known if p == old or p.startswith(prefix)]:
                moved = new + path[len(old) :]
                items.append(["-", path])
                if (c := self._records.pop(path, None)) is not None:
                    self._records[moved] = c
                    items.append(["+", moved, c.uid, c.pid, c.start])
                if (uids := self._writers.pop(path, None)) is not None:
                    self._writers[moved] = uids
                    items += [["w", moved, uid] for uid in sorted(uids)]
            if items:
                self._append(*items)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
