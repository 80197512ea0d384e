"""Write events of a merged view's local layer, for whoever must react to them (the NEFF publisher).

A mixin placed before `MergedView` in a view's bases: after a file written through the view is closed,
a rename, or an unlink (a compiler removing its lock, or the daemon a stale one), it calls
`on_change(path)` with the mount-relative path. Nothing is reported while `on_change` is None.

It also knows which local files are open for writing right now (by device and inode, so a rename does
not lose track): a module with such a file is still being written and must not be published.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable

from .creators import Caller, Creator
from .merged import _WRITE_FLAGS, FileHandle


class LayerEvents:
    #: Set by the daemon; called from FUSE worker threads, so it must return quickly.
    on_change: Callable[[str], None] | None = None

    _writing: Counter | None = None  # (st_dev, st_ino) -> write handles open on it
    _writing_lock = threading.Lock()

    def create(self, path: str, flags: int, mode: int, caller: Caller | None = None) -> FileHandle:
        handle = super().create(path, flags, mode, caller)  # type: ignore[misc]
        return self._report_on_close(path, self._track_writer(handle))

    def open(self, path: str, flags: int, caller: Caller | None = None) -> FileHandle:
        handle = super().open(path, flags, caller)  # type: ignore[misc]
        return self._report_on_close(path, self._track_writer(handle)) if flags & _WRITE_FLAGS else handle

    def writing(self) -> frozenset[tuple[int, int]]:
        """(st_dev, st_ino) of the local files open for writing through the view now."""
        with self._writing_lock:
            return frozenset(self._writing or ())

    def _track_writer(self, handle: FileHandle) -> FileHandle:
        if handle.fd < 0:
            return handle
        st = os.fstat(handle.fd)
        key = (st.st_dev, st.st_ino)
        with self._writing_lock:
            if self._writing is None:
                self._writing = Counter()
            self._writing[key] += 1
        previous = handle.on_release

        def released() -> None:
            with self._writing_lock:
                self._writing[key] -= 1
                if self._writing[key] <= 0:
                    del self._writing[key]
            if previous is not None:
                previous()

        handle.on_release = released
        return handle

    def rename(self, old: str, new: str, caller: Caller | None = None, *, noreplace: bool = False) -> None:
        super().rename(old, new, caller, noreplace=noreplace)  # type: ignore[misc]
        self._report(old)
        self._report(new)

    def unlink(self, path: str, caller: Caller | None = None) -> None:
        super().unlink(path, caller)  # type: ignore[misc]
        self._report(path)

    def remove_stale(self, path: str, creator: Creator) -> bool:
        removed = super().remove_stale(path, creator)  # type: ignore[misc]
        if removed:
            self._report(path)  # a lock gone: its module may be complete now
        return removed

    def _report(self, path: str) -> None:
        if self.on_change is not None:
            self.on_change(path)

    def _report_on_close(self, path: str, handle: FileHandle) -> FileHandle:
        if self.on_change is None:
            return handle
        previous = handle.on_release

        def released() -> None:
            if previous is not None:
                previous()
            self._report(path)

        handle.on_release = released
        return handle
