"""Publishing complete local Neuron cache modules back to the bucket (`mountctl push`, `--publish`).

One completion rule and one upload path serve both: `publishable_files` decides whether a local module may
be published and what of it, and `publish_modules` uploads the rest before the done markers (a separate
call), so no other node ever sees a `model.done` without its NEFF.

The local layer is written by the mount's clients (other users too, with `--allow-other`), and uploads
use the owner's token, for every node of the fleet to load. So (README "Security model"):
- only trusted writers publish: a module is published only if every file in it was created, and every
  write to it made, by the owner, root or a `--publish-from` user or group (`Checks.untrusted`);
- only finished modules: neff and done marker, no lock, no file open for writing through the mount, the
  marker not older than any published file, within the size and file-count bounds, nothing sparse;
- the bucket is compared by content (xet hashes, cached by inode, size and mtime), never by size: a
  module the bucket holds with other content is a conflict, never overwritten;
- only regular files: every directory and file is opened relative to its parent's fd with `O_NOFOLLOW`,
  anything else (a symlink, a FIFO, a device) is skipped with its reason, and the upload reads each file
  through the fd checked here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants
from .errors import MountError, RemoteNotFound
from .publish_checks import Checks, HashCache, TrustedWriters
from .remote.bucket import Bucket
from .remote.http import HubHttp
from .upload_worker import run_upload
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name, is_module_complete

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the listing must not block the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# libfuse renames a file deleted while still open to `.fuse_hidden<id>`: often a compiler's held lock.
FUSE_HIDDEN_PREFIX = ".fuse_hidden"
# A copy-up in progress writes a private temp file named `<target>.hffs-copyup.<pid>.<tid>`.
COPYUP_MARK = ".hffs-copyup."
# Files held open per upload call: bounds the fds an upload holds (a larger module goes in several calls,
# its done marker in the last).
UPLOAD_BATCH_FILES = 16
# A module of more files than this is refused (a compile writes about five).
MAX_MODULE_FILES = 64
DONE_MARKER = "model.done"

# (local path, path in the bucket) of each file of one upload.
Additions = list[tuple[str, str]]


@dataclass
class PushPlan:
    """What `push` would do: modules to upload, and modules or files skipped, each with the reason."""

    upload: list[Upload] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module or module/file, reason)
    notes: dict[str, str] = field(default_factory=dict)  # module -> what to say beside it (untrusted, included)


@dataclass
class LocalModule:
    """One local module directory as seen through fds that follow no symlink."""

    reason: str | None  # why it must not be published now (None: it is complete)
    files: dict[str, os.stat_result] = field(default_factory=dict)  # name -> lstat of each file to publish
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of entries never published
    # The reason holds until the module changes (untrusted, too large, sparse), unlike "not finished yet".
    refused: bool = False
    untrusted: tuple[int, int] | None = None  # (an untrusted uid, how many files or writes it touched)


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


def _unfinished_reason(
    entries: dict[str, os.stat_result], files: dict[str, os.stat_result], checks: Checks
) -> str | None:
    """Why a module whose names say "complete" is still being written, or None."""
    writing = checks.writing()
    if writing and any((st.st_dev, st.st_ino) in writing for st in entries.values()):
        return "in progress (a file is open for writing through the mount)"
    done = files[DONE_MARKER].st_mtime_ns
    later = sorted(n for n, st in files.items() if st.st_mtime_ns > done)
    if later:
        return f"in progress ({later[0]} changed after model.done)"
    return None


def _bounds_reason(module_fd: int, files: dict[str, os.stat_result], checks: Checks) -> str | None:
    """Why a finished module is refused for its size, or None: too many files, too many bytes, or sparse."""
    if len(files) > MAX_MODULE_FILES:
        return f"refused: {len(files)} files, more than the {MAX_MODULE_FILES} a module may publish"
    total = sum(st.st_size for st in files.values())
    if total > checks.max_bytes:
        return f"refused: {total} bytes, more than --publish-max-bytes {checks.max_bytes}"
    for name, st in files.items():
        if st.st_size == 0:
            continue
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=module_fd)
        except OSError as exc:
            return f"in progress ({name}: {exc.strerror})"
        try:
            if os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size:
                return f"refused: {name} is sparse (holes before its end): not a finished file"
        finally:
            os.close(fd)
    return None


def publishable_files(upper: Path, module: str, checks: Checks | None = None) -> LocalModule:
    """The skip reason, or the regular files to upload, of local `module` (bucket-relative) under `upper`.

    Without `checks`, only the names are judged (`push --dry-run` of a module others may still write).
    """
    try:
        module_fd = _open_dir(upper, module)
    except FileNotFoundError:
        return LocalModule("removed")
    except OSError as exc:  # a component swapped for a symlink (ELOOP, ENOTDIR)
        return LocalModule(f"cannot open: {exc.strerror}")
    try:
        entries = _entries(module_fd)
        regular = {n for n, st in entries.items() if stat.S_ISREG(st.st_mode) and not _is_scratch(n)}
        reason = module_skip_reason(set(entries), regular)
        if reason:
            return LocalModule(reason)
        files = {n: entries[n] for n in sorted(regular) if is_publishable_name(n)}
        if checks is not None:
            if untrusted := checks.untrusted(module, entries):
                uid, count = untrusted
                reason = f"untrusted: uid {uid} created or wrote {count} of its files (see --publish-from)"
                return LocalModule(reason, refused=True, untrusted=untrusted)
            reason = _unfinished_reason(entries, files, checks)
            if reason:
                return LocalModule(reason)
            reason = _bounds_reason(module_fd, files, checks)
            if reason:
                return LocalModule(reason, refused=True)
    finally:
        os.close(module_fd)
    return LocalModule(
        None,
        files=files,
        skipped=[
            (n, f"{_kind(entries[n].st_mode)}: only regular files are published")
            for n in sorted(set(entries) - regular)
            if not _is_scratch(n)
        ],
    )


@dataclass
class Comparison:
    """A local module against the bucket: what to upload, or the conflict that forbids it."""

    upload: list[str]
    conflict: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)  # name -> local xet hash of each file


def local_hashes(upper: Path, module: str, names: Iterable[str], hashes: HashCache) -> dict[str, str]:
    """name -> xet hash of each of the module's files (through fds that follow no symlink)."""
    out = {}
    dir_fd = _open_dir(upper, module)
    try:
        for name in names:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            try:
                out[name] = hashes.hash_of(f"{module}/{name}", fd)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    hashes.save()
    return out


def remote_hashes(bucket: Bucket, module: str) -> dict[str, str | None]:
    """name -> xet hash of each file the bucket holds in `module` (None where it lists none)."""
    try:
        return {e.name: e.xet_hash for e in bucket.list(module) if not e.is_dir}
    except RemoteNotFound:
        return {}


def compare(bucket: Bucket, upper: Path, module: str, files: Iterable[str], hashes: HashCache) -> Comparison:
    """What of `files` the bucket lacks; a conflict where it holds any of them with other content.

    After an interrupted publish (the rest uploaded, the marker not) only what is missing goes again;
    a module the bucket already holds complete with the same content needs nothing.
    """
    mine = local_hashes(upper, module, files, hashes)
    theirs = remote_hashes(bucket, module)
    differ = sorted(n for n, h in mine.items() if n in theirs and theirs[n] != h)
    if differ:
        return Comparison([], f"conflict: the bucket holds {module}/{differ[0]} with other content", mine)
    if DONE_MARKER in theirs:
        return Comparison([], None, mine)  # published (the first good copy): extra local files stay local
    return Comparison(sorted(n for n in mine if n not in theirs), None, mine)


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


@dataclass
class Upload:
    """One module to upload: its files (local path, path in the bucket), what was checked of each (lstat,
    re-checked after the upload), and the local hashes the bucket must hold afterwards."""

    module: str
    files: Additions
    checked: dict[str, os.stat_result] = field(default_factory=dict)  # name -> lstat
    hashes: dict[str, str] = field(default_factory=dict)  # name -> xet hash of every file of the module


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batches(modules: Sequence[Upload]) -> Iterator[list[Upload]]:
    """Whole modules, at most UPLOAD_BATCH_FILES files a batch (a larger module goes alone)."""
    batch: list[Upload] = []
    count = 0
    for upload in modules:
        if batch and count + len(upload.files) > UPLOAD_BATCH_FILES:
            yield batch
            batch, count = [], 0
        batch.append(upload)
        count += len(upload.files)
    if batch:
        yield batch


def _same_file(st: os.stat_result, checked: os.stat_result | None) -> bool:
    if checked is None:
        return True
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (checked.st_ino, checked.st_size, checked.st_mtime_ns)


def _upload(
    api: Any,
    bucket: Bucket,
    upper: Path,
    part: list[tuple[Upload, Additions]],
    changed: dict[str, str],
    stall_timeout: float,
) -> None:
    """One upload call of the files in `part`, each read through an fd checked to be a regular file (in
    a worker process unless an `api` object is given: see `run_upload`).

    A module whose files cannot be opened so (swapped for a symlink, removed), or whose files are not the
    ones checked before or after the call (the bytes uploaded must be those on disk), goes to `changed`.
    """
    fds: list[tuple[Upload, str, int]] = []
    add: Additions = []
    try:
        for upload, files in part:
            names = [Path(local).name for local, _ in files]
            try:
                opened = _open_module_files(upper, upload.module, names)
            except (OSError, ValueError) as exc:
                changed[upload.module] = f"changed since it was checked: {getattr(exc, 'strerror', None) or exc}"
                continue
            fds += [(upload, name, fd) for name, fd in zip(names, opened, strict=True)]
            # huggingface_hub takes paths or bytes, not file objects: /proc/self/fd/N opens the very file
            # checked above (no symlink is resolved again), and keeps large NEFFs out of memory.
            add += [(f"/proc/self/fd/{fd}", remote) for fd, (_, remote) in zip(opened, files, strict=True)]
        if not add:
            return
        before = {fd: os.fstat(fd) for _, _, fd in fds}
        if api is None:
            run_upload(bucket.endpoint, bucket.bucket_id, add, [fd for _, _, fd in fds], stall_timeout)
        else:
            upload_to_bucket(api, bucket.bucket_id, add)
        for upload, name, fd in fds:
            st = os.fstat(fd)
            if not (_same_file(st, upload.checked.get(name)) and _same_file(st, before[fd])):
                changed[upload.module] = f"{name} changed while it was published: published again once finished"
    finally:
        for _, _, fd in fds:
            os.close(fd)


def publish_modules(
    api: Any,
    bucket: Bucket,
    upper: Path,
    modules: Sequence[Upload],
    *,
    stall_timeout: float = constants.OPERATION_TIMEOUT,
) -> dict[str, str]:
    """Upload the files of `modules` from the local layer `upper`; returns module -> reason of those left out
    because they changed since they were checked. Upload errors propagate. `api` None: each call runs in
    a worker process, stopped when no byte moved for `stall_timeout` seconds.

    Each batch's `model.done` files go in calls after all the rest succeeded: `batch_bucket_files` may
    split a batch and apply part of it, so with the markers last a failure can leave a module without its
    marker (invisible to compilers, published again later), never a marker alone.
    """
    logger.info(
        "publishing %d files of %d modules to %s", sum(len(u.files) for u in modules), len(modules), bucket.bucket_id
    )
    changed: dict[str, str] = {}
    for batch in _batches(modules):
        for markers in (False, True):
            pairs = [
                (upload, pair)
                for upload in batch
                if upload.module not in changed
                for pair in upload.files
                if (Path(pair[0]).name == DONE_MARKER) == markers
            ]
            for chunk in _chunks(pairs, UPLOAD_BATCH_FILES):
                by_module: dict[str, tuple[Upload, Additions]] = {}
                for upload, pair in chunk:
                    if upload.module not in changed:
                        by_module.setdefault(upload.module, (upload, []))[1].append(pair)
                _upload(api, bucket, upper, list(by_module.values()), changed, stall_timeout)
    return changed


def lost_race(bucket: Bucket, upload: Upload) -> str | None:
    """After a module's upload: the conflict if the bucket does not hold exactly its files (another node
    published the same module meanwhile, with other bytes), or None."""
    theirs = remote_hashes(bucket, upload.module)
    differ = sorted(n for n, h in upload.hashes.items() if theirs.get(n) != h)
    if differ:
        return f"conflict: another copy of {upload.module} won the race ({differ[0]} differs in the bucket)"
    return None


ALREADY_PUBLISHED = "already published (the bucket holds the same content)"


def prepare(bucket: Bucket, upper: Path, module: str, local: LocalModule, hashes: HashCache) -> Upload | str | None:
    """The upload of a publishable `module`; None if the bucket already holds it; else the conflict."""
    comparison = compare(bucket, upper, module, local.files, hashes)
    if comparison.conflict:
        return comparison.conflict
    if not comparison.upload:
        return None
    return Upload(
        module,
        additions(bucket, upper, module, comparison.upload),
        {n: local.files[n] for n in comparison.upload},
        comparison.hashes,
    )


def plan_push(upper: Path, bucket: Bucket, checks: Checks, *, include_untrusted: bool = False) -> PushPlan:
    """Select the local modules that are finished, trusted and not yet in the bucket (with that content)."""
    plan = PushPlan()
    everyone = dataclasses.replace(checks, trust=None)
    for rel in local_modules(upper, plan.skipped):
        local = publishable_files(upper, rel, checks)
        note = ""
        if local.untrusted and include_untrusted:
            note = f" ({local.reason}; included by --include-untrusted)"
            local = publishable_files(upper, rel, everyone)
        if local.reason is None:
            plan.skipped += [(f"{rel}/{name}", why) for name, why in local.skipped]
            upload = prepare(bucket, upper, rel, local, checks.hashes)
            if isinstance(upload, Upload):
                plan.upload.append(upload)
                plan.notes[rel] = note
                continue
            plan.skipped.append((rel, upload or ALREADY_PUBLISHED))
        else:
            plan.skipped.append((rel, local.reason))
    return plan


def push(
    state: dict,
    *,
    dry_run: bool = False,
    api: object | None = None,
    include_untrusted: bool = False,
    writing: frozenset[tuple[int, int]] = frozenset(),
) -> PushPlan:
    """Publish the finished, trusted local modules of the NEFF mount described by runtime `state`.

    `writing`: (dev, ino) of the layer files the running daemon has open for writing (from its status).
    """
    if state.get("view") != "neff":
        raise MountError(f"{state.get('mountpoint')}: push works on NEFF mounts only")
    layer = state.get("layer_dir")
    if not layer:
        raise MountError(f"{state.get('mountpoint')}: the mount's runtime state has no local layer")
    http = HubHttp(state.get("endpoint"))
    bucket = Bucket(http, state["source"], state.get("options", {}).get("prefix"))
    upper = Path(layer) / "upper"
    options = state.get("options", {})
    # The mount's owner is whoever owns its layer (the daemon made it), also when root runs push.
    trust = TrustedWriters.parse(os.stat(layer).st_uid, options.get("publish_from") or ())
    checks = Checks.for_layer(
        upper, trust, writing=lambda: writing, max_bytes=options.get("publish_max_bytes") or constants.PUBLISH_MAX_BYTES
    )
    plan = plan_push(upper, bucket, checks, include_untrusted=include_untrusted)
    if dry_run or not plan.upload:
        return plan
    changed = publish_modules(
        api, bucket, upper, plan.upload, stall_timeout=options.get("timeout") or constants.OPERATION_TIMEOUT
    )
    for upload in plan.upload:
        if upload.module not in changed and (conflict := lost_race(bucket, upload)):
            changed[upload.module] = conflict
    plan.skipped += [(module, f"not pushed: {reason}") for module, reason in changed.items()]
    plan.upload = [upload for upload in plan.upload if upload.module not in changed]
    return plan
