"""Publishing complete local Neuron cache modules back to the bucket (`mountctl push`, `--publish`).

One completion rule and one upload path serve both: `publishable_files` decides whether a local module may
be published and what of it, and `publish_modules` uploads the rest before the done markers (a separate
call), so no other node ever sees a `model.done` without its NEFF.

The local layer is written by the mount's clients (other users too, with `--allow-other`), and uploads
use the owner's token. So only regular files are published: every directory and file is opened relative
to its parent's fd with `O_NOFOLLOW`, anything else (a symlink, a FIFO, a device) is skipped with its
reason, and the upload reads each file through the fd checked here.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# Files held open per upload call (a module's files never split between calls but for its done marker):
# bounds the fds in use.
UPLOAD_BATCH_FILES = 256
DONE_MARKER = "model.done"

# (local path, path in the bucket) of each file of one upload.
Additions = list[tuple[str, str]]


@dataclass
class PushPlan:
    """What `push` would do: modules to upload, and modules or files skipped, each with the reason."""

    upload: list[tuple[str, Additions]] = field(default_factory=list)  # (module, [(local, remote)])
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module or module/file, reason)


@dataclass
class LocalModule:
    """One local module directory as seen through fds that follow no symlink."""

    reason: str | None  # why it must not be published now (None: it is complete)
    files: dict[str, int] = field(default_factory=dict)  # name -> size of each file to publish
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of entries never published


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink (never followed)"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _is_scratch(name: str) -> bool:
    return name.startswith(FUSE_HIDDEN_PREFIX) or COPYUP_MARK in name


def _entries(dir_fd: int) -> dict[str, os.stat_result]:
    """Name -> lstat of every entry of the directory open at `dir_fd`."""
    found = {}
    for name in os.listdir(dir_fd):
        try:
            found[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:  # removed since the listing
            continue
    return found


def _open_dir(upper: Path, rel: str) -> int:
    """Fd of directory `rel` under `upper`, each component opened without following a symlink."""
    dir_fd = os.open(upper, _DIR_FLAGS)
    try:
        for part in rel.split("/") if rel else ():
            parent, dir_fd = dir_fd, os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            os.close(parent)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def _subdirs(dir_fd: int, prefix: str, rel: str, skipped: list[tuple[str, str]]) -> list[str]:
    """Names of the real subdirectories named `prefix*`, in order; anything else in their place is skipped."""
    names = []
    for name, st in sorted(_entries(dir_fd).items()):
        if not name.startswith(prefix):
            continue
        if stat.S_ISDIR(st.st_mode):
            names.append(name)
        else:
            skipped.append((f"{rel}{name}", f"{_kind(st.st_mode)}, not a directory"))
    return names


def local_modules(upper: Path, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """`neuronxcc-*/MODULE_*` directories of a local layer, as bucket-relative paths.

    What stands in their place but is no directory (a symlink) goes to `skipped` with the reason.
    """
    skipped = [] if skipped is None else skipped
    try:
        upper_fd = _open_dir(upper, "")
    except (FileNotFoundError, NotADirectoryError):
        return []
    modules = []
    try:
        for version in _subdirs(upper_fd, VERSION_PREFIX, "", skipped):
            try:
                version_fd = os.open(version, _DIR_FLAGS, dir_fd=upper_fd)
            except OSError as exc:  # replaced by a symlink since the listing, or gone
                skipped.append((version, f"cannot open: {exc.strerror}"))
                continue
            try:
                modules += [f"{version}/{m}" for m in _subdirs(version_fd, MODULE_PREFIX, f"{version}/", skipped)]
            finally:
                os.close(version_fd)
    finally:
        os.close(upper_fd)
    return modules


def module_skip_reason(names: set[str], regular: set[str]) -> str | None:
    """Why a module holding entries `names`, of which `regular` are regular files, must not be published yet."""
    if any(is_lock_name(n) for n in names):
        return "in progress (a *.lock file is present)"
    if any(n.startswith(FUSE_HIDDEN_PREFIX) for n in names):
        # A lock deleted while its holder still has it open: the compile is still running.
        return "in progress (a file deleted while still open, .fuse_hidden*, is held)"
    if "model.log" in names and "model.neff" not in regular:
        return "failed compile (model.log without model.neff)"
    if not is_module_complete(regular - {"model.log"}):  # a complete module may keep a log of warnings
        return "incomplete (needs model.neff and model.done as regular files)"
    return None


def is_publishable_name(name: str) -> bool:
    """Files of a module that travel: not the compile log, locks, copy-up temps or FUSE's hidden files."""
    return not (name == "model.log" or is_lock_name(name) or _is_scratch(name))


def publishable_files(upper: Path, module: str) -> LocalModule:
    """The skip reason, or the regular files to upload, of local `module` (bucket-relative) under `upper`."""
    try:
        module_fd = _open_dir(upper, module)
    except FileNotFoundError:
        return LocalModule("removed")
    except OSError as exc:  # a component swapped for a symlink (ELOOP, ENOTDIR)
        return LocalModule(f"cannot open: {exc.strerror}")
    try:
        entries = _entries(module_fd)
    finally:
        os.close(module_fd)
    regular = {n for n, st in entries.items() if stat.S_ISREG(st.st_mode) and not _is_scratch(n)}
    reason = module_skip_reason(set(entries), regular)
    if reason:
        return LocalModule(reason)
    return LocalModule(
        None,
        files={n: entries[n].st_size for n in sorted(regular) if is_publishable_name(n)},
        skipped=[
            (n, f"{_kind(entries[n].st_mode)}: only regular files are published")
            for n in sorted(set(entries) - regular)
            if not _is_scratch(n)
        ],
    )


def unpublished(bucket: Bucket, module: str, files: dict[str, int]) -> dict[str, int]:
    """The `files` (name -> size) of `module` the bucket lacks or holds with another size.

    After an interrupted publish (the rest uploaded, the marker not) only what is missing goes again.
    """
    try:
        remote = {e.name: e.size for e in bucket.list(module) if not e.is_dir}
    except RemoteNotFound:
        return dict(files)
    return {n: size for n, size in files.items() if remote.get(n) != size}


def additions(bucket: Bucket, upper: Path, module: str, names: Iterable[str]) -> Additions:
    """(local path, path in the bucket) of each of a module's files `names`."""
    prefix = f"{bucket.prefix}/" if bucket.prefix else ""
    return [(str(upper / module / n), f"{prefix}{module}/{n}") for n in names]


def upload_to_bucket(api: Any, bucket_id: str, additions: Additions) -> None:
    """The one call that writes to a bucket (a seam: tests without Xet uploads replace only this)."""
    api.batch_bucket_files(bucket_id, add=additions)


def _open_module_files(upper: Path, rel: str, names: list[str]) -> list[int]:
    """Fds of the module's regular files, each reached without following any symlink under `upper`.

    Raises OSError (ELOOP, ENOENT, ...) or ValueError (not a regular file any more) if one changed.
    """
    fds: list[int] = []
    dir_fd = _open_dir(upper, rel)
    try:
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


def _batches(modules: Sequence[tuple[str, Additions]]) -> Iterator[list[tuple[str, Additions]]]:
    """Whole modules, at most UPLOAD_BATCH_FILES files a batch (a larger module goes alone)."""
    batch: list[tuple[str, Additions]] = []
    count = 0
    for module, files in modules:
        if batch and count + len(files) > UPLOAD_BATCH_FILES:
            yield batch
            batch, count = [], 0
        batch.append((module, files))
        count += len(files)
    if batch:
        yield batch


def _upload(api: Any, bucket: Bucket, upper: Path, part: list[tuple[str, Additions]], changed: dict[str, str]) -> None:
    """One upload call of the files in `part`, each read through an fd checked to be a regular file.

    A module whose files cannot be opened so (swapped for a symlink, removed) goes to `changed` instead.
    """
    fds: list[int] = []
    add: Additions = []
    try:
        for module, files in part:
            try:
                opened = _open_module_files(upper, module, [Path(local).name for local, _ in files])
            except (OSError, ValueError) as exc:
                changed[module] = f"changed since it was checked: {getattr(exc, 'strerror', None) or exc}"
                continue
            fds += opened
            # huggingface_hub takes paths or bytes, not file objects: /proc/self/fd/N opens the very file
            # checked above (no symlink is resolved again), and keeps large NEFFs out of memory.
            add += [(f"/proc/self/fd/{fd}", remote) for fd, (_, remote) in zip(opened, files, strict=True)]
        if add:
            upload_to_bucket(api, bucket.bucket_id, add)
    finally:
        for fd in fds:
            os.close(fd)


def publish_modules(api: Any, bucket: Bucket, upper: Path, modules: Sequence[tuple[str, Additions]]) -> dict[str, str]:
    """Upload the files of `modules` from the local layer `upper`; returns module -> reason of those left out
    because they changed since they were checked. Upload errors propagate.

    Each batch's `model.done` files go in a second call once all the rest succeeded: `batch_bucket_files`
    may split a batch and apply part of it, so with the markers last a failure can leave a module without
    its marker (invisible to compilers, published again later), never a marker alone.
    """
    logger.info(
        "publishing %d files of %d modules to %s", sum(len(f) for _, f in modules), len(modules), bucket.bucket_id
    )
    changed: dict[str, str] = {}
    for batch in _batches(modules):
        for markers in (False, True):
            part = [
                (module, [pair for pair in files if (Path(pair[0]).name == DONE_MARKER) == markers])
                for module, files in batch
                if module not in changed
            ]
            _upload(api, bucket, upper, [(module, files) for module, files in part if files], changed)
    return changed


def plan_push(upper: Path, bucket: Bucket) -> PushPlan:
    """Select the local modules that are complete (neff + done, no lock, no log) and not yet published."""
    plan = PushPlan()
    for rel in local_modules(upper, plan.skipped):
        local = publishable_files(upper, rel)
        reason = local.reason
        if reason is None:
            plan.skipped += [(f"{rel}/{name}", why) for name, why in local.skipped]
            files = unpublished(bucket, rel, local.files)
            if not files:
                reason = "already published (same files and sizes in the bucket)"
        if reason:
            plan.skipped.append((rel, reason))
            continue
        plan.upload.append((rel, additions(bucket, upper, rel, files)))
    return plan


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
    changed = publish_modules(api or HfApi(endpoint=http.endpoint), bucket, upper, plan.upload)
    plan.skipped += [(module, f"not pushed: {reason}") for module, reason in changed.items()]
    plan.upload = [(module, files) for module, files in plan.upload if module not in changed]
    return plan
