"""Process liveness, shared by the mount runtime (daemon state files) and the blob store (temp files)."""

from __future__ import annotations

import os
from pathlib import Path


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
