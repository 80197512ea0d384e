"""A writable local directory merged over a read-only virtual tree: the semantics both views share.

Paths are relative ("" is the root, "a/b" below it). Local entries win over virtual ones. What happens
when a virtual entry is modified is the subclass's choice: the NEFF view copies it up into the local
layer (and hides deleted ones with whiteouts), the hub-cache view refuses with EROFS.

No FUSE here: views are plain objects, testable without a kernel mount; `fuse_ops` adapts them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HffsError

logger = logging.getLogger(__name__)


def fs_error(code: int, message: str = "") -> OSError:
    return OSError(code, message or os.strerror(code))


@dataclass(frozen=True)
class VNode:
    """A virtual entry: what the remote says is there, before any byte is fetched."""

    kind: str  # "dir", "file" or "symlink"
    size: int = 0
    mtime_ns: int = 0
    target: str = ""  # for symlinks
    mode: int = 0o444


@dataclass
class FileHandle:
    """An open file: a real local fd (materialized blob or local-layer file) or small in-memory bytes."""

    fd: int = -1
    data: bytes | None = None
    keep_cache: bool = False
    on_release: Callable[[], None] | None = None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.on_release:
            self.on_release()
            self.on_release = None


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class MergedView:
    """Filesystem semantics over a local layer (`local_root`) and a virtual tree from a subclass."""

    def __init__(self, local_root: str | os.PathLike, *, read_only: bool = False):
        self.local_root = os.fspath(local_root)
        os.makedirs(self.local_root, mode=0o755, exist_ok=True)
        self.read_only = read_only
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started_ns = time.time_ns()
        # Bumped whenever the virtual tree may have changed (a listing reloaded, a repo resolved).
        # Directory mtimes follow it, so the kernel drops its cached readdir results.
        self.generation_ns = self.started_ns
        # Serializes namespace changes (create/rename/unlink...) against merged lookups of the same tree.
        self._ns_lock = threading.RLock()

    # -- to be provided by subclasses -----------------------------------------------------------
    def virtual_lookup(self, path: str) -> VNode | None:
        raise NotImplementedError

    def virtual_children(self, path: str) -> dict[str, VNode]:
        raise NotImplementedError

    def virtual_open(self, path: str, node: VNode) -> FileHandle:
        raise NotImplementedError

    def can_copy_up(self, path: str, node: VNode) -> bool:
        """May this virtual file be copied into the local layer to be modified? (Otherwise EROFS.)"""
        return False

    def local_path(self, path: str) -> str:
        """Where `path` lives in the local layer (subclasses may remap names, e.g. case)."""
        return os.path.join(self.local_root, path) if path else self.local_root

    def is_hidden(self, path: str) -> bool:
        """True if a virtual entry at `path` was deleted locally (whiteout)."""
        return False

    def hide(self, path: str) -> None:
        raise fs_error(errno.EROFS)

    def unhide(self, path: str, *, opaque: bool) -> None:
        """A local entry now exists at `path`: stop hiding it (`opaque`: a recreated directory)."""

    def bump_generation(self) -> None:
        self.generation_ns = max(time.time_ns(), self.generation_ns + 1)

    # -- lookups --------------------------------------------------------------------------------
    def _lstat_local(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.local_path(path))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def _vnode(self, path: str) -> VNode | None:
        if self.is_hidden(path):
            return None
        return self.virtual_lookup(path)

    def getattr(self, path: str) -> dict:
        st = self._lstat_local(path)
        if st is not None:
            attrs = local_attrs(st)
            if stat.S_ISDIR(st.st_mode):  # may merge virtual children: changes with them too
                attrs["st_mtime"] = max(attrs["st_mtime"], self.generation_ns)
            return attrs
        node = self._vnode(path)
        if node is None:
            raise fs_error(errno.ENOENT)
        return self._vattrs(node)

    def _vattrs(self, node: VNode) -> dict:
        mtime = node.mtime_ns or self.started_ns
        mode = _vmode(node)
        if node.kind == "dir":
            nlink, size = 2, 4096
            mtime = max(mtime, self.generation_ns)
        elif node.kind == "symlink":
            nlink, size = 1, len(node.target)
        else:
            nlink, size = 1, node.size
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": mtime,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 1024 * 1024,
        }

    def readdir(self, path: str) -> list[tuple[str, int]]:
        """(name, st_mode) of each entry: virtual ones not hidden, then local entries (which win).

        This is the hot path of `ls` in directories of 10,000 modules: no per-entry attribute dicts.
        """
        entries: dict[str, int] = {}
        local = self.local_path(path)
        local_is_dir = os.path.isdir(local) and not os.path.islink(local)
        node = None if local_is_dir and path and self._opaque(path) else self._vnode(path)
        if not local_is_dir and (node is None or node.kind != "dir"):
            raise fs_error(errno.ENOENT if node is None and not os.path.lexists(local) else errno.ENOTDIR)
        if node is not None and node.kind == "dir":
            hidden = self.hidden_children(path)
            for name, child in self.virtual_children(path).items():
                if name not in hidden:
                    entries[name] = _vmode(child)
        if local_is_dir:
            with os.scandir(local) as it:
                for de in it:
                    entries[self.display_name(path, de.name)] = _dirent_mode(de)
        return list(entries.items())

    def hidden_children(self, path: str) -> set[str]:
        """Names of virtual children of directory `path` deleted locally (see `is_hidden`)."""
        return set()

    def display_name(self, parent: str, local_name: str) -> str:
        """Name shown for a local entry (subclasses may canonicalize)."""
        return local_name

    def _opaque(self, path: str) -> bool:
        return False

    def readlink(self, path: str) -> str:
        st = self._lstat_local(path)
        if st is not None:
            return os.readlink(self.local_path(path))
        node = self._vnode(path)
        if node is None:
            raise fs_error(errno.ENOENT)
        if node.kind != "symlink":
            raise fs_error(errno.EINVAL)
        return node.target

    def access(self, path: str, mode: int) -> None:
        st = self._lstat_local(path)
        if st is None:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            if mode & os.W_OK and node.kind != "dir" and (self.read_only or not self.can_copy_up(path, node)):
                raise fs_error(errno.EROFS)
        elif mode & os.W_OK and self.read_only:
            raise fs_error(errno.EROFS)

    def statfs(self) -> dict:
        sv = os.statvfs(self.local_root)
        return {key: getattr(sv, key) for key in _STATVFS_KEYS}

    # -- open/create ----------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> FileHandle:
        writing = bool(flags & _WRITE_FLAGS)
        if writing and self.read_only:
            raise fs_error(errno.EROFS)
        local = self.local_path(path)
        if self._lstat_local(path) is None:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            if node.kind == "dir":
                raise fs_error(errno.EISDIR)
            if not writing:
                return self.virtual_open(path, node)
            # O_TRUNC discards the content: copy up an empty file instead of fetching the old bytes.
            self._copy_up(path, node, content=not flags & os.O_TRUNC)
        return FileHandle(fd=os.open(local, flags & ~os.O_CREAT | os.O_CLOEXEC))

    def create(self, path: str, flags: int, mode: int) -> FileHandle:
        self._check_writable(path)
        with self._ns_lock:
            if self._lstat_local(path) is None and self._vnode(path) is not None:
                if flags & os.O_EXCL:
                    raise fs_error(errno.EEXIST)
                return self.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
            self._ensure_local_parent(path)
            fd = os.open(self.local_path(path), flags | os.O_CREAT | os.O_CLOEXEC, mode & 0o777)
            self.unhide(path, opaque=False)
        return FileHandle(fd=fd)

    def _check_writable(self, path: str) -> None:
        if self.read_only:
            raise fs_error(errno.EROFS)

    def _ensure_local_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent:
            self._ensure_local_dir(parent)

    def _ensure_local_dir(self, path: str) -> None:
        """Create `path` in the local layer, mirroring virtual parents (mkdir -p)."""
        if self._lstat_local(path) is not None:
            if not os.path.isdir(self.local_path(path)):
                raise fs_error(errno.ENOTDIR)
            return
        node = self._vnode(path)
        if node is None:
            raise fs_error(errno.ENOENT)
        if node.kind != "dir":
            raise fs_error(errno.ENOTDIR)
        self._ensure_local_parent(path)
        os.makedirs(self.local_path(path), mode=0o755, exist_ok=True)

    def _copy_up(self, path: str, node: VNode, content: bool = True) -> None:
        """Make a local copy of a virtual file before it is modified (or refuse); `content=False`: empty."""
        if self.read_only or node.kind != "file" or not self.can_copy_up(path, node):
            raise fs_error(errno.EROFS)
        with self._ns_lock:
            if self._lstat_local(path) is not None:
                return
            self._ensure_local_parent(path)
            handle = self.virtual_open(path, node) if content else FileHandle(data=b"")
            local = self.local_path(path)
            tmp = f"{local}.hffs-copyup.{os.getpid()}.{threading.get_ident()}"
            try:
                with open(tmp, "wb") as out:
                    if handle.data is not None:
                        out.write(handle.data)
                    else:
                        with open(handle.fd, "rb", closefd=False) as src:
                            os.lseek(handle.fd, 0, os.SEEK_SET)
                            while chunk := src.read(4 * 1024 * 1024):
                                out.write(chunk)
                os.chmod(tmp, 0o644)
                os.replace(tmp, local)
            finally:
                handle.release()
                if os.path.exists(tmp):
                    os.unlink(tmp)

    # -- namespace changes ----------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> None:
        self._check_writable(path)
        with self._ns_lock:
            if self._lstat_local(path) is not None or self._vnode(path) is not None:
                raise fs_error(errno.EEXIST)
            self._ensure_local_parent(path)
            was_virtual = self.virtual_lookup(path) is not None  # hidden before: recreate empty
            os.mkdir(self.local_path(path), mode & 0o777)
            self.unhide(path, opaque=was_virtual)

    def symlink(self, path: str, target: str) -> None:
        self._check_writable(path)
        with self._ns_lock:
            if self._lstat_local(path) is not None or self._vnode(path) is not None:
                raise fs_error(errno.EEXIST)
            self._ensure_local_parent(path)
            os.symlink(target, self.local_path(path))
            self.unhide(path, opaque=False)

    def unlink(self, path: str) -> None:
        self._check_writable(path)
        with self._ns_lock:
            local_exists = self._lstat_local(path) is not None
            node = self._vnode(path)
            if not local_exists and node is None:
                raise fs_error(errno.ENOENT)
            if node is not None and node.kind == "dir" and not local_exists:
                raise fs_error(errno.EISDIR)
            if node is not None:
                self.hide(path)  # raises EROFS in views that cannot hide virtual entries
            if local_exists:
                os.unlink(self.local_path(path))

    def rmdir(self, path: str) -> None:
        self._check_writable(path)
        if not path:
            raise fs_error(errno.EBUSY)
        with self._ns_lock:
            if [name for name, _ in self.readdir(path)]:
                raise fs_error(errno.ENOTEMPTY)
            node = self._vnode(path)
            if node is not None:
                self.hide(path)
            if self._lstat_local(path) is not None:
                os.rmdir(self.local_path(path))

    def rename(self, old: str, new: str) -> None:
        self._check_writable(new)
        with self._ns_lock:
            node = None if self._lstat_local(old) is not None else self._vnode(old)
            if node is None and self._lstat_local(old) is None:
                raise fs_error(errno.ENOENT)
            if node is not None:
                if node.kind == "dir":
                    raise fs_error(errno.EXDEV)  # callers (mv) fall back to copy + delete
                self._copy_up(old, node)
            dest_node = self._vnode(new)
            if dest_node is not None and dest_node.kind == "dir" and self._lstat_local(new) is None:
                if [name for name, _ in self.readdir(new)]:
                    raise fs_error(errno.ENOTEMPTY)
            self._ensure_local_parent(new)
            os.rename(self.local_path(old), self.local_path(new))
            if self.virtual_lookup(old) is not None:
                self.hide(old)
            self.unhide(new, opaque=dest_node is not None and dest_node.kind == "dir")

    def _local_for_modify(self, path: str) -> str:
        self._check_writable(path)
        if self._lstat_local(path) is None:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            if node.kind == "dir":
                self._ensure_local_dir(path)
            else:
                self._copy_up(path, node)
        return self.local_path(path)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(self._local_for_modify(path), length)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._local_for_modify(path), mode & 0o7777 & ~0o002)  # never world-writable

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._local_for_modify(path), uid, gid, follow_symlinks=False)

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        local = self._local_for_modify(path)
        if times is None:
            os.utime(local, follow_symlinks=False)
        else:
            os.utime(local, ns=times, follow_symlinks=False)


def _vmode(node: VNode) -> int:
    if node.kind == "dir":
        return stat.S_IFDIR | 0o755
    if node.kind == "symlink":
        return stat.S_IFLNK | 0o777
    return stat.S_IFREG | node.mode


def local_attrs(st: os.stat_result) -> dict:
    """A stat result as the attribute dict FUSE wants (times in ns: the adapter sets use_ns)."""
    attrs = {key: getattr(st, key) for key in _STAT_KEYS}
    attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
    return attrs


def _dirent_mode(de: os.DirEntry) -> int:
    try:
        return de.stat(follow_symlinks=False).st_mode
    except OSError:
        return stat.S_IFREG


def errno_of(exc: BaseException) -> int:
    """The errno a filesystem call should return for `exc`."""
    if isinstance(exc, HffsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


_STAT_KEYS = (
    "st_mode",
    "st_nlink",
    "st_size",
    "st_uid",
    "st_gid",
    "st_blocks",
    "st_blksize",
)
_STATVFS_KEYS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)
