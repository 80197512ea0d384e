"""Publishing complete local Neuron cache modules back to the bucket (`mountctl push`).

The local layer is written by the mount's clients (other users too, with `--allow-other`), and push
uploads with the owner's token. So it publishes regular files only: every directory and file is
opened relative to its parent's fd with `O_NOFOLLOW`, anything else (a symlink, a FIFO, a device) is
skipped with its reason, and the upload reads each file through the fd checked here.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MountError, RemoteNotFound
from .remote.bucket import Bucket
from .remote.http import HubHttp
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name, is_module_complete

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the listing must not block the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# libfuse renames a file deleted while still open to `.fuse_hidden<id>`: often a compiler's held lock.
FUSE_HIDDEN_PREFIX = ".fuse_hidden"
# A copy-up in progress writes a private temp file named `<target>.hffs-copyup.<pid>.<tid>`.
COPYUP_MARK = ".hffs-copyup."
# Files held open per upload call (a module's files always go in one call): bounds the fds in use.
UPLOAD_BATCH_FILES = 256


@dataclass
class PushPlan:
    """What `push` would do: modules to upload, and modules or files skipped, each with the reason."""

    upload: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # (module, [(local, remote)])
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module or module/file, reason)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink (never followed)"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _entries(dir_fd: int) -> dict[str, os.stat_result]:
    """Name -> lstat of every entry of the directory open at `dir_fd`."""
    found = {}
    for name in os.listdir(dir_fd):
        try:
            found[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:  # removed since the listing
            continue
    return found


def _subdirs(dir_fd: int, prefix: str, rel: str, plan: PushPlan) -> Iterator[tuple[str, int]]:
    """(name, fd) of each real subdirectory named `prefix*`, in order; a symlink in their place is skipped."""
    for name, st in sorted(_entries(dir_fd).items()):
        if not name.startswith(prefix):
            continue
        if not stat.S_ISDIR(st.st_mode):
            plan.skipped.append((f"{rel}{name}", f"{_kind(st.st_mode)}, not a directory"))
            continue
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:  # replaced by a symlink since the listing, or gone
            plan.skipped.append((f"{rel}{name}", f"cannot open: {exc.strerror}"))
            continue
        try:
            yield name, fd
        finally:
            os.close(fd)


def _module_reason(entries: dict[str, os.stat_result], regular: set[str]) -> str | None:
    """Why a module must not be published now, or None when it is complete."""
    if any(is_lock_name(n) for n in entries):
        return "in progress (a *.lock file is present)"
    if any(n.startswith(FUSE_HIDDEN_PREFIX) for n in entries):
        # A lock deleted while its holder still has it open: the compile is still running.
        return "in progress (a file deleted while still open, .fuse_hidden*, is held)"
    if "model.log" in entries and "model.neff" not in regular:
        return "failed compile (model.log without model.neff)"
    if not is_module_complete(regular - {"model.log"}):
        return "incomplete (needs model.neff and model.done as regular files)"
    return None


def plan_push(upper: Path, bucket: Bucket) -> PushPlan:
    """Select the local modules that are complete (neff + done, no lock, no log) and not yet published."""
    plan = PushPlan()
    try:
        upper_fd = os.open(upper, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return plan
    try:
        for version, version_fd in _subdirs(upper_fd, VERSION_PREFIX, "", plan):
            for module, module_fd in _subdirs(version_fd, MODULE_PREFIX, f"{version}/", plan):
                _plan_module(plan, upper, f"{version}/{module}", _entries(module_fd), bucket)
    finally:
        os.close(upper_fd)
    return plan


def _plan_module(plan: PushPlan, upper: Path, rel: str, entries: dict[str, os.stat_result], bucket: Bucket) -> None:
    scratch = {n for n in entries if n.startswith(FUSE_HIDDEN_PREFIX) or COPYUP_MARK in n}
    regular = {n for n, st in entries.items() if stat.S_ISREG(st.st_mode) and n not in scratch}
    reason = _module_reason(entries, regular)
    if reason:
        plan.skipped.append((rel, reason))
        return
    for name in sorted(set(entries) - regular - scratch):
        plan.skipped.append((f"{rel}/{name}", f"{_kind(entries[name].st_mode)}: only regular files are published"))
    files = sorted(regular - {"model.log"})
    try:
        remote = {e.name: e for e in bucket.list(rel) if not e.is_dir}
    except RemoteNotFound:
        remote = {}
    if remote and all(n in remote and remote[n].size == entries[n].st_size for n in files):
        plan.skipped.append((rel, "already published (same files and sizes in the bucket)"))
        return
    plan.upload.append((rel, [(str(upper / rel / n), _remote_path(bucket, f"{rel}/{n}")) for n in files]))


def _remote_path(bucket: Bucket, rel: str) -> str:
    return f"{bucket.prefix}/{rel}" if bucket.prefix else rel


def _open_module_files(upper: Path, rel: str, names: list[str]) -> list[int]:
    """Fds of the module's regular files, each reached without following any symlink under `upper`.

    Raises OSError (ELOOP, ENOENT, ...) or ValueError (not a regular file any more) if one changed.
    """
    fds: list[int] = []
    dir_fd = os.open(upper, _DIR_FLAGS)
    try:
        for part in rel.split("/"):
            parent, dir_fd = dir_fd, os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            os.close(parent)
        for name in names:
            fds.append(os.open(name, _FILE_FLAGS, dir_fd=dir_fd))
            if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
                raise ValueError(f"{name} is no longer a regular file")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        os.close(dir_fd)
    return fds


def _upload_batches(plan: PushPlan) -> Iterator[list[tuple[str, list[tuple[str, str]]]]]:
    batch: list[tuple[str, list[tuple[str, str]]]] = []
    count = 0
    for module, files in plan.upload:
        if batch and count + len(files) > UPLOAD_BATCH_FILES:
            yield batch
            batch, count = [], 0
        batch.append((module, files))
        count += len(files)
    if batch:
        yield batch


def push(state: dict, *, dry_run: bool = False, api: object | None = None) -> PushPlan:
    """Publish the complete local modules of the NEFF mount described by runtime `state`."""
    from huggingface_hub import HfApi

    if state.get("view") != "neff":
        raise MountError(f"{state.get('mountpoint')}: push works on NEFF mounts only")
    layer = state.get("layer_dir")
    if not layer:
        raise MountError(f"{state.get('mountpoint')}: the mount's runtime state has no local layer")
    http = HubHttp(state.get("endpoint"))
    bucket = Bucket(http, state["source"], state.get("options", {}).get("prefix"))
    upper = Path(layer) / "upper"
    plan = plan_push(upper, bucket)
    if dry_run or not plan.upload:
        return plan
    api = api or HfApi(endpoint=http.endpoint)
    pushed = []
    for batch in _upload_batches(plan):
        fds: list[int] = []
        additions: list[tuple[str, str]] = []
        try:
            for module, files in batch:
                try:
                    opened = _open_module_files(upper, module, [Path(local).name for local, _ in files])
                except (OSError, ValueError) as exc:
                    plan.skipped.append((module, f"changed during push: {getattr(exc, 'strerror', None) or exc}"))
                    continue
                fds += opened
                # huggingface_hub takes paths or bytes, not file objects: /proc/self/fd/N opens the very
                # file checked above (no symlink is resolved again), and keeps large NEFFs out of memory.
                additions += [(f"/proc/self/fd/{fd}", remote) for fd, (_, remote) in zip(opened, files, strict=True)]
                pushed.append((module, files))
            if additions:
                logger.info("pushing %d files to %s", len(additions), bucket.bucket_id)
                api.batch_bucket_files(bucket.bucket_id, add=additions)  # type: ignore[attr-defined]
        finally:
            for fd in fds:
                os.close(fd)
    plan.upload = pushed
    return plan
