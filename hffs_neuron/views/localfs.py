"""Filesystem access below one root directory that never follows a symlink (issue 12 item 2).

Every path the views open in a NEFF local layer or a hub-cache backing directory goes through a
`LocalTree`: clients can plant symlinks there (directly in a shared backing, or through the mount), and
the daemon, often root, must not follow them. Paths are walked one component at a time from an fd of
the root with `O_NOFOLLOW|O_DIRECTORY`; every operation then acts on the last component relative to
its parent's fd (`*at` calls), so no component is ever resolved through a symlink.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator

_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int) -> None:
    if _libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def _split(rel: str) -> list[str]:
    if rel == "":
        return []
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise ValueError(f"not a clean relative path: {rel!r}")
    return parts


class LocalTree:
    """Filesystem operations on paths relative to one root directory, never following a symlink in
    any component. A symlink met on the way -> OSError(ELOOP); `rel` == "" means the root itself.
    `rel` is "/"-separated, never absolute, no "." / ".." parts (ValueError otherwise)."""

    def __init__(self, root: str | os.PathLike, *, create_mode: int | None = 0o700):
        self.root = os.path.abspath(os.fspath(root))
        if create_mode is not None:
            os.makedirs(self.root, mode=create_mode, exist_ok=True)
        # The root itself is trusted (given by the user or the mount); only what is below it is not.
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- walking --------------------------------------------------------------------------------
    def _open_dir(self, parts: list[str]) -> int:
        """An O_PATH fd of the directory `parts` below the root (caller closes)."""
        fd = os.dup(self._root_fd)
        try:
            for name in parts:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(fd of the parent directory, last component) of a non-root path."""
        parts = _split(rel)
        if not parts:
            raise ValueError("the root has no parent")
        fd = self._open_dir(parts[:-1])
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    # -- the contract ---------------------------------------------------------------------------
    def lstat(self, rel: str) -> os.stat_result:
        if rel == "":
            return os.stat(self._root_fd)
        with self._parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def exists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False
            raise
        return True

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if rel == "":
            return os.open(".", flags, dir_fd=self._root_fd)
        with self._parent(rel) as (fd, name):
            return os.open(name, flags, mode, dir_fd=fd)

    def listdir(self, rel: str) -> list[tuple[str, int]]:
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out = []
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        out.append((entry.name, entry.stat(follow_symlinks=False).st_mode))
                    except FileNotFoundError:  # removed while listing
                        continue
            return out
        finally:
            os.close(fd)

    def mkdir(self, rel: str, mode: int) -> None:
        with self._parent(rel) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def unlink(self, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rename(self, old: str, new: str, *, noreplace: bool = False) -> None:
        with self._parent(old) as (old_fd, old_name), self._parent(new) as (new_fd, new_name):
            if noreplace:
                _renameat2(old_fd, old_name, new_fd, new_name, _RENAME_NOREPLACE)
            else:
                os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    def symlink(self, target: str, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def readlink(self, rel: str) -> str:
        with self._parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def chmod(self, rel: str, mode: int) -> None:
        # Linux has no lchmod: chmod the inode behind an O_PATH fd through its /proc magic link.
        fd = self.open(rel, os.O_PATH)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), rel)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        if rel == "":
            os.chown(f"/proc/self/fd/{self._root_fd}", uid, gid)
            return
        with self._parent(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: str, ns: tuple[int, int] | None) -> None:
        with self._parent(rel) as (fd, name):
            if ns is None:
                os.utime(name, dir_fd=fd, follow_symlinks=False)
            else:
                os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)

    def truncate(self, rel: str, length: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(f"/proc/self/fd/{self._root_fd}")
