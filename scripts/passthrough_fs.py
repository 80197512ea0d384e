#!/usr/bin/env python3
"""A do-nothing FUSE filesystem on the project's FUSE binding: the floor of the stack (bench row `floor`).

    .venv/bin/python scripts/passthrough_fs.py SOURCE_DIR MOUNTPOINT   # serves until fusermount3 -u MOUNTPOINT

It mirrors SOURCE_DIR through mfusepy over libfuse's high-level API with the kernel settings the daemon
uses (entry and attribute timeouts 60 s, "not found" 1 s, symlink targets kept by the kernel,
`default_permissions`, 64 workers, no `flush`) and nothing else: no views, no creator records, no
locks, no remote. What a compile storm or a snapshot walk costs through it, any filesystem written on
this binding pays as well; `scripts/bench.py --rows floor` puts it beside the mount and a local
directory. A bench tool only: it trusts the kernel's permission checks and nothing more.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402  (after FUSE_LIBRARY_NAME, which it reads on import)

_CACHE_SYMLINKS = 1 << 23  # FUSE_CAP_CACHE_SYMLINKS, as hffs_neuron/fuse_ops.py asks for it
_STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
_STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")


class Passthrough(mfusepy.Operations):
    """Every call is the same system call on SOURCE_DIR + path; mfusepy turns an OSError into -errno."""

    use_ns = True

    def __init__(self, source: str):
        self.source = source

    def _at(self, path: str) -> str:
        return self.source + path

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.attr_timeout = config.entry_timeout = 60.0
            config.negative_timeout = 1.0
        if conn is not None:
            conn.want |= conn.capable & _CACHE_SYMLINKS

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        st = os.lstat(self._at(path))
        attrs = {name.removesuffix("_ns"): getattr(st, name) for name in _STAT_FIELDS}
        attrs["st_ino"] = st.st_ino
        return attrs

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._at(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._at(path))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._at(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._at(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._at(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._at(target))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._at(old), self._at(new))

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._at(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._at(path), flags & ~os.O_CREAT)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        os.truncate(self._at(path), length)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._at(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._at(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._at(path))
        else:
            os.utime(self._at(path), ns=times)

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._at(path))
        return {name: getattr(st, name) for name in _STATVFS_FIELDS}


def main() -> int:
    if len(sys.argv) != 3 or not os.path.isdir(sys.argv[1]):
        print("usage: passthrough_fs.py SOURCE_DIR MOUNTPOINT (SOURCE_DIR must be a directory)", file=sys.stderr)
        return 2
    source, mountpoint = os.path.abspath(sys.argv[1]), sys.argv[2]
    mfusepy.FUSE(
        Passthrough(source), mountpoint, foreground=True, default_permissions=True, hard_remove=True, max_threads=64
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
