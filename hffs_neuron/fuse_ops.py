"""The FUSE adapter: kernel calls to view calls, exceptions to errno. No filesystem logic lives here."""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would otherwise prefer libfuse2

import mfusepy  # noqa: E402

from . import libfuse_session  # noqa: E402
from .errors import HffsError, RemoteAccessDenied  # noqa: E402
from .telemetry import count_denied, count_error  # noqa: E402
from .views.creators import Caller  # noqa: E402
from .views.localfs import Timespec  # noqa: E402
from .views.merged import FileHandle, MergedView, errno_of, local_attrs  # noqa: E402

logger = logging.getLogger(__name__)


def _max_read() -> int:
    """The largest read request (libfuse3 allows 1 MiB) whose spliced reply fits one pipe.

    libfuse 3.14 answers `read_buf`'s fd by splicing it through a per-thread pipe, which it grows to the
    reply's size plus three pages; a pipe larger than /proc/sys/fs/pipe-max-size (1 MiB by default) needs
    CAP_SYS_RESOURCE, which containers rarely grant even to root. Without it libfuse copies every reply
    through a buffer it mallocs per request (a fresh 1 MiB mapping under the daemon's mmap threshold,
    faulted in page by page). Requests four pages short of the limit keep the splice path: the first read
    of a freshly fetched 1 GiB blob through the mount took 0.26-0.45 s instead of 0.8 s (2 cores).
    """
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_max = int(f.read())
    except (OSError, ValueError):
        pipe_max = 1024 * 1024
    page = os.sysconf("SC_PAGE_SIZE")
    return max(32 * page, min(1024 * 1024, (pipe_max // page - 4) * page))


MAX_READ = _max_read()
_DIR_MODE = stat.S_IFDIR | 0o755

# libfuse's `struct fuse_buf` / `struct fuse_bufvec` (with its one inline buffer), for read_buf.
_FUSE_BUF_IS_FD = 1 << 1
_FUSE_BUF_FD_SEEK = 1 << 2
_FUSE_CAP_SPLICE_WRITE = 1 << 7
_FUSE_CAP_SPLICE_MOVE = 1 << 8
_FUSE_CAP_CACHE_SYMLINKS = 1 << 23  # fuse_common.h (libfuse >= 3.10): the kernel keeps readlink answers
_FUSE_READDIR_PLUS = 1 << 0  # readdir flags: the kernel asked for entries with their attributes
_FUSE_FILL_DIR_PLUS = 1 << 1  # filler flags: this entry's attributes are filled in
_MAX_PLUS_DIRS = 65536  # directories remembered as filled with attributes (then the oldest are forgotten)
_RENAME_NOREPLACE = 1


class _FuseBuf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _FuseBufvec(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _FuseBuf * 1),
    ]


_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.argtypes = []
_gil_ensure.restype = ctypes.c_int
_pinned = threading.local()  # `.done` once this thread's Python thread state is kept (see _pin_thread_state)


def _pin_thread_state() -> None:
    """Keep the calling libfuse worker thread's Python thread state for the thread's life.

    ctypes enters a callback from a thread Python did not start with PyGILState_Ensure, which creates a
    thread state, and leaves it with PyGILState_Release, which deletes it again and unmaps its frame stack:
    once per FUSE request. Under the compile storm (`scripts/bench.py --rows storm`) perf put ~6% of the
    daemon's CPU in those munmaps alone, besides the allocation, page faults and the interpreter's thread
    list lock. One more Ensure, never released, keeps the state: libfuse >= 3.12 never ends idle workers
    (max_idle_threads -1 by default), so this is one thread state per worker, at most max_threads."""
    _gil_ensure()
    _pinned.done = True


_buf_size = mfusepy._libfuse.fuse_buf_size
_buf_size.argtypes = [ctypes.c_void_p]
_buf_size.restype = ctypes.c_size_t
_buf_copy = mfusepy._libfuse.fuse_buf_copy
_buf_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_buf_copy.restype = ctypes.c_ssize_t

_invalidate_path = mfusepy._libfuse.fuse_invalidate_path
_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_invalidate_path.restype = ctypes.c_int
_get_session = mfusepy._libfuse.fuse_get_session
_get_session.argtypes = [ctypes.c_void_p]
_get_session.restype = ctypes.c_void_p
_notify_inval_entry = mfusepy._libfuse.fuse_lowlevel_notify_inval_entry
_notify_inval_entry.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
_notify_inval_entry.restype = ctypes.c_int


def _relative(path: str | None) -> str:
    if path is None:  # an open file unlinked meanwhile (hard_remove): only its handle is left
        raise mfusepy.FuseOSError(errno.ENOENT)
    return path.strip("/")


def _caller() -> Caller:
    """Who made the current request (pid 0: a process in another pid namespace)."""
    uid, gid, pid = mfusepy.fuse_get_context()
    return Caller(uid, gid, pid)


class FuseOperations(mfusepy.Operations):
    """Thin mapping from mfusepy callbacks to a `MergedView`.

    File handles are indices into `_handles`; reads go through `read_buf`, which hands libfuse the
    local fd itself, and content-addressed files get `keep_cache` so the page cache survives reopens.
    There is no `flush` (nothing is buffered here): libfuse answers the kernel's first FLUSH with ENOSYS,
    and the kernel sends no more, so a close costs no round trip to the daemon.
    """

    use_ns = True

    def __init__(
        self,
        view: MergedView,
        *,
        attr_timeout: float | None = None,
        negative_timeout: float = 2.0,
        on_init: Callable[[], None] | None = None,
    ):
        self.view = view
        # The kernel keeps entries and attributes this long: the view's own figure where it states one
        # (what it shows changes only through the mount, or not at all), else a minute.
        self.attr_timeout = attr_timeout if attr_timeout is not None else getattr(view, "kernel_attr_timeout", 60.0)
        self.negative_timeout = negative_timeout
        self._on_init = on_init
        self._handles: dict[int, FileHandle] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._fuse: int | None = None  # libfuse's `struct fuse *`, from init until destroy
        self._fuse_lock = threading.Lock()  # never held by the hot paths (handles have `_lock`)
        self._mounted: tuple[str, int] | None = None  # (mountpoint, st_dev) once the mount is up
        # Directory -> when it was last answered with attributes (readdirplus): see `readdir_plus`.
        self._plus_filled: dict[str, float] = {}
        # Open directory handle -> its entries with attributes, handed out page by page (see
        # `_CachingFUSE.readdir_fuse_3`); dropped at releasedir.
        self._dir_entries: dict[int, list[tuple[str, int, dict | None]]] = {}
        self._next_dir = itertools.count(1)

    def attach(self, mountpoint: str, device: int) -> None:
        """The mount is up at `mountpoint` (its st_dev `device`): `invalidate` may look directories up there."""
        self._mounted = (mountpoint, device)

    def invalidate(self, path: str) -> None:
        """Drop what the kernel caches of mount-relative `path`, so a change the kernel did not see (a lock
        removed by the daemon, a file added, changed or deleted upstream) shows at once instead of after
        the entry timeout: its attributes and page cache if the kernel holds it, else the "not found" it
        may hold for the name (a compiler polling `model.done` of a module another node is publishing).

        libfuse 3.14's high-level `fuse_invalidate_path` covers the first case. A "not found" has no node
        in libfuse, so the second needs the low-level `fuse_lowlevel_notify_inval_entry` and the parent's
        node id, which the high-level library hands out as the inode number (no `use_ino`): the parent is
        looked up through the mount. Not called from FUSE requests (the kernel's call waits for lookups in
        the parent to finish)."""
        with self._fuse_lock:
            if self._fuse is None:
                return
            result = _invalidate_path(self._fuse, ("/" + path).encode())
            parent, name = os.path.split(path)
            unknown = bool(path) and result == -errno.ENOENT
            parent_known = unknown and _invalidate_path(self._fuse, ("/" + parent).encode()) == 0
        if result not in (0, -errno.ENOENT):
            logger.debug("fuse_invalidate_path(%s): %s", path, os.strerror(-result))
        if parent_known and self._mounted is not None:
            self._drop_negative_entry(parent, name)

    def _drop_negative_entry(self, parent: str, name: str) -> None:
        mountpoint, device = self._mounted  # type: ignore[misc]
        try:
            st = os.lstat(os.path.join(mountpoint, parent))
        except OSError:
            return
        if st.st_dev != device or not stat.S_ISDIR(st.st_mode):  # unmounted, or another mount took the path
            return
        encoded = name.encode()
        with self._fuse_lock:
            if self._fuse is None:
                return
            result = _notify_inval_entry(_get_session(self._fuse), st.st_ino, encoded, len(encoded))
        if result not in (0, -errno.ENOENT):  # ENOENT: the kernel held nothing for the name
            logger.debug("fuse_lowlevel_notify_inval_entry(%s, %s): %s", parent, name, os.strerror(-result))

    # -- lifecycle ------------------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        context = mfusepy._libfuse.fuse_get_context()  # init runs with a context that names the `struct fuse`
        if context:
            with self._fuse_lock:
                self._fuse = context.contents.fuse
            session = _get_session(context.contents.fuse)
            if conn is not None and not libfuse_session.grant_parallel_dirops(session, conn.want, conn.capable):
                logger.info("the kernel sends the lookups of one directory one at a time (see libfuse_session.py)")
            libfuse_session.hook_opendir(session)
        if config is not None:
            config.attr_timeout = self.attr_timeout
            config.entry_timeout = self.attr_timeout
            config.negative_timeout = self.negative_timeout
            # Views decide per open whether the page cache may be kept (keep_cache).
            config.kernel_cache = 0
        if conn is not None:
            conn.max_read = MAX_READ  # must equal the max_read mount option
            conn.max_readahead = 16 * 1024 * 1024
            conn.max_background = 64
            conn.congestion_threshold = 48
            # read_buf hands libfuse an fd: with splice the bytes go page cache -> /dev/fuse without
            # passing through a user-space buffer.
            conn.want |= conn.capable & (_FUSE_CAP_SPLICE_WRITE | _FUSE_CAP_SPLICE_MOVE)
            if getattr(self.view, "immutable_symlinks", False):
                # Symlinks that never change in place (hub-cache snapshots -> blobs): the kernel keeps each
                # target after its first readlink, so a warm walk of a snapshot asks the daemon nothing.
                conn.want |= conn.capable & _FUSE_CAP_CACHE_SYMLINKS
        if self._on_init:
            self._on_init()

    def destroy(self, path: str) -> None:
        with self._fuse_lock:
            self._fuse = None
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.release()

    # -- helpers --------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except mfusepy.FuseOSError:
            raise
        except HffsError as exc:
            if exc.errno != errno.ENOENT:
                logger.warning("%s%r: %s", fn.__name__, args, exc)
            if isinstance(exc, RemoteAccessDenied) and exc.repo:
                count_denied(exc.repo)
            raise mfusepy.FuseOSError(count_error(exc.errno)) from None
        except OSError as exc:
            code = errno_of(exc)
            if code in (errno.EIO, errno.ENOSPC):  # the local disk failing us: worth a line in the log
                logger.warning("%s%r: %s", fn.__name__, args, exc)
            raise mfusepy.FuseOSError(count_error(code)) from None
        except Exception:
            logger.exception("%s%r failed", fn.__name__, args)
            raise mfusepy.FuseOSError(count_error(errno.EIO)) from None

    def _register(self, handle: FileHandle, fi: Any) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        fi.fh = fh
        fi.keep_cache = 1 if handle.keep_cache else 0
        return 0

    def _handle(self, fh: Any) -> FileHandle:
        number = fh.fh if hasattr(fh, "fh") else fh
        try:
            return self._handles[number]
        except KeyError:
            raise mfusepy.FuseOSError(errno.EBADF) from None

    # -- metadata -------------------------------------------------------------------------------
    def getattr(self, path: str | None, fh: Any = None) -> dict:
        if path is None and fh is not None:  # fstat of an open file already unlinked (hard_remove)
            handle = self._handle(fh)
            if handle.fd >= 0:
                return local_attrs(os.fstat(handle.fd))
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 0, "st_size": len(handle.data or b"")}
        return self._call(self.view.getattr, _relative(path))

    def opendir(self, path: str) -> int:
        return next(self._next_dir)  # flags are set by _CachingFUSE.opendir

    def fixed_listing(self, path: str) -> bool:
        """May the kernel keep the listing of directory `path` until the directory changes through the
        mount? Only where nothing else can change it (`MergedView.fixed_listing`)."""
        return self.view.fixed_listing(_relative(path))

    def releasedir(self, path: str, fh: int) -> int:
        with self._lock:
            self._dir_entries.pop(fh, None)
        return 0

    def dir_entries(self, fh: int, path: str, plus: bool) -> list[tuple[str, int, dict | None]] | None:
        """The entries, with attributes, of open directory `fh` from its first READDIRPLUS on (None: fill
        plain entries all at once). Kept until releasedir: the kernel asks for them a page at a time."""
        with self._lock:
            entries = self._dir_entries.get(fh)
        if entries is None and plus:
            listed = self.readdir_plus(path)
            if listed is not None:
                entries = [(".", _DIR_MODE, None), ("..", _DIR_MODE, None), *listed]
                with self._lock:
                    self._dir_entries[fh] = entries
        return entries

    def readdir(self, path: str, fh: Any) -> list[tuple[str, int]]:
        """(name, st_mode) pairs, consumed by `_CachingFUSE.readdir_fuse_3` (not mfusepy's format)."""
        return [(".", _DIR_MODE), ("..", _DIR_MODE), *self._call(self.view.readdir, _relative(path))]

    def readdir_plus(self, path: str) -> list[tuple[str, int, dict | None]] | None:
        """(name, st_mode, attributes or None) of each entry, for a READDIRPLUS: the kernel caches them as if each
        entry had been looked up, so a walk needs no lookup per entry. None (plain entries) for views that
        do not offer attributes with their listings (`readdir_attrs`), and for a directory answered with
        attributes less than half an entry timeout ago: the kernel still holds those entries, and a warm
        `ls` or walk then costs no attribute work per entry."""
        fill = getattr(self.view, "readdir_attrs", None)
        if fill is None:
            return None
        rel = _relative(path)
        now = time.monotonic()
        with self._lock:
            last = self._plus_filled.get(rel)
            if last is not None and now - last < self.attr_timeout / 2:
                return None
            if len(self._plus_filled) >= _MAX_PLUS_DIRS:
                self._plus_filled.clear()
            self._plus_filled[rel] = now
        return self._call(fill, rel)

    def readlink(self, path: str) -> str:
        return self._call(self.view.readlink, _relative(path))

    def statfs(self, path: str) -> dict:
        return self._call(self.view.statfs)

    # -- files ----------------------------------------------------------------------------------
    def open(self, path: str, fi: Any) -> int:
        handle = self._call(self.view.open, _relative(path), fi.flags, _caller())
        return self._register(handle, fi)

    def create(self, path: str, mode: int, fi: Any) -> int:
        handle = self._call(self.view.create, _relative(path), fi.flags, mode, _caller())
        return self._register(handle, fi)

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: Any) -> int:
        """Zero-copy reads: hand libfuse the fd and offset; it splices or preads without Python.

        libfuse frees the bufvec (allocated with malloc here) and never closes the fd.
        """
        handle = self._handle(fh)
        vec_addr = _libc.malloc(ctypes.sizeof(_FuseBufvec))
        if not vec_addr:
            raise mfusepy.FuseOSError(errno.ENOMEM)
        vec = _FuseBufvec.from_address(vec_addr)
        vec.count, vec.idx, vec.off = 1, 0, 0
        buf = vec.buf[0]
        if handle.data is not None:
            chunk = handle.data[offset : offset + size]
            mem = _libc.malloc(max(1, len(chunk)))
            if not mem:
                _libc.free(ctypes.c_void_p(vec_addr))
                raise mfusepy.FuseOSError(errno.ENOMEM)
            ctypes.memmove(mem, chunk, len(chunk))
            buf.size, buf.flags, buf.mem, buf.fd, buf.pos = len(chunk), 0, mem, -1, 0
        else:
            buf.size, buf.flags, buf.mem = size, _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, None
            buf.fd, buf.pos = handle.fd, offset
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vec_addr
        return 0

    def write_buf(self, bufp: Any, offset: int, fh: Any) -> int:
        """Writes from libfuse's own receive buffer: libfuse copies it into the local fd (pwrite, no GIL held)
        without the bytes ever becoming a Python object (mfusepy's `write` copies each request into one:
        for a 1 MiB request a fresh mapping under the daemon's 1 MiB mmap threshold, faulted in page by page)."""
        handle = self._handle(fh)
        if handle.fd < 0:
            raise mfusepy.FuseOSError(errno.EROFS)
        src = ctypes.cast(bufp, ctypes.c_void_p)
        dst = _FuseBufvec(1, 0, 0)
        buf = dst.buf[0]
        buf.size, buf.flags, buf.mem = _buf_size(src), _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, None
        buf.fd, buf.pos = handle.fd, offset
        written = _buf_copy(ctypes.byref(dst), src, 0)
        if written < 0:
            raise mfusepy.FuseOSError(-written)
        return written

    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        handle = self._handle(fh) if fh is not None else None
        if handle is not None and handle.fd >= 0:  # ftruncate: the kernel checked the handle is writable
            self._call(os.ftruncate, handle.fd, length)
        else:
            self._call(self.view.truncate, _relative(path), length, _caller())
        return 0

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        handle = self._handle(fh)
        if handle.fd >= 0:
            try:
                (os.fdatasync if datasync else os.fsync)(handle.fd)
            except OSError as exc:
                raise mfusepy.FuseOSError(errno_of(exc)) from None
        return 0

    def release(self, path: str, fh: Any) -> int:
        number = fh.fh if hasattr(fh, "fh") else fh
        with self._lock:
            handle = self._handles.pop(number, None)
        if handle is not None:
            handle.release()
        return 0

    # -- namespace ------------------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> int:
        self._call(self.view.mkdir, _relative(path), mode, _caller())
        return 0

    def rmdir(self, path: str) -> int:
        self._call(self.view.rmdir, _relative(path), _caller())
        return 0

    def unlink(self, path: str) -> int:
        self._call(self.view.unlink, _relative(path), _caller())
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & ~_RENAME_NOREPLACE:  # RENAME_EXCHANGE / WHITEOUT: callers fall back to plain renames
            raise mfusepy.FuseOSError(errno.EINVAL)
        noreplace = bool(flags & _RENAME_NOREPLACE)
        self._call(self.view.rename, _relative(old), _relative(new), _caller(), noreplace=noreplace)
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy's naming: `target` is the new link's path, `source` what it points to.
        self._call(self.view.symlink, _relative(target), source, _caller())
        return 0

    def chmod(self, path: str, mode: int, fh: Any = None) -> int:
        self._call(self.view.chmod, _relative(path), mode, _caller())
        return 0

    def chown(self, path: str, uid: int, gid: int, fh: Any = None) -> int:
        self._call(self.view.chown, _relative(path), uid, gid, _caller())
        return 0

    def utimens(self, path: str, times: tuple[Timespec, Timespec] | None = None, fh: Any = None) -> int:
        """`times`: raw (seconds, nanoseconds) pairs from `_CachingFUSE.utimens_fuse_3`."""
        self._call(self.view.utimens, _relative(path), times, _caller())
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._call(self.view.mknod, _relative(path), mode, _caller())
        return 0

    def link(self, target: str, source: str) -> int:
        # Hard links are refused (README "Security model"): with the high-level API each name is its own
        # kernel inode with attributes cached for the attribute timeout, so a second name would show a
        # stale link count and mode after a change through the first.
        raise mfusepy.FuseOSError(count_error(errno.EPERM))


class _CachingFUSE(mfusepy.FUSE):
    """Let the kernel keep the listings of directories whose contents change only through the mount
    (`FuseOperations.fixed_listing`; mfusepy's opendir ignores raw_fi).

    The kernel drops a kept listing when the directory changes through the mount; it would notice a change
    made upstream only once the directory's attributes expire, which is why other directories are listed by
    the daemon every time. libfuse's high-level API forwards these flags only from 3.16.1 on; for older
    ones (Debian 12 ships 3.14) `libfuse_session.hook_opendir` makes them reach the kernel.
    """

    def __init__(self, operations: Any, mountpoint: str, **kwargs: Any) -> None:
        self._loop_thread = threading.get_ident()  # FUSE.__init__ serves the mount from this thread
        super().__init__(operations, mountpoint, **kwargs)

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Worker threads keep their thread state (the loop's own thread has its real one).
        if not getattr(_pinned, "done", False) and threading.get_ident() != self._loop_thread:
            _pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        # mfusepy drops the flags: a `mv -n` (RENAME_NOREPLACE) would silently replace the target.
        return self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )

    def read_buf(self, path: bytes | None, bufpp: Any, size: int, offset: int, fip: Any) -> int:
        # mfusepy decodes the path unconditionally; with hard_remove it is NULL for unlinked open files.
        return self.operations.read_buf("", bufpp, size, offset, fip.contents)

    def write_buf(self, path: bytes | None, bufp: Any, offset: int, fip: Any) -> int:
        # As read_buf: the path is NULL for an unlinked open file (hard_remove), and not needed.
        return self.operations.write_buf(bufp, offset, fip.contents)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        # mfusepy drops the file handle of an ftruncate (and the path is NULL once the file is unlinked).
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.truncate(decoded, length, fip.contents if fip else None)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        # mfusepy turns the times into numbers, UTIME_NOW and UTIME_OMIT included (stored as 1970 dates):
        # hand on the raw timespecs for utimensat(2) to interpret.
        times = None
        if buf:
            times = tuple((t.tv_sec, t.tv_nsec) for t in (buf.contents.actime, buf.contents.modtime))
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.utimens(decoded, times)

    def readdir_fuse_3(self, path: bytes, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """Fill entries straight from (name, mode) pairs: mfusepy's generic loop costs several
        microseconds per entry, which dominates `ls` of a 10,000-module directory. For a READDIRPLUS
        (mfusepy never fills one) each entry carries its attributes where the view offers them."""
        decoded = path.decode(self.encoding, self.errors)
        st = mfusepy.c_stat()
        plus = bool(flags & _FUSE_READDIR_PLUS)
        entries = self.operations.dir_entries(fip.contents.fh, decoded, plus and offset == 0)
        if entries is not None:
            # Entries with nonzero offsets: libfuse 3.14 sends the attributes of a READDIRPLUS only on
            # this path (its all-at-once path answers them with inode 0, which the kernel ignores).
            for index in range(offset, len(entries)):
                name, mode, attrs = entries[index]
                st = mfusepy.c_stat()
                fill = 0
                if plus and attrs is not None:
                    mfusepy.set_st_attrs(st, attrs, use_ns=True)
                    fill = _FUSE_FILL_DIR_PLUS
                else:
                    st.st_mode = mode  # a plain entry: the kernel looks it up when it needs more
                if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, fill) != 0:
                    break  # the kernel's buffer is full: it asks again from this offset
            return 0
        for name, mode in self.operations.readdir(decoded, 0):
            st.st_mode = mode
            if filler(buf, name.encode(self.encoding, self.errors), st, 0, 0) != 0:
                break
        return 0

    def opendir(self, path: bytes, fip: Any) -> int:
        result = super().opendir(path, fip)
        if self.operations.fixed_listing(path.decode(self.encoding, self.errors)):
            for info in (fip.contents, libfuse_session.opening_dir()):
                if info is not None:
                    info.cache_readdir = 1
                    info.keep_cache = 1
        return result


def run_fuse(ops: FuseOperations, mountpoint: str, *, foreground: bool = True, **options: Any) -> None:
    """Mount and serve until unmounted (blocks). `options` become libfuse `-o` options.

    Always with `default_permissions` (the kernel checks the modes and owners the views report: the
    multi-user model in README "Security model") and `hard_remove` (unlinking an open file unlinks it; libfuse would
    otherwise rename it to `.fuse_hidden*`, which for a remote file meant a full copy-up).
    """
    options.update(default_permissions=True, hard_remove=True)
    # libfuse splits -o at commas; a backslash escapes one (a source never has one, but be exact).
    options["fsname"] = str(options.get("fsname") or "hffs").replace("\\", "\\\\").replace(",", "\\,")
    options.setdefault("subtype", "hffs")
    options.setdefault("max_read", MAX_READ)
    _CachingFUSE(ops, mountpoint, raw_fi=True, foreground=foreground, **options)
