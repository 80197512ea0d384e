"""A writable local directory merged over a read-only virtual tree: the semantics both views share.

Paths are relative ("" is the root, "a/b" below it). Local entries win over virtual ones. What happens
when a virtual entry is modified is the subclass's choice: the NEFF view copies it up into the local
layer (and hides deleted ones with whiteouts), the hub-cache view refuses with EROFS.

No FUSE here: views are plain objects, testable without a kernel mount; `fuse_ops` adapts them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import HffsError
from ..proc import HOST, pid_alive
from .creators import Caller, Creator, CreatorLog
from .localfs import LocalTree, Timespec

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
# Permission bits a client may set: setuid/setgid are never stored (a root daemon would keep them).
_ALLOWED_BITS = 0o1777
# Temp files older than this are removed at start whoever wrote them (a host that is gone).
_TMP_MAX_AGE = 24 * 3600


class _PathLocks:
    """A fixed array of locks, one picked per path: namespace changes of one path are serialized while
    unrelated paths (almost always another stripe) proceed. Bounded, unlike a lock per path."""

    def __init__(self, stripes: int = 64):
        self._locks = [threading.Lock() for _ in range(stripes)]

    @contextlib.contextmanager
    def hold(self, *paths: str) -> Iterator[None]:
        # Taken in index order: two renames in opposite directions cannot deadlock.
        indices = sorted({hash(p) % len(self._locks) for p in paths})
        for i in indices:
            self._locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(indices):
                self._locks[i].release()


class MergedView:
    """Filesystem semantics over a local layer and a virtual tree from a subclass.

    `local` is the directory tree the layer lives in (all access through `LocalTree`: no symlink is
    ever followed); the layer is `upper` inside it ("" = the tree's root) and copy-up temp files go to
    `tmp`, a private directory of the same tree outside the visible layer. `state` holds the creator
    record. Every operation that changes something takes the caller (uid, gid, pid); None is the
    mount's owner (the daemon itself).
    """

    # Whether deleted virtual entries can be hidden (whiteouts); otherwise deleting them is EROFS.
    hides_virtual = False
    # Whether the layer changes only through this view (a private directory): then the kernel may keep the
    # page cache of a local file across opens, as it does for content-addressed blobs. Not for a layer that
    # other processes also write directly (the hub-cache backing directory).
    layer_keep_cache = False

    def __init__(
        self,
        local: LocalTree,
        *,
        upper: str,
        tmp: str,
        state: LocalTree,
        read_only: bool = False,
        group_gid: int | None = None,
    ):
        self.local = local
        self.upper = upper
        self.tmp = tmp
        self.read_only = read_only
        self.uid = os.getuid()
        self.group_gid = group_gid
        self.gid = os.getgid() if group_gid is None else group_gid
        self.started_ns = time.time_ns()
        # Bumped whenever the virtual tree may have changed (a listing reloaded, a repo resolved).
        # Directory mtimes follow it, so the kernel drops its cached readdir results.
        self.generation_ns = self.started_ns
        self._locks = _PathLocks()
        self._tmp_count = itertools.count()
        if upper and not local.exists(upper):
            local.mkdir(upper, 0o755)
        if not read_only:
            self._prepare_tmp()
        self._state = state
        self.creators = CreatorLog(state)

    def close(self) -> None:
        self.creators.close()
        self.local.close()
        if self._state is not self.local:
            self._state.close()

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

    def fixed_listing(self, path: str) -> bool:
        """Does directory `path` change only through the mount (its virtual children never do)? The kernel
        may then keep its listing until it changes (fuse_ops.py)."""
        return False

    def layer_path(self, path: str) -> str:
        """Where `path` lives in the layer, relative to it (subclasses may remap names, e.g. case)."""
        return path

    def policy_mode(self, path: str, is_dir: bool) -> int | None:
        """Permission bits `path` always has, whoever created it (shared directories), or None."""
        return None

    def owned_by_mount(self, path: str, is_dir: bool) -> bool:
        """Does `path` belong to the mount's owner whoever creates it (shared directories)?"""
        return False

    def trust_scope(self, path: str) -> str | None:
        """The directory whose record also keeps who wrote `path` (NEFF: its module), or None."""
        return None

    def adjust_attrs(self, path: str, attrs: dict) -> None:
        """Last word on the attributes shown for `path` (subclasses restrict modes, e.g. gated repos)."""
        mode = self.policy_mode(path, stat.S_ISDIR(attrs["st_mode"]))
        if mode is not None:
            attrs["st_mode"] = stat.S_IFMT(attrs["st_mode"]) | mode

    def is_hidden(self, path: str) -> bool:
        """True if a virtual entry at `path` was deleted locally (whiteout)."""
        return False

    def hide(self, path: str) -> None:
        raise fs_error(errno.EROFS)

    def unhide(self, path: str, *, opaque: bool) -> None:
        """A local entry now exists at `path`: stop hiding it (`opaque`: a recreated directory)."""

    def hidden_children(self, path: str) -> set[str]:
        """Names of virtual children of directory `path` deleted locally (see `is_hidden`)."""
        return set()

    def display_name(self, parent: str, local_name: str) -> str:
        """Name shown for a local entry (subclasses may canonicalize)."""
        return local_name

    def _opaque(self, path: str) -> bool:
        return False

    def check_write(self, path: str, caller: Caller | None) -> None:
        """Raise unless `caller` may create, change or delete `path` (EROFS, EACCES...); record who
        other than the owner and root does so (publish trust reads it)."""
        if self.read_only:
            raise fs_error(errno.EROFS)
        if caller is not None and caller.uid not in (0, self.uid):
            key = self._key(self._rel(path))
            scope = self.trust_scope(path)
            keys = (key,) if scope is None else (key, self._key(self._rel(scope)))
            self.creators.note_writer(keys, caller.uid)

    def bump_generation(self) -> None:
        self.generation_ns = max(time.time_ns(), self.generation_ns + 1)

    def is_owner(self, caller: Caller | None) -> bool:
        return caller is None or caller.uid in (0, self.uid)

    def restrict(self, attrs: dict) -> None:
        """Private or gated content: the owner (and `--group`) only."""
        attrs["st_mode"] &= ~0o007
        if self.group_gid is None:
            attrs["st_mode"] &= ~0o070
        else:
            attrs["st_gid"] = self.group_gid

    # -- layer paths ----------------------------------------------------------------------------
    def _rel(self, path: str) -> str:
        """The tree-relative path of `path`; the private temp directory does not exist for clients."""
        if not self.upper and (path == self.tmp or path.startswith(f"{self.tmp}/")):
            raise fs_error(errno.ENOENT)
        rel = self.layer_path(path)
        if not self.upper:
            return rel
        return f"{self.upper}/{rel}" if rel else self.upper

    def layer_has(self, path: str) -> bool:
        """Is there a local entry at view path `path` (any kind; a symlink is not followed)?"""
        try:
            return self.local.exists(self._rel(path))
        except (OSError, ValueError):
            return False

    def layer_stat(self, path: str) -> os.stat_result | None:
        """lstat of the local entry at view path `path`; None if there is none."""
        try:
            return self._lstat(self._rel(path))
        except (OSError, ValueError):
            return None

    def remove_stale(self, path: str, creator: Creator) -> bool:
        """Remove the local file at `path` if `creator` still made it (a compile lock whose creator is
        gone); False if it was removed or recreated meanwhile (then by someone else: it stays)."""
        rel = self._rel(path)
        with self._locks.hold(path):
            if self.creators.get(self._key(rel)) != creator:
                return False
            try:
                self.local.unlink(rel)
            except FileNotFoundError:
                pass
            self.creators.forget(self._key(rel))
        return True

    def open_layer_file(self, path: str) -> int | None:
        """A read-only fd of the regular local file at view path `path`; None if there is none (a
        symlink there is not followed: None too)."""
        try:
            return self.local.open(self._rel(path), os.O_RDONLY)
        except (OSError, ValueError):
            return None

    def _lstat(self, rel: str) -> os.stat_result | None:
        """lstat in the layer: None when absent (or below a non-directory); a planted symlink on the
        way is ELOOP, never followed and never mistaken for absence."""
        try:
            return self.local.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _vnode(self, path: str) -> VNode | None:
        if self.is_hidden(path):
            return None
        return self.virtual_lookup(path)

    # -- temp files -----------------------------------------------------------------------------
    def _prepare_tmp(self) -> None:
        """Create the private temp directory; remove what dead writers of this host left behind."""
        if not self.local.exists(self.tmp):
            self.local.mkdir(self.tmp, 0o700)
        now = time.time()
        for name, _mode in self.local.listdir(self.tmp):
            host, pid, _n = (name.rsplit(".", 2) + ["", ""])[:3]  # see _tmp_name; host names have dots
            try:
                ours_and_dead = host == HOST and pid.isdigit() and not pid_alive(int(pid))
                if ours_and_dead or now - self.local.lstat(f"{self.tmp}/{name}").st_mtime > _TMP_MAX_AGE:
                    self.local.unlink(f"{self.tmp}/{name}")
            except FileNotFoundError:
                continue

    def _tmp_name(self) -> str:
        # Host, pid and a counter: unique across hosts sharing the directory and across threads.
        return f"{self.tmp}/{HOST}.{os.getpid()}.{next(self._tmp_count)}"

    # -- lookups --------------------------------------------------------------------------------
    def getattr(self, path: str) -> dict:
        rel = self._rel(path)
        st = self._lstat(rel)
        if st is not None:
            attrs = local_attrs(st)
            if stat.S_ISDIR(st.st_mode):  # may merge virtual children: changes with them too
                attrs["st_mtime"] = max(attrs["st_mtime"], self.generation_ns)
            if (
                not _CAN_CHOWN
                and not self.owned_by_mount(path, stat.S_ISDIR(st.st_mode))
                and (creator := self.creators.get(self._key(rel))) is not None
            ):
                # A daemon that cannot chown still shows each entry as its creator's, so that the
                # kernel lets creators (and only them) change and remove what they made.
                attrs["st_uid"] = creator.uid
        else:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            attrs = self._vattrs(node)
        self.adjust_attrs(path, attrs)
        return attrs

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
        rel = self._rel(path)
        st = self._lstat(rel)
        local_is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        node = None if local_is_dir and path and self._opaque(path) else self._vnode(path)
        if not local_is_dir and (node is None or node.kind != "dir"):
            raise fs_error(errno.ENOENT if node is None and st is None else errno.ENOTDIR)
        if node is not None and node.kind == "dir":
            hidden = self.hidden_children(path)
            for name, child in self.virtual_children(path).items():
                if name not in hidden:
                    entries[name] = _vmode(child)
        if local_is_dir:
            private = self.tmp if not path and not self.upper else None
            for name, mode in self.local.listdir(rel):
                if name != private:
                    entries[self.display_name(path, name)] = mode
        return list(entries.items())

    def _has_visible_virtual_children(self, path: str) -> bool:
        if self._opaque(path):
            return False
        node = self._vnode(path)
        if node is None or node.kind != "dir":
            return False
        hidden = self.hidden_children(path)
        return any(name not in hidden for name in self.virtual_children(path))

    def readlink(self, path: str) -> str:
        rel = self._rel(path)
        if self._lstat(rel) is not None:
            return self.local.readlink(rel)
        node = self._vnode(path)
        if node is None:
            raise fs_error(errno.ENOENT)
        if node.kind != "symlink":
            raise fs_error(errno.EINVAL)
        return node.target

    def statfs(self) -> dict:
        sv = self.local.statvfs()
        return {key: getattr(sv, key) for key in _STATVFS_KEYS}

    # -- open/create ----------------------------------------------------------------------------
    def open(self, path: str, flags: int, caller: Caller | None = None) -> FileHandle:
        writing = bool(flags & _WRITE_FLAGS)
        if writing:
            self.check_write(path, caller)
        rel = self._rel(path)
        if self._lstat(rel) is None:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            if node.kind == "dir":
                raise fs_error(errno.EISDIR)
            if not writing:
                return self.virtual_open(path, node)
            # O_TRUNC discards the content: copy up an empty file instead of fetching the old bytes.
            self._copy_up(path, node, caller, content=not flags & os.O_TRUNC)
        return FileHandle(fd=self.local.open(rel, flags & ~(os.O_CREAT | os.O_EXCL)), keep_cache=self.layer_keep_cache)

    def create(self, path: str, flags: int, mode: int, caller: Caller | None = None) -> FileHandle:
        _refuse_setid(mode)
        self.check_write(path, caller)
        rel = self._rel(path)
        node = self.virtual_lookup(path)  # remote lookups before any lock
        try:
            handle = self._create_new(path, rel, node, flags, mode, caller)
        except FileNotFoundError:
            # The parent is not in the layer yet (a remote directory): mirror it (no lock held), then again.
            self._ensure_local_parent(path)
            handle = self._create_new(path, rel, node, flags, mode, caller)
        # An existing entry: open it (a virtual one is copied up first, without holding the lock).
        return handle or self.open(path, flags & ~(os.O_CREAT | os.O_EXCL), caller)

    def _create_new(
        self, path: str, rel: str, node: VNode | None, flags: int, mode: int, caller: Caller | None
    ) -> FileHandle | None:
        """`create` of a new local file; None where an entry exists and may be opened instead. The O_EXCL
        create in the layer is the existence check of the local side (no lstat before it)."""
        with self._locks.hold(path):
            if node is None or self.is_hidden(path):
                try:
                    fd = self._create_local(path, rel, flags, mode, caller)
                except FileExistsError:  # a local entry (or one written into the backing directly)
                    if flags & os.O_EXCL:
                        raise
                    return None
                return FileHandle(fd=fd, keep_cache=self.layer_keep_cache)
            if flags & os.O_EXCL:
                raise fs_error(errno.EEXIST)
        return None

    def _create_local(self, path: str, rel: str, flags: int, mode: int, caller: Caller | None) -> int:
        fd = self.local.open(rel, flags | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, self._new_mode(path, mode, is_dir=False))
            if caller is not None and _CAN_CHOWN:
                os.fchown(fd, caller.uid, caller.gid)
        except BaseException:
            os.close(fd)
            raise
        self._created(path, rel, caller, opaque=False)
        return fd

    def _new_mode(self, path: str, mode: int, *, is_dir: bool) -> int:
        forced = self.policy_mode(path, is_dir)
        return forced if forced is not None else mode & _ALLOWED_BITS

    def _key(self, rel: str) -> str:
        """The creator record's key for a tree path: the path in the layer (canonical casing)."""
        return rel[len(self.upper) + 1 :] if self.upper else rel

    def _record(self, rel: str, caller: Caller | None) -> None:
        self.creators.record(self._key(rel), caller or Caller(self.uid, self.gid, os.getpid()))

    def _created(self, path: str, rel: str, caller: Caller | None, *, opaque: bool) -> None:
        """Bookkeeping for a new local entry: its creator, and no whiteout over it any more."""
        self._record(rel, caller)
        self.unhide(path, opaque=opaque)

    def _ensure_local_parent(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent:
            self._ensure_local_dir(parent)

    def _ensure_local_dir(self, path: str) -> None:
        """Create `path` in the local layer, mirroring virtual parents (mkdir -p). The mirrors belong to
        the mount's owner, like the Hub directories they stand for."""
        rel = self._rel(path)
        st = self._lstat(rel)
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise fs_error(errno.ENOTDIR)
            return
        node = self._vnode(path)
        if node is None:
            raise fs_error(errno.ENOENT)
        if node.kind != "dir":
            raise fs_error(errno.ENOTDIR)
        self._ensure_local_parent(path)
        try:
            self.local.mkdir(rel, 0o700)
        except FileExistsError:
            return  # another thread mirrored it first
        self.local.chmod(rel, self._new_mode(path, 0o755, is_dir=True))

    def _copy_up(self, path: str, node: VNode, caller: Caller | None, content: bool = True) -> None:
        """Make a local copy of a virtual file before it is modified (or refuse); `content=False`: empty.

        The bytes are fetched and written to a private temp file with no lock held, then renamed into
        place without replacing anything: a local file that appeared meanwhile wins.
        """
        if self.read_only or node.kind != "file" or not self.can_copy_up(path, node):
            raise fs_error(errno.EROFS)
        rel = self._rel(path)
        if self._lstat(rel) is not None:
            return
        self._ensure_local_parent(path)
        handle = self.virtual_open(path, node) if content else FileHandle(data=b"")
        tmp = self._tmp_name()
        try:
            fd = self.local.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as out:
                os.fchmod(fd, 0o644)
                if handle.data is not None:
                    out.write(handle.data)
                else:
                    with open(handle.fd, "rb", closefd=False) as src:
                        os.lseek(handle.fd, 0, os.SEEK_SET)
                        while chunk := src.read(4 * 1024 * 1024):
                            out.write(chunk)
            with self._locks.hold(path):
                try:
                    self.local.rename(tmp, rel, noreplace=True)
                except FileExistsError:
                    return  # copied up (or created) by someone else meanwhile
                # The copy is the owner's file (its bytes are the Hub's); who asked for it is recorded.
                self._record(rel, caller)
        finally:
            handle.release()
            if self.local.exists(tmp):
                self.local.unlink(tmp)

    # -- namespace changes ----------------------------------------------------------------------
    def _new_entry(self, path: str, caller: Caller | None) -> tuple[str, VNode | None]:
        """Checks and parents for creating `path` (mkdir, symlink): its layer path and the virtual entry
        it may replace (a hidden one). Network lookups happen here, before any path lock."""
        self.check_write(path, caller)
        rel = self._rel(path)
        node = self.virtual_lookup(path)
        self._ensure_local_parent(path)
        return rel, node

    def _check_absent(self, path: str, rel: str, node: VNode | None) -> None:
        """EEXIST unless nothing is at `path` in the merged view (called under the path's lock)."""
        if self._lstat(rel) is not None or (node is not None and not self.is_hidden(path)):
            raise fs_error(errno.EEXIST)

    def mkdir(self, path: str, mode: int, caller: Caller | None = None) -> None:
        rel, node = self._new_entry(path, caller)
        with self._locks.hold(path):
            self._check_absent(path, rel, node)
            self.local.mkdir(rel, 0o700)
            self.local.chmod(rel, self._new_mode(path, mode, is_dir=True))
            if caller is not None and _CAN_CHOWN and not self.owned_by_mount(path, True):
                self.local.chown(rel, caller.uid, caller.gid)
            self._created(path, rel, caller, opaque=node is not None)  # hidden before: recreate empty

    def mknod(self, path: str, mode: int, caller: Caller | None = None) -> None:
        """FIFOs and sockets, like any local file; device nodes are refused (EPERM): the layer's
        backing directory need not be `nodev`, so a device node there would open the real device."""
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise fs_error(errno.EPERM)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise fs_error(errno.EINVAL)
        _refuse_setid(mode)
        rel, node = self._new_entry(path, caller)
        with self._locks.hold(path):
            self._check_absent(path, rel, node)
            self.local.mknod(rel, kind | 0o600)
            self.local.chmod(rel, self._new_mode(path, mode, is_dir=False))
            if caller is not None and _CAN_CHOWN:
                self.local.chown(rel, caller.uid, caller.gid)
            self._created(path, rel, caller, opaque=False)

    def symlink(self, path: str, target: str, caller: Caller | None = None) -> None:
        rel, node = self._new_entry(path, caller)
        with self._locks.hold(path):
            self._check_absent(path, rel, node)
            self.local.symlink(target, rel)  # stored verbatim; the daemon never follows it
            if caller is not None and _CAN_CHOWN:
                self.local.chown(rel, caller.uid, caller.gid)
            self._created(path, rel, caller, opaque=False)

    def _check_hideable(self, node: VNode | None) -> None:
        if node is not None and not self.hides_virtual:
            raise fs_error(errno.EROFS)

    def unlink(self, path: str, caller: Caller | None = None) -> None:
        self.check_write(path, caller)
        rel = self._rel(path)
        raw = self.virtual_lookup(path)
        with self._locks.hold(path):
            st = self._lstat(rel)
            node = None if self.is_hidden(path) else raw
            if st is None and node is None:
                raise fs_error(errno.ENOENT)
            if (st is None and node.kind == "dir") or (st is not None and stat.S_ISDIR(st.st_mode)):
                raise fs_error(errno.EISDIR)
            self._check_hideable(node)
            if st is not None:
                self.local.unlink(rel)
                self.creators.forget(self._key(rel))
            if node is not None:
                self.hide(path)

    def rmdir(self, path: str, caller: Caller | None = None) -> None:
        self.check_write(path, caller)
        if not path:
            raise fs_error(errno.EBUSY)
        rel = self._rel(path)
        if self.readdir(path):  # emptiness of the merged directory (remote listings: before the lock)
            raise fs_error(errno.ENOTEMPTY)
        raw = self.virtual_lookup(path)
        with self._locks.hold(path):
            st = self._lstat(rel)
            node = None if self.is_hidden(path) else raw
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise fs_error(errno.ENOTDIR)
            self._check_hideable(node)
            if st is not None:
                self.local.rmdir(rel)  # ENOTEMPTY if a local entry appeared meanwhile
                self.creators.forget(self._key(rel))
            if node is not None:
                self.hide(path)

    def rename(self, old: str, new: str, caller: Caller | None = None, *, noreplace: bool = False) -> None:
        """rename(2); `noreplace`: renameat2's RENAME_NOREPLACE (EEXIST if `new` exists in the merged view)."""
        self.check_write(old, caller)
        self.check_write(new, caller)
        if new == old:
            return
        if new.startswith(f"{old}/") or not old:
            raise fs_error(errno.EINVAL)
        old_rel, new_rel = self._rel(old), self._rel(new)
        # Everything that may need the network, before any lock: lookups, listings, copy-up.
        old_raw, new_raw = self.virtual_lookup(old), self.virtual_lookup(new)
        src_st = self._lstat(old_rel)
        src_node = None if self.is_hidden(old) else old_raw
        if src_st is None and src_node is None:
            raise fs_error(errno.ENOENT)
        src_is_dir = stat.S_ISDIR(src_st.st_mode) if src_st is not None else src_node.kind == "dir"
        self._check_hideable(src_node)
        if src_is_dir and self._has_visible_virtual_children(old):
            # Moving remote content would mean copying it all up here: `mv` copies it instead.
            raise fs_error(errno.EXDEV)
        dst_st = self._lstat(new_rel)
        dst_node = None if self.is_hidden(new) else new_raw
        if noreplace and (dst_st is not None or dst_node is not None):
            raise fs_error(errno.EEXIST)
        if dst_st is not None:
            dst_is_dir = stat.S_ISDIR(dst_st.st_mode)
        else:
            dst_is_dir = dst_node is not None and dst_node.kind == "dir"
        if dst_is_dir:
            if not src_is_dir:
                raise fs_error(errno.EISDIR)
            if self.readdir(new):  # emptiness of the merged destination
                raise fs_error(errno.ENOTEMPTY)
        elif (dst_st is not None or dst_node is not None) and src_is_dir:
            raise fs_error(errno.ENOTDIR)
        if src_st is None and not src_is_dir:
            self._copy_up(old, src_node, caller)
        elif src_st is None:
            self._ensure_local_dir(old)  # an empty remote directory: a local one stands in for it
        self._ensure_local_parent(new)
        with self._locks.hold(old, new):
            self.local.rename(old_rel, new_rel, noreplace=noreplace)
            self.creators.move(self._key(old_rel), self._key(new_rel))
            if src_is_dir and self.owned_by_mount(new, True):
                # A directory renamed into a shared place (a user's own directory made a module) becomes
                # the owner's, as if created there: its creator must not own a module others fill.
                if _CAN_CHOWN:
                    self.local.chown(new_rel, self.uid, self.gid)
                self.local.chmod(new_rel, self._new_mode(new, 0o755, is_dir=True))
            if src_node is not None:
                self.hide(old)
            self.unhide(new, opaque=dst_node is not None and dst_node.kind == "dir")

    def _local_for_modify(self, path: str, caller: Caller | None) -> str:
        self.check_write(path, caller)
        rel = self._rel(path)
        if self._lstat(rel) is None:
            node = self._vnode(path)
            if node is None:
                raise fs_error(errno.ENOENT)
            if node.kind == "dir":
                self._ensure_local_dir(path)
            else:
                self._copy_up(path, node, caller)
        return rel

    def truncate(self, path: str, length: int, caller: Caller | None = None) -> None:
        self.local.truncate(self._local_for_modify(path, caller), length)

    def chmod(self, path: str, mode: int, caller: Caller | None = None) -> None:
        _refuse_setid(mode)
        rel = self._local_for_modify(path, caller)
        is_dir = stat.S_ISDIR(self.local.lstat(rel).st_mode)
        # Modes are honoured as asked, o+w included: publish trust judges who wrote a file, not its mode.
        self.local.chmod(rel, self._new_mode(path, mode, is_dir=is_dir))

    def chown(self, path: str, uid: int, gid: int, caller: Caller | None = None) -> None:
        self.local.chown(self._local_for_modify(path, caller), uid, gid)

    def utimens(self, path: str, times: tuple[Timespec, Timespec] | None, caller: Caller | None = None) -> None:
        """utimensat(2): (atime, mtime) as (seconds, nanoseconds), UTIME_NOW / UTIME_OMIT honoured."""
        self.local.utimens(self._local_for_modify(path, caller), times)


def _refuse_setid(mode: int) -> None:
    """setuid/setgid are never stored (README "Security model"): asking for them is refused, never
    silently dropped."""
    if mode & ~_ALLOWED_BITS & 0o7777:
        raise fs_error(errno.EPERM)


# Only a root daemon can give new entries their creator's uid; otherwise they stay the daemon's.
_CAN_CHOWN = os.geteuid() == 0


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
