"""Local-layer filesystem access that never follows a symlink the daemon did not create (issue 12 item 2).

Clients of the mount can plant symlinks in the hub-cache backing directory and in NEFF local layers
(e.g. replace `models--Evil--Repo` with a link to a root-only directory). Every path the views open
there goes through a `LocalTree`: paths are resolved relative to an fd of the root, either in one
`openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)` call or, where the kernel or a
seccomp filter refuses `openat2`, by walking one component at a time with `O_PATH|O_DIRECTORY|O_NOFOLLOW`
directory fds. Mutations then act on the parent directory fd plus the final name with the `*at` call and
no-follow flags, so swapping a directory for a symlink between checks and use cannot redirect them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from .. import constants

log = logging.getLogger(__name__)

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# openat2 came after the syscall tables were unified: one number on every architecture Linux added it to.
_SYS_OPENAT2 = 437
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_RENAME_NOREPLACE = 1
_AT_SYMLINK_NOFOLLOW = 0x100
# utimensat(2)'s markers in tv_nsec: set that time to now, or leave it as it is.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# One openat2 call resolves a path shorter than PATH_MAX (4096 bytes). A client path near that limit,
# under the layer's own prefix, is longer: it is resolved in pieces of at most this many bytes.
_PIECE_BYTES = 3072
_MAX_ABSENT = 4096  # missing directories remembered (`absent_ttl`)

# openat2 rejects flags it does not know (openat ignores them): pass on only these, as openat would use.
_OPEN_FLAGS = (
    os.O_ACCMODE
    | os.O_CREAT
    | os.O_EXCL
    | os.O_NOCTTY
    | os.O_TRUNC
    | os.O_APPEND
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_ASYNC
    | os.O_DIRECT
    | os.O_LARGEFILE
    | os.O_DIRECTORY
    | os.O_NOFOLLOW
    | os.O_NOATIME
    | os.O_CLOEXEC
    | os.O_PATH
    | os.O_TMPFILE
)
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# With openat2, RESOLVE_NO_SYMLINKS already refuses a trailing symlink (ELOOP); adding O_NOFOLLOW would
# open the link itself (O_PATH) and turn that into ENOTDIR.
_DIR_PATH_OPENAT2 = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_OPEN_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


#: (seconds, nanoseconds) of one time as utimensat(2) takes it; nanoseconds may be UTIME_NOW or UTIME_OMIT.
Timespec = tuple[int, int]


def _oserror(err: int, rel: str) -> OSError:
    return OSError(err, os.strerror(err), rel)


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    # openat2 refuses a mode (EINVAL) unless the call can create, and any bit outside 0o7777.
    how = _OpenHow(flags & _OPEN_FLAGS, mode & 0o7777 if creates else 0, _RESOLVE)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), os.fsencode(rel), ctypes.byref(how), _OPEN_HOW_SIZE
    )
    if fd < 0:
        raise _oserror(ctypes.get_errno(), rel)
    return fd


_libc_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+
if _libc_renameat2 is not None:
    _libc_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _renameat2(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int) -> None:
    """renameat2(2): glibc's wrapper, else the raw system call."""
    old_b, new_b = os.fsencode(old), os.fsencode(new)
    if _libc_renameat2 is not None:
        rc = _libc_renameat2(old_dir_fd, old_b, new_dir_fd, new_b, flags)
    elif _SYS_RENAMEAT2 is not None:
        fds = ctypes.c_long(old_dir_fd), ctypes.c_long(new_dir_fd)
        rc = _syscall(ctypes.c_long(_SYS_RENAMEAT2), fds[0], old_b, fds[1], new_b, ctypes.c_long(flags))
    else:
        raise _oserror(errno.ENOSYS, new)
    if rc < 0:
        raise _oserror(ctypes.get_errno(), new)


# None: not probed yet. HFFS_NO_OPENAT2 forces the component walk (tests, kernels that misbehave).
_OPENAT2: bool | None = False if constants.NO_OPENAT2 else None


def _openat2_usable(root_fd: int) -> bool:
    """Probe once per process; a racing second probe only repeats the same answer."""
    global _OPENAT2
    if _OPENAT2 is None:
        try:
            os.close(_openat2(root_fd, ".", _DIR_PATH_OPENAT2, 0))
            _OPENAT2 = True
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that predates openat2
                raise
            log.info("openat2 unavailable (%s): resolving local paths one component at a time", exc.strerror)
            _OPENAT2 = False
    return _OPENAT2


def _check(rel: str) -> None:
    if not isinstance(rel, str):
        raise ValueError(f"local path must be a str, not {type(rel).__name__}")
    if not rel:
        return
    if rel.startswith("/") or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"unsafe local path {rel!r}: relative, '/'-separated, no '.', '..' or empty parts")


class _CachedDir:
    """A directory fd kept by `LocalTree` (`dir_cache`), with the calls using it right now."""

    __slots__ = ("fd", "users", "dropped")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 1
        self.dropped = False  # out of the cache: closed when its last user is done


class LocalTree:
    """Filesystem operations on paths relative to one root directory, never following a symlink in
    any component (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS where the kernel
    has it, else component-by-component O_NOFOLLOW|O_DIRECTORY walks with directory fds).
    A symlink met on the way -> OSError(ELOOP) (or ENOTDIR where the kernel says so);
    `rel` == "" means the root itself. `rel` is "/"-separated, never absolute, no "." / ".." parts
    (ValueError otherwise: callers validate names first).

    `dir_cache` (entries; 0: off) keeps the O_PATH fds of recently resolved directories, so a call on
    `a/b/name` is one `*at` system call on the fd of `a/b` instead of three (resolve, call, close). Only
    for a tree that changes only through this object (a NEFF local layer in the private cache dir): a
    rename or rmdir here drops the fds of the directories it moves or removes, while a directory moved
    or removed behind its back would go on being used. Never for the hub-cache backing directory.

    `absent_ttl` (seconds; 0: off) lets `lstat` remember, that long, a directory it found missing: a
    walk of a virtual tree asks the layer about every file of a directory it does not have, each ask a
    path resolution in the kernel (a quarter of the daemon's time in a cold walk of a snapshot). Every
    change through this object that can make a directory appear (see `changes`) voids what was remembered;
    one made behind its back (another process writing a backing directory) shows after `absent_ttl`. (A
    file made where a directory was missing changes nothing below it: absent either way.)

    Thread-safe: the state is the root fd and the directory cache (under its lock); `close()` releases
    them (no call may be in flight then).
    """

    root: str

    def __init__(
        self, root: str | os.PathLike, *, create_mode: int | None = 0o700, dir_cache: int = 0, absent_ttl: float = 0.0
    ) -> None:
        self.root = os.path.abspath(os.fsdecode(root))
        if create_mode is not None:
            os.makedirs(self.root, mode=create_mode, exist_ok=True)
        # The root itself is trusted (the user named it): following a symlink here is intended.
        self._fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._openat2 = _openat2_usable(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._dir_cache = dir_cache
        self._dirs: OrderedDict[str, _CachedDir] = OrderedDict()  # rel -> its fd, least recently used first
        self._cached_fds: dict[int, _CachedDir] = {}  # fd -> entry, until the fd is closed
        self._dirs_lock = threading.Lock()
        self._dirs_generation = 0  # bumped by every drop: a resolution that raced with one is not kept
        self._absent_ttl = absent_ttl
        self._absent: OrderedDict[str, tuple[float, int]] = OrderedDict()  # dir -> (until, `changes` then)
        #: Bumped (under the lock) after every change through this tree other than to a regular file: mkdir,
        #: rmdir, rename, symlink, mknod.
        self.changes = 0

    def __repr__(self) -> str:
        return f"LocalTree({self.root!r})"

    def close(self) -> None:
        with self._dirs_lock:
            for entry in self._dirs.values():
                os.close(entry.fd)
            self._dirs.clear()
            self._cached_fds.clear()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- resolution ---------------------------------------------------------------------------

    def _dir(self, rel: str) -> int:
        """O_PATH fd of directory `rel` (validated); the root's own fd for "" (see `_release`)."""
        if not rel:
            return self._fd
        if not self._dir_cache:
            return self._resolve_dir(rel)
        with self._dirs_lock:
            entry = self._dirs.get(rel)
            if entry is not None:
                entry.users += 1
                self._dirs.move_to_end(rel)
                return entry.fd
            generation = self._dirs_generation
        fd = self._resolve_dir(rel)
        with self._dirs_lock:
            if generation == self._dirs_generation and rel not in self._dirs:
                entry = self._dirs[rel] = self._cached_fds[fd] = _CachedDir(fd)
                while len(self._dirs) > self._dir_cache:
                    self._drop(self._dirs.popitem(last=False)[1])
        return fd

    def _drop(self, entry: _CachedDir) -> None:
        """Take `entry` out of use (called with the cache lock held, after removing it from `_dirs`)."""
        entry.dropped = True
        if entry.users == 0:
            del self._cached_fds[entry.fd]
            os.close(entry.fd)

    def _forget_dirs(self, rel: str) -> None:
        """Directory `rel` was moved or removed: drop its cached fd and those of everything below it."""
        if not self._dir_cache:
            return
        below = f"{rel}/"
        with self._dirs_lock:
            self._dirs_generation += 1
            for key in [k for k in self._dirs if k == rel or k.startswith(below) or not rel]:
                self._drop(self._dirs.pop(key))

    def _resolve_dir(self, rel: str) -> int:
        if self._openat2 and len(rel) <= _PIECE_BYTES:  # characters: at least as many bytes
            return _openat2(self._fd, rel, _DIR_PATH_OPENAT2, 0)
        if self._openat2:
            return self._dir_in_pieces(rel)
        fd = self._fd
        try:
            for part in rel.split("/"):
                try:
                    next_fd = os.open(part, _DIR_PATH, dir_fd=fd)
                except NotADirectoryError:
                    # O_PATH|O_NOFOLLOW opens a symlink itself, then O_DIRECTORY says ENOTDIR: report ELOOP
                    # as openat2 does, so callers see one errno for "a symlink was in the way".
                    raise _oserror(errno.ELOOP if self._is_link(fd, part) else errno.ENOTDIR, rel) from None
                except OSError as exc:
                    raise _oserror(exc.errno, rel) from None
                self._release(fd)
                fd = next_fd
        except BaseException:
            self._release(fd)
            raise
        return fd

    def _dir_in_pieces(self, rel: str) -> int:
        """`_dir` of a path too long for one openat2 call: a few components at a time, each piece resolved
        beneath the directory the previous one reached (still no symlink anywhere)."""
        pieces: list[list[str]] = [[]]
        size = 0
        for part in rel.split("/"):
            length = len(os.fsencode(part)) + 1
            if pieces[-1] and size + length > _PIECE_BYTES:
                pieces.append([])
                size = 0
            pieces[-1].append(part)
            size += length
        fd = self._fd
        try:
            for piece in pieces:
                next_fd = _openat2(fd, "/".join(piece), _DIR_PATH_OPENAT2, 0)
                self._release(fd)
                fd = next_fd
        except BaseException:
            self._release(fd)
            raise
        return fd

    @staticmethod
    def _is_link(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:  # gone or replaced since: the ENOTDIR stands
            return False

    def _release(self, fd: int) -> None:
        if fd == self._fd:
            return
        if self._dir_cache:
            with self._dirs_lock:
                entry = self._cached_fds.get(fd)
                if entry is not None:
                    entry.users -= 1
                    if not entry.dropped or entry.users:
                        return
                    del self._cached_fds[fd]
        os.close(fd)

    def _parent(self, rel: str, root_errno: int) -> tuple[int, str]:
        """(parent dir fd, final name); `root_errno` is what the kernel says for this call on "/"."""
        _check(rel)
        if not rel:
            raise _oserror(root_errno, rel)
        head, _, name = rel.rpartition("/")
        return self._dir(head), name

    def _at(self, rel: str, root_errno: int, op: Callable[[str, int], T]) -> T:
        """`op(final name, parent dir fd)`: one `*at` call on `rel`, its parent resolved without links."""
        fd, name = self._parent(rel, root_errno)
        try:
            return op(name, fd)
        finally:
            self._release(fd)

    def _root_path(self) -> str:
        # The root fd's inode by a path, for calls that cannot take an O_PATH fd (chown, utime).
        return f"/proc/self/fd/{self._fd}"

    # -- queries ------------------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        _check(rel)
        if not rel:
            return os.stat(self._fd)
        if not self._absent_ttl:
            fd, name = self._parent(rel, errno.EINVAL)
        else:
            head = rel.rpartition("/")[0]
            remembered = self._absent.get(head)
            if remembered is not None and remembered[1] == self.changes and remembered[0] > time.monotonic():
                raise _oserror(errno.ENOENT, rel)
            changes = self.changes  # read before resolving: a directory made meanwhile voids the answer
            try:
                fd, name = self._parent(rel, errno.EINVAL)
            except FileNotFoundError:
                self._remember_absent(head, changes)
                raise
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            self._release(fd)

    def _remember_absent(self, rel: str, changes: int) -> None:
        with self._dirs_lock:
            self._absent[rel] = (time.monotonic() + self._absent_ttl, changes)
            self._absent.move_to_end(rel)
            while len(self._absent) > _MAX_ABSENT:
                self._absent.popitem(last=False)

    def _changed(self) -> None:
        with self._dirs_lock:
            self.changes += 1

    def exists(self, rel: str) -> bool:
        """os.path.lexists semantics: False on any OSError (ENOENT, ELOOP, ENOTDIR, EACCES...)."""
        try:
            self.lstat(rel)
        except OSError:
            return False
        return True

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        _check(rel)
        flags = (flags & _OPEN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
        if self._openat2 and len(rel) <= _PIECE_BYTES and not (self._dir_cache and rel):
            return _openat2(self._fd, rel or ".", flags, mode)
        if not rel:
            return os.open(".", flags, mode, dir_fd=self._fd)
        fd, name = self._parent(rel, errno.EINVAL)
        try:
            return _openat2(fd, name, flags, mode) if self._openat2 else os.open(name, flags, mode, dir_fd=fd)
        finally:
            self._release(fd)

    def listdir(self, rel: str) -> list[tuple[str, int]]:
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY)
        entries = []
        try:
            with os.scandir(fd) as it:  # scandir works on a duplicate; fd is still ours to close
                for entry in it:
                    try:
                        entries.append((entry.name, entry.stat(follow_symlinks=False).st_mode))
                    except FileNotFoundError:  # removed since readdir: not listed
                        continue
        finally:
            os.close(fd)
        return entries

    def readlink(self, rel: str) -> str:
        return self._at(rel, errno.EINVAL, lambda name, fd: os.readlink(name, dir_fd=fd))

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._fd)

    # -- mutations ----------------------------------------------------------------------------

    def mkdir(self, rel: str, mode: int) -> None:
        self._at(rel, errno.EEXIST, lambda name, fd: os.mkdir(name, mode, dir_fd=fd))
        self._changed()

    def rmdir(self, rel: str) -> None:
        self._at(rel, errno.EBUSY, lambda name, fd: os.rmdir(name, dir_fd=fd))
        self._forget_dirs(rel)
        self._changed()

    def unlink(self, rel: str) -> None:
        self._at(rel, errno.EISDIR, lambda name, fd: os.unlink(name, dir_fd=fd))

    def rename(self, old: str, new: str, *, noreplace: bool = False) -> None:
        old_fd, old_name = self._parent(old, errno.EBUSY)
        try:
            new_fd, new_name = self._parent(new, errno.EBUSY)
            try:
                if noreplace:
                    self._rename_noreplace(old_fd, old_name, new_fd, new_name)
                else:
                    os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            finally:
                self._release(new_fd)
        finally:
            self._release(old_fd)
        self._forget_dirs(old)  # a directory moved (a file: nothing cached under its name)
        self._forget_dirs(new)  # and one it replaced
        self._changed()

    def _rename_noreplace(self, old_fd: int, old: str, new_fd: int, new: str) -> None:
        try:
            _renameat2(old_fd, old, new_fd, new, _RENAME_NOREPLACE)
        except OSError as exc:
            # NFS and some FUSE filesystems take no rename flags (EINVAL). A file or link can still move
            # without replacing: link(2) never replaces, then drop the old name. Directories cannot.
            if exc.errno != errno.EINVAL or stat.S_ISDIR(os.stat(old, dir_fd=old_fd, follow_symlinks=False).st_mode):
                raise
            os.link(old, new, src_dir_fd=old_fd, dst_dir_fd=new_fd, follow_symlinks=False)
            os.unlink(old, dir_fd=old_fd)

    def mknod(self, rel: str, mode: int) -> None:
        """A FIFO or socket node (`mode` holds its type); callers refuse device nodes before."""
        self._at(rel, errno.EEXIST, lambda name, fd: os.mknod(name, mode, dir_fd=fd))
        self._changed()

    def symlink(self, target: str, rel: str) -> None:
        self._at(rel, errno.EEXIST, lambda name, fd: os.symlink(target, name, dir_fd=fd))
        self._changed()

    def chmod(self, rel: str, mode: int) -> None:
        # Linux has no lchmod: pin the inode with an O_PATH fd (a symlink is opened as itself), refuse
        # symlinks, then chmod that very inode through its /proc magic link (as glibc's fchmodat does).
        fd = self.open(rel, os.O_PATH)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _oserror(errno.EOPNOTSUPP, rel)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        _check(rel)
        if not rel:
            os.chown(self._root_path(), uid, gid)
            return
        fd, name = self._parent(rel, errno.EINVAL)
        try:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        finally:
            self._release(fd)

    def utimens(self, rel: str, times: tuple[Timespec, Timespec] | None) -> None:
        """utimensat(2) of `rel` without following a symlink: (atime, mtime) as given, UTIME_NOW and
        UTIME_OMIT included (os.utime cannot say "leave this one"); None: both now."""
        _check(rel)
        spec = None if times is None else (_Timespec * 2)(*(_Timespec(sec, nsec) for sec, nsec in times))
        if not rel:
            path, fd, flags = os.fsencode(self._root_path()), -100, 0  # AT_FDCWD, the root's magic link
        else:
            fd, name = self._parent(rel, errno.EINVAL)
            path, flags = os.fsencode(name), _AT_SYMLINK_NOFOLLOW
        try:
            if _libc.utimensat(fd, path, spec, flags) != 0:
                raise _oserror(ctypes.get_errno(), rel)
        finally:
            if rel:
                self._release(fd)

    def truncate(self, rel: str, length: int) -> None:
        # O_NONBLOCK: a FIFO planted under the name answers ENXIO instead of parking the caller.
        fd = self.open(rel, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
