"""Process liveness and identity, shared by the mount runtime (daemon state files) and the blob store (temp files)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import constants


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and can still do something: a zombie counts as dead.

    A daemon started by a CLI that has exited is reparented; where nobody reaps it (PID 1 of many
    containers does not), a dead daemon lingers as a zombie that kill(0) still reports alive. A zombie
    serves no mount and writes no temp file, so for every caller here it is gone.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (or it exited just now): trust kill(0)
        return True
    # The state field follows the command name, which is in parentheses and may itself contain ")".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


#: This host's name, safe in file names: temp files and NEFF layers carry it, so hosts sharing a cache
#: directory (a cluster filesystem) never clean up or reuse each other's.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", constants.HOST_NAME or "localhost")


def _read_proc(path: str) -> bytes:
    """One raw read of a small /proc file (these run on every create of a local entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def thread_group_id(tid: int) -> int:
    """The process (thread-group id) that thread `tid` belongs to, from `/proc/<tid>/status` `Tgid:`;
    0 if unknown (tid 0: another pid namespace; or the thread has exited).

    FUSE's request context names the calling thread: a lock must belong to its process, which outlives
    the worker thread that created it.
    """
    if tid <= 0:
        return 0
    try:
        status = _read_proc(f"/proc/{tid}/status")
    except OSError:
        return 0
    start = status.find(b"\nTgid:")
    if start < 0:
        return 0
    try:
        return int(status[start + 6 : status.index(b"\n", start + 1)])
    except ValueError:
        return 0


def pid_start_time(pid: int) -> int:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); 0 if unknown.

    With the pid it identifies a process across pid reuse. Pid 0 (a caller in another pid namespace)
    is unknown.
    """
    if pid <= 0:
        return 0
    try:
        stat = _read_proc(f"/proc/{pid}/stat")
    except OSError:
        return 0
    fields = stat.rpartition(b")")[2].split()  # fields 3.. (the command name may contain spaces)
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return 0
