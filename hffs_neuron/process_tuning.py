"""Process-level tuning of the mount daemon: memory, descriptors, core dumps, socket reads, readahead.

Everything here changes how the daemon process (or the kernel's view of its mount) behaves, never
what it serves. `tune_process()` runs first thing in `daemon.serve`; `with_huge_page_malloc` is applied
by `mount.mount` to the daemon's environment (glibc reads its tunables only when a process starts);
`tune_readahead` runs once the mount is up and its device number is known.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource

logger = logging.getLogger(__name__)

# The mount's block-device readahead (KiB): sequential reads then arrive as 1 MiB FUSE requests.
READ_AHEAD_KB = 16 * 1024
PR_SET_DUMPABLE = 4
# Bytes one socket read of a download may return: one Python-level iteration (HTTP parsing, our sink)
# per up to 512 KiB instead of per 64 KiB (httpcore's default). Not 1 MiB: at the daemon's 1 MiB mmap
# threshold every read buffer would be a fresh mapping (measured +1.5 s of system CPU per GiB).
HTTP_READ_BYTES = 512 * 1024
_HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def tune_process() -> None:
    """All the in-process tuning of a daemon, before it starts any thread."""
    disable_core_dumps()
    raise_fd_limit()
    bound_malloc()
    tune_http_reads()


def disable_core_dumps() -> None:
    """No core dump, and no same-user ptrace or /proc/<pid>/mem reads: the daemon holds the token and
    bytes of private repos in memory (RLIMIT_CORE 0 and PR_SET_DUMPABLE 0)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not glibc/Linux: the rlimit above still applies
        logger.debug("prctl unavailable; only RLIMIT_CORE limits core dumps")


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every open blob, upload and connection holds a descriptor,
    and running out (EMFILE) fails readers and can end daemon threads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # e.g. an unlimited hard limit above fs.nr_open
        logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)


def bound_malloc() -> None:
    """Keep the daemon's memory flat under many parallel readers (glibc only; a no-op elsewhere).

    glibc gives every busy thread (libfuse workers, range downloads) its own arena, and after the first
    free of a large block serves large buffers from arenas that never shrink: measured 330 MB peak for
    8 cold 256 MiB readers. Two arenas and a fixed 1 MiB mmap threshold (libfuse's 1 MiB request
    buffers are mapped and unmapped; download pieces, ~64 KiB, stay on the heap where mapping each one
    would slow transfers) bring that to about 75 MB. (A threshold above 1 MiB brings the peak back over
    200 MB.) Mapped blocks get transparent huge pages: `with_huge_page_malloc`.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable; memory tuning skipped")


def with_huge_page_malloc(tunables: str | None) -> str:
    """The daemon's `GLIBC_TUNABLES` (glibc reads them only when a process starts): `tunables` plus
    transparent huge pages for the blocks malloc maps.

    Under the daemon's 1 MiB mmap threshold (`bound_malloc`, which keeps its memory flat) every
    large block is a fresh mapping: hf_xet's buffers and the bytes its streams return are 13-24 MiB each,
    and faulting them in 4 KiB at a time cost ~0.5 s of system time per GiB fetched over Xet (1 GiB,
    loopback, 2 cores: the fill took 2.1-2.3 s, with huge pages 1.6-1.7 s; peak memory unchanged). A
    value the user set for the same tunable wins; other C libraries ignore the variable.
    """
    if not tunables:
        return _HUGE_PAGE_MALLOC
    if "glibc.malloc.hugetlb=" in tunables:
        return tunables
    return f"{tunables}:{_HUGE_PAGE_MALLOC}"


def tune_http_reads(size: int = HTTP_READ_BYTES) -> None:
    """Larger socket reads for this process's HTTP/1.1 connections (skipped if the attribute moved)."""
    try:
        from httpcore2._sync.http11 import HTTP11Connection
    except ImportError:
        return
    if isinstance(getattr(HTTP11Connection, "READ_NUM_BYTES", None), int):
        HTTP11Connection.READ_NUM_BYTES = size


def tune_readahead(device: int, kb: int = READ_AHEAD_KB) -> None:
    """Raise the mount's block-device readahead (default 128 KiB) so sequential reads arrive as 1 MiB
    FUSE requests. Needs root (sysfs); skipped (logged at debug) otherwise."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        logger.debug("could not set %s: %s", path, exc)
