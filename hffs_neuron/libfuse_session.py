"""Two things libfuse's high-level API does from 3.17 (3.16.1) on, done for the libfuse 3.13-3.16 sessions.

**Parallel lookups.** libfuse wants `FUSE_CAP_PARALLEL_DIROPS` by default, but before 3.17.1 its INIT reply
never passed the flag on, so the kernel sent the lookups of one directory one at a time: one lookup waiting
on the Hub made every other name of that directory wait behind it (8 readers of 8 repos through a stalled
Hub: the last one's `stat` took 8 deadlines). `grant_parallel_dirops`, called from the filesystem's `init`
(inside the INIT request, before the reply is built), installs a custom I/O whose `writev` is a one-shot
Python function: it sets the flag in the INIT reply, then puts the C library's `writev` in its own place, so
no later reply passes through Python. `read` and both splices are the C library's functions themselves
(libfuse adds a trailing `userdata` argument, which the C calling convention lets them ignore), so
requests and spliced replies travel as before.

**Directory listings the kernel keeps.** Before 3.16.1 the high-level `opendir` answered the kernel with
its own file info, dropping the `cache_readdir` and `keep_cache` a filesystem set. `hook_opendir` puts a
function in front of the session's low-level `opendir` that makes libfuse's file info of the directory
being opened reachable (`opening_dir`) while the filesystem's `opendir` runs, so that the flags set there
reach the kernel.

Both check the session's layout (its fd and I/O table where 3.13-3.16 keep them; every low-level handler
inside libfuse) before writing anything; on a mismatch nothing changes.
"""

from __future__ import annotations

import ctypes
import threading

import mfusepy

FUSE_CAP_PARALLEL_DIROPS = 1 << 18  # fuse_common.h: conn->want / conn->capable
_FUSE_PARALLEL_DIROPS = 1 << 18  # fuse_kernel.h: the INIT reply's flag
_INIT_OUT_FLAGS = 12  # offset of `flags` in struct fuse_init_out (after major, minor, max_readahead)
# struct fuse_session in libfuse 3.13-3.16: char *mountpoint; volatile int exited; int fd;
# struct fuse_custom_io *io; struct mount_opts *mo; int debug; int deny_others; struct fuse_lowlevel_ops op
_SESSION_FD = 8 + 4
_SESSION_IO = 8 + 4 + 4
_SESSION_OPS = 8 + 4 + 4 + 8 + 8 + 4 + 4
# fuse_lowlevel_ops: pointers from `init` (0); the high-level library sets `lookup` (2) to `fsyncdir` (23)
# to its own handlers, but for `write` (16: it has `write_buf`).
_OPS_CHECKED = range(2, 24)
_LOOKUP, _GETATTR, _OPENDIR, _READDIR, _RELEASEDIR = 2, 4, 20, 21, 22
_FIRST, _PASSES_PARALLEL_DIROPS = 313, 317  # fuse_version() values


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _CustomIo(ctypes.Structure):  # struct fuse_custom_io
    _fields_ = [
        ("writev", ctypes.c_void_p),
        ("read", ctypes.c_void_p),
        ("splice_receive", ctypes.c_void_p),
        ("splice_send", ctypes.c_void_p),
    ]


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, ctypes.c_void_p)
_LL_OPENDIR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(mfusepy.fuse_file_info))
_libc = ctypes.CDLL(None)
_libc.writev.restype = ctypes.c_ssize_t
_libc.writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
_libc.dladdr.restype = ctypes.c_int
_libfuse = mfusepy._libfuse
_libfuse.fuse_session_fd.argtypes, _libfuse.fuse_session_fd.restype = [ctypes.c_void_p], ctypes.c_int
_libfuse.fuse_session_custom_io.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_libfuse.fuse_session_custom_io.restype = ctypes.c_int

# The callbacks handed to libfuse: it keeps their addresses, so they must never be collected.
_keep: list[object] = []
_opening = threading.local()  # .llfi: libfuse's file info of the directory being opened on this thread


def _address(function: object) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value  # type: ignore[arg-type, return-value]


def _library_base(address: int | None) -> int | None:
    """The load address of the shared object holding `address` (None: none does)."""
    info = _DlInfo()
    if not address or not _libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    return info.dli_fbase


def _layout_known(session: int) -> bool:
    """Is `session` laid out as in libfuse 3.13-3.16 (checked where it can be, before any write)?"""
    if not _FIRST <= _libfuse.fuse_version() < _PASSES_PARALLEL_DIROPS:
        return False
    fd = _libfuse.fuse_session_fd(session)
    if fd < 0 or ctypes.c_int.from_address(session + _SESSION_FD).value != fd:
        return False
    libfuse = _library_base(_address(_libfuse.fuse_session_new))
    ops = (ctypes.c_void_p * (_OPS_CHECKED.stop)).from_address(session + _SESSION_OPS)
    return (
        libfuse is not None
        and all(ops[i] is None or _library_base(ops[i]) == libfuse for i in _OPS_CHECKED)
        and all(ops[i] is not None for i in (_LOOKUP, _GETATTR, _OPENDIR, _READDIR, _RELEASEDIR))
    )


def grant_parallel_dirops(session: int, conn_want: int, conn_capable: int) -> bool:
    """Make the INIT reply of `session` (a `struct fuse_session *`, inside `init`) grant parallel dirops.

    True if the reply will carry the flag (or libfuse sends it itself); False if this libfuse, kernel or
    session layout does not allow it (lookups in a directory then stay one at a time).
    """
    wanted = FUSE_CAP_PARALLEL_DIROPS
    if not (conn_want & wanted and conn_capable & wanted):
        return False
    if _libfuse.fuse_version() >= _PASSES_PARALLEL_DIROPS:
        return True
    io_slot = ctypes.c_void_p.from_address(session + _SESSION_IO)
    if not _layout_known(session) or io_slot.value:
        return False
    native_writev = _address(_libc.writev)
    installed: list[_CustomIo] = []  # libfuse's own copy of the I/O table, once checked

    def init_reply(fd: int, iov: ctypes.Array, count: int, _userdata: int) -> int:
        if installed:
            if count >= 2 and iov[1].iov_len >= _INIT_OUT_FLAGS + 4:
                flags = ctypes.c_uint32.from_address(iov[1].iov_base + _INIT_OUT_FLAGS)
                flags.value |= _FUSE_PARALLEL_DIROPS
            installed[0].writev = native_writev  # every later reply goes straight to the C library
        return _libc.writev(fd, ctypes.cast(iov, ctypes.c_void_p), count)

    callback = _WRITEV(init_reply)
    _keep.append(callback)
    splice = _address(_libc.splice)
    io = _CustomIo(_address(callback), _address(_libc.read), splice, splice)
    if _libfuse.fuse_session_custom_io(session, ctypes.byref(io), _libfuse.fuse_session_fd(session)) != 0:
        return False
    copy = _CustomIo.from_address(io_slot.value) if io_slot.value else None
    if copy is None or (copy.writev, copy.read, copy.splice_send) != (io.writev, io.read, io.splice_send):
        return False  # not the layout checked above: the callback only passes replies on
    installed.append(copy)
    return True


def hook_opendir(session: int) -> bool:
    """Put `opening_dir`'s bookkeeping in front of `session`'s low-level opendir (call from `init`).

    False where libfuse forwards the flags itself or the layout is not the one known (then directory
    listings are answered by the filesystem on every read, as before).
    """
    if not _layout_known(session):
        return False
    slot = ctypes.c_void_p.from_address(session + _SESSION_OPS + 8 * _OPENDIR)
    original = _LL_OPENDIR(slot.value)

    def opendir(req: int, ino: int, llfi: ctypes._Pointer) -> None:
        _opening.llfi = llfi
        try:
            original(req, ino, llfi)
        finally:
            _opening.llfi = None

    hook = _LL_OPENDIR(opendir)
    _keep.append((hook, original))
    slot.value = _address(hook)
    return True


def opening_dir() -> mfusepy.fuse_file_info | None:
    """libfuse's own file info of the directory this thread is opening (inside the filesystem's
    `opendir`), whose flags reach the kernel; None outside one, or without `hook_opendir`."""
    llfi = getattr(_opening, "llfi", None)
    return llfi.contents if llfi else None
