"""Runtime bookkeeping shared by the daemon and the API: state files and mountpoint checks.

- State files: one JSON file per mount in `constants.RUNTIME_DIR`, written by the daemon (pid, options,
  counters) and read by `status`, `unmount`, `prefetch` and `push` when the daemon does not answer. The
  directory is looked up on every call, never cached, so it can be redirected (tests patch
  `constants.RUNTIME_DIR`).
- The mount table (`hffs_mounts`, from /proc/self/mountinfo) and each mount's control socket
  (`control_address`, derived from the mountpoint): how `status` finds and asks every hffs mount.
- Mountpoint checks: is it usable, mounted, stale (dead daemon) or busy, and by whom; `fusermount`.
- Private files: the runtime dir is owner-only (0700), state and log files 0600, and none of them is
  ever reached through a symlink another user planted (`O_NOFOLLOW`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import constants
from .errors import MountError
from .proc import pid_alive

logger = logging.getLogger(__name__)

# fusermount only talks to the kernel, but a wedged FUSE connection must not hang the caller forever.
FUSERMOUNT_TIMEOUT = 30.0


# -- private files and directories ------------------------------------------------------------------
def ensure_private_dir(path: Path) -> None:
    """Create `path` owner-only (0700); an existing one must be ours and is tightened with a warning.

    Never through a symlink: another user could point the path at a directory of their choosing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"{path}: cannot use as a private directory: {_why(path, exc)}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise MountError(f"{path}: owned by uid {st.st_uid}, not by you: refusing to use it")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            logger.warning("%s: was mode %o, open to other users; tightening it to 0700", path, mode)
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def open_private_file(path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open (creating it 0600) a file only this user may read: a log or a state file.

    A symlink at `path` is refused (`O_NOFOLLOW`), so a link another user planted never makes us write
    to its target; an existing file must be ours and is tightened to 0600.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MountError(f"{path}: cannot open: {_why(path, exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):  # --log-file /dev/null: nothing stored, nothing to tighten
            return fd
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise MountError(f"{path}: not a regular file of yours: refusing to write to it")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(path: str | os.PathLike, exc: OSError) -> str:
    if os.path.islink(path):
        return "it is a symbolic link (never followed)"
    return exc.strerror or str(exc)


# -- runtime state files ------------------------------------------------------------------------
def state_path(mountpoint: str) -> Path:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return constants.RUNTIME_DIR / f"{digest}.json"


def control_address(mountpoint: str) -> str:
    """The control socket of the mount at `mountpoint` (see `telemetry.StatusServer`): an abstract
    AF_UNIX name derived from the mountpoint alone, so `mountctl status` reaches the daemon of any mount
    it finds in /proc/self/mountinfo, whatever runtime dir started it. The daemon answers its own user
    and root only (SO_PEERCRED), and the client checks that the peer is the mount's user."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return f"\0hffs-neuron/{digest}"


def _load_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # gone, or caught mid-replace by an old writer: not a mount
        return None


def read_states() -> list[dict]:
    """Runtime state of every mount this user started (stale ones included, marked by `alive`)."""
    states = []
    if not constants.RUNTIME_DIR.is_dir():
        return states
    for path in sorted(constants.RUNTIME_DIR.glob("*.json")):
        state = _load_state(path)
        if state is None:
            continue
        state["alive"] = pid_alive(state.get("pid", -1))
        states.append(state)
    return states


def read_state(mountpoint: str) -> dict | None:
    """The recorded state of the mount at `mountpoint`, or None."""
    return _load_state(state_path(mountpoint))


def write_state(mountpoint: str, data: dict) -> None:
    """Record `data` as the state of the mount at `mountpoint` (atomically: readers never see half)."""
    path = state_path(mountpoint)
    ensure_private_dir(path.parent)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with os.fdopen(open_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def forget_state(mountpoint: str) -> None:
    try:
        state_path(mountpoint).unlink()
    except FileNotFoundError:
        pass


# -- mountpoint checks --------------------------------------------------------------------------
def mountpoint_status(path: str) -> str:
    """ "ok", "missing", "not-a-directory", "not-empty", "mounted" or "stale" (dead FUSE daemon)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "stale"
        raise
    if os.path.ismount(path):
        # The kernel answers stat of the root from its attribute cache even after the daemon died
        # (kill -9): statfs always reaches the daemon, so it tells a live mount from a stale one.
        try:
            os.statvfs(path)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return "stale"
            raise
        return "mounted"
    if not os.path.isdir(path):
        return "not-a-directory"
    if os.listdir(path):
        return "not-empty"
    return "ok"


def fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name)
        if found:
            return found
    raise MountError("fusermount3 not found: install FUSE 3 (sudo apt-get install -y fuse3 libfuse3-3)")


def fusermount_unmount(mountpoint: str, *, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `fusermount3 -u [-z] mountpoint`; the caller looks at the return code and stderr."""
    args = [fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        # errors="replace": its messages echo the mountpoint, which may not be valid UTF-8.
        return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=FUSERMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise MountError(
            f"{mountpoint}: fusermount did not finish within {FUSERMOUNT_TIMEOUT:.0f}s; "
            f"run: fusermount3 -uz {mountpoint}"
        ) from exc


def lazy_unmount(mountpoint: str) -> None:
    fusermount_unmount(mountpoint, lazy=True)


def check_fuse_available() -> None:
    """Raise a one-line MountError naming what to install if FUSE cannot work here."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the fuse kernel module or run the container with --device /dev/fuse"
        )
    fusermount()
    # Found the way mfusepy looks for it (fuse_ops sets FUSE_LIBRARY_NAME=fuse3): a missing library
    # would otherwise only surface as an import error inside the daemon.
    from ctypes.util import find_library

    path = os.environ.get("FUSE_LIBRARY_PATH")
    if path:
        if not os.path.exists(path):
            raise MountError(f"libfuse not found at FUSE_LIBRARY_PATH={path}")
    elif not find_library(os.environ.get("FUSE_LIBRARY_NAME", "fuse3")):
        raise MountError("libfuse3 not found: install it (sudo apt-get install -y fuse3 libfuse3-3)")


def check_mountpoint(mountpoint: str) -> None:
    """Raise a one-line MountError unless `mountpoint` can be mounted on (recovering a stale mount)."""
    status = mountpoint_status(mountpoint)
    if status == "stale":
        logger.warning("%s: stale mount of a dead daemon; unmounting it", mountpoint)
        lazy_unmount(mountpoint)
        status = mountpoint_status(mountpoint)
        if status == "stale":
            raise MountError(f"{mountpoint}: stale mount could not be cleared; run: fusermount3 -uz {mountpoint}")
    messages = {
        "missing": f"{mountpoint}: mountpoint does not exist; create it with: mkdir -p {mountpoint}",
        "not-a-directory": f"{mountpoint}: mountpoint is not a directory",
        "not-empty": f"{mountpoint}: mountpoint is not empty; use an empty directory",
        "mounted": f"{mountpoint}: already mounted; unmount it first with: mountctl umount {mountpoint}",
    }
    if status in messages:
        raise MountError(messages[status])


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where, what type, which source (fsname), and for FUSE the uid
    of the daemon that mounted it (`user_id=`)."""

    mountpoint: str
    fstype: str
    source: str
    uid: int | None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # "\040" is a space


def mount_table() -> list[MountEntry]:
    """Every mount of this mount namespace, in /proc/self/mountinfo's order (a later one stacks on top)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields:
            continue
        after = fields[fields.index("-") + 1 :]  # fstype, source, super options
        options = dict(o.partition("=")[::2] for o in after[2].split(",")) if len(after) > 2 else {}
        uid = options.get("user_id", "")
        table.append(
            MountEntry(_unescape(fields[4]), after[0], _unescape(after[1]), int(uid) if uid.isdigit() else None)
        )
    return table


def fuse_fstype(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at `mountpoint` (e.g. "fuse.hffs"), from /proc/self/mountinfo."""
    wanted = os.path.abspath(mountpoint)
    found = [m.fstype for m in mount_table() if m.mountpoint == wanted]
    return found[-1] if found else None  # the last one wins: mounts stack


def hffs_mounts() -> list[MountEntry]:
    """Every hffs mount on the host (this mount namespace), whoever made it and whatever runtime dir
    recorded it: the topmost of each mountpoint."""
    top = {m.mountpoint: m for m in mount_table()}
    return [m for m in top.values() if m.fstype == "fuse.hffs"]


def users_of(mountpoint: str) -> list[str]:
    """Processes keeping `mountpoint` busy, as "name (pid N)": working directory, root or open files inside it."""
    root = os.path.realpath(mountpoint)
    inside = (root, root.rstrip("/") + "/")
    users = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        links = [f"/proc/{entry.name}/cwd", f"/proc/{entry.name}/root"]
        try:
            links += [f"/proc/{entry.name}/fd/{fd}" for fd in os.listdir(f"/proc/{entry.name}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)  # never touches the FUSE mount itself
            except OSError:
                continue
            if target == inside[0] or target.startswith(inside[1]):
                try:
                    name = Path(f"/proc/{entry.name}/comm").read_text().strip()
                except OSError:
                    name = "?"
                users.append(f"{name} (pid {entry.name})")
                break
    return users
