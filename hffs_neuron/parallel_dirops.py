"""Let the kernel send lookups and readdirs of one directory side by side, as libfuse >= 3.17.1 does.

libfuse wants `FUSE_CAP_PARALLEL_DIROPS` by default, but before 3.17.1 its INIT reply never passed the
flag on, so the kernel sent the lookups of one directory one at a time: one lookup waiting on the Hub made
every other name of that directory wait behind it (8 readers of 8 repos through a stalled Hub: the last
one's `stat` took 8 deadlines).

The fix for 3.13-3.16 (Debian 12 ships 3.14): from the filesystem's `init` (called inside the INIT request,
before the reply is built), install a custom I/O whose `writev` is a one-shot Python function; it sets the
flag in the INIT reply and then puts the C library's `writev` in its own place, so no later reply passes
through Python. `read` and both splices are the C library's functions themselves (libfuse adds a trailing
`userdata` argument, which the C calling convention lets them ignore), so requests and spliced replies
travel as before. The session's layout is checked before anything is written; on a mismatch the INIT
reply is passed on unchanged and lookups stay one at a time per directory.
"""

from __future__ import annotations

import ctypes

FUSE_CAP_PARALLEL_DIROPS = 1 << 18  # fuse_common.h: conn->want / conn->capable
_FUSE_PARALLEL_DIROPS = 1 << 18  # fuse_kernel.h: the INIT reply's flag
_INIT_OUT_FLAGS = 12  # offset of `flags` in struct fuse_init_out (after major, minor, max_readahead)
# struct fuse_session in libfuse 3.13-3.16: char *mountpoint; volatile int exited; int fd; io *io; ...
_SESSION_FD = 8 + 4
_SESSION_IO = 8 + 4 + 4
_FIXED_FROM = 317  # fuse_version() from which libfuse passes the flag itself


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _CustomIo(ctypes.Structure):  # struct fuse_custom_io
    _fields_ = [
        ("writev", ctypes.c_void_p),
        ("read", ctypes.c_void_p),
        ("splice_receive", ctypes.c_void_p),
        ("splice_send", ctypes.c_void_p),
    ]


_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, ctypes.c_void_p)
_libc = ctypes.CDLL(None)
_libc.writev.restype = ctypes.c_ssize_t
_libc.writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def _address(function: object) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value  # type: ignore[arg-type, return-value]


# The one-shot writev callbacks: libfuse keeps their addresses, so they must never be collected.
_keep: list[object] = []


def grant(libfuse: ctypes.CDLL, session: int, conn_want: int, conn_capable: int) -> bool:
    """Make the INIT reply of `session` (a `struct fuse_session *`, inside `init`) grant parallel dirops.

    Returns True if the reply will carry the flag (or libfuse sends it itself); False if this libfuse,
    kernel or session layout does not allow it (lookups in a directory then stay one at a time).
    """
    wanted = FUSE_CAP_PARALLEL_DIROPS
    if not (conn_want & wanted and conn_capable & wanted):
        return False
    version = libfuse.fuse_version()
    if version >= _FIXED_FROM:
        return True
    session_fd = libfuse.fuse_session_fd
    session_fd.argtypes, session_fd.restype = [ctypes.c_void_p], ctypes.c_int
    custom_io = libfuse.fuse_session_custom_io
    custom_io.argtypes, custom_io.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    fd = session_fd(session)
    io_slot = ctypes.c_void_p.from_address(session + _SESSION_IO)
    if version < 313 or fd < 0 or ctypes.c_int.from_address(session + _SESSION_FD).value != fd or io_slot.value:
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
    if custom_io(session, ctypes.byref(io), fd) != 0 or not io_slot.value:
        return False
    copy = _CustomIo.from_address(io_slot.value)
    if (copy.writev, copy.read, copy.splice_send) != (io.writev, io.read, io.splice_send):
        return False  # not the layout checked above: the callback only passes replies on
    installed.append(copy)
    return True
