"""Publishing complete local Neuron cache modules back to the bucket or repo (`mountctl push`, `--publish`).

One completion rule and one upload path serve both: `publishable_files` decides whether a local module may
be published and what of it, and `publish_modules` uploads the rest before the done markers (a separate
call), so no other node ever sees a `model.done` without its NEFF.

The local layer is written by the mount's clients (other users too, with `--allow-other`), and uploads
use the owner's token, for every node of the fleet to load. So (README "Security model"):
- only trusted writers publish: a module is published only if every file in it was created, and every
  write to it made, by the owner, root or a `--publish-from` user or group (`Checks.untrusted`);
- only finished modules: neff and done marker, no lock, no file open for writing through the mount, the
  marker not older than any published file, within the size and file-count bounds, nothing sparse;
- the remote is compared by content (a bucket's xet hashes, a repo's LFS sha256 and git blob ids; cached
  by inode, size and mtime), never by size: a module it holds with other content is a conflict, never
  overwritten;
- only regular files: every directory and file is opened relative to its parent's fd with `O_NOFOLLOW`,
  anything else (a symlink, a FIFO, a device) is skipped with its reason, and the upload reads each file
  through the fd checked here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants
from .errors import MountError, RemoteNotFound
from .publish_checks import Checks, HashCache, TrustedWriters
from .remote.base import Digest
from .remote.http import HubHttp
from .remote.repo import RepoTree
from .sources import parse_source
from .upload_worker import UploadWorker
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name, is_module_complete

if TYPE_CHECKING:
    from .remote.bucket import Bucket

    NeffRemote = Bucket | RepoTree

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

# Files of one repo commit (each held open by the upload): a larger round goes in several commits.
REPO_COMMIT_FILES = 256

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
    """A local module against the remote: what to upload, or the conflict that forbids it."""

    upload: list[str]
    conflict: str | None = None


def remote_hashes(remote: NeffRemote, module: str) -> dict[str, Digest | None]:
    """name -> content hash of each file the remote holds in `module` (None where it lists none): the
    xet hash of a bucket file, the sha256 of a repo's LFS file, the git blob id of its plain git file."""
    try:
        return {e.name: e.digest for e in remote.list(module) if not e.is_dir}
    except RemoteNotFound:
        return {}


def differing(
    upper: Path, module: str, names: Iterable[str], theirs: dict[str, Digest | None], hashes: HashCache
) -> list[str]:
    """Those of the module's files `names` that the remote does not hold with the same content (each local
    file hashed the way the remote hashes its copy, through fds that follow no symlink)."""
    out = []
    dir_fd = _open_dir(upper, module)
    try:
        for name in sorted(names):
            digest = theirs.get(name)
            if digest is None:
                out.append(name)
                continue
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            try:
                if hashes.hash_of(f"{module}/{name}", fd, digest.algo) != digest.hexdigest:
                    out.append(name)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    hashes.save()
    return out


def compare(remote: NeffRemote, upper: Path, module: str, files: Iterable[str], hashes: HashCache) -> Comparison:
    """What of `files` the remote lacks; a conflict where it holds any of them with other content.

    After an interrupted publish (the rest uploaded, the marker not) only what is missing goes again;
    a module the remote already holds complete with the same content needs nothing.
    """
    files = list(files)
    theirs = remote_hashes(remote, module)
    differ = differing(upper, module, [n for n in files if n in theirs], theirs, hashes)
    if differ:
        return Comparison([], f"conflict: {remote_name(remote)} holds {module}/{differ[0]} with other content")
    if DONE_MARKER in theirs:
        return Comparison([])  # published (the first good copy): extra local files stay local
    return Comparison(sorted(n for n in files if n not in theirs))


def remote_name(remote: NeffRemote) -> str:
    """How messages name the remote: `bucket ORG/NAME`, `model ORG/NAME`, `dataset ORG/NAME`."""
    return f"{getattr(remote, 'repo_type', 'bucket')} {remote.bucket_id}"


def check_write_access(remote: NeffRemote) -> None:
    """Repos: raise RemoteAccessDenied (one line) unless the token may commit to the followed branch,
    UsageError for a pinned commit. Buckets are checked by their first upload (neff_publisher.py)."""
    if isinstance(remote, RepoTree):
        remote.check_write_access()


def additions(remote: NeffRemote, upper: Path, module: str, names: Iterable[str]) -> Additions:
    """(local path, path in the bucket or repo) of each of a module's files `names`."""
    prefix = f"{remote.prefix}/" if remote.prefix else ""
    return [(str(upper / module / n), f"{prefix}{module}/{n}") for n in names]


def upload_to_bucket(api: Any, bucket_id: str, additions: Additions) -> None:
    """The one call that writes to a bucket (a seam: tests without Xet uploads replace only this)."""
    api.batch_bucket_files(bucket_id, add=additions)


def commit_to_repo(api: Any, target: dict, additions: Additions) -> None:
    """The one call that writes to a repo: one commit of `additions` to the followed branch."""
    from huggingface_hub import CommitOperationAdd

    api.create_commit(
        target["repo_id"],
        [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=local) for local, remote in additions],
        commit_message=target["message"],
        repo_type=target["repo_type"],
        revision=target["revision"],
    )


def send(api: Any, target: dict, additions: Additions) -> None:
    """Upload `additions` to `target` (`upload_target`): a bucket batch or a repo commit."""
    if "repo_id" in target:
        commit_to_repo(api, target, additions)
    else:
        upload_to_bucket(api, target["bucket_id"], additions)


def upload_target(remote: NeffRemote, message: str) -> dict:
    """Where uploads to `remote` go, as the upload worker takes it (JSON)."""
    if isinstance(remote, RepoTree):
        return {
            "repo_id": remote.repo_id,
            "repo_type": remote.repo_type,
            "revision": remote.revision,
            "message": message,
        }
    return {"bucket_id": remote.bucket_id}


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
    re-checked after the upload), and the names of all its files (the remote must hold them afterwards)."""

    module: str
    files: Additions
    checked: dict[str, os.stat_result] = field(default_factory=dict)  # name -> lstat
    names: list[str] = field(default_factory=list)  # every file of the module: the remote must hold them all


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
    remote: NeffRemote,
    upper: Path,
    part: list[tuple[Upload, Additions]],
    changed: dict[str, str],
    stall_timeout: float,
    message: str = "",
) -> None:
    """One upload call of the files in `part`, each read through an fd checked to be a regular file (in
    the worker process if `api` is an UploadWorker, stopped once no byte moved for `stall_timeout`; else
    with `api`, an HfApi, in this process).

    A module whose files cannot be opened so (swapped for a symlink, removed), or whose files are not the
    ones checked before or after the call (the bytes uploaded must be those on disk), goes to `changed`.
    """
    fds: list[tuple[Upload, str, int]] = []
    sent: list[tuple[int, str]] = []  # (fd, path in the remote)
    try:
        for upload, files in part:
            names = [Path(local).name for local, _ in files]
            try:
                opened = _open_module_files(upper, upload.module, names)
            except (OSError, ValueError) as exc:
                changed[upload.module] = f"changed since it was checked: {getattr(exc, 'strerror', None) or exc}"
                continue
            fds += [(upload, name, fd) for name, fd in zip(names, opened, strict=True)]
            sent += [(fd, dest) for fd, (_, dest) in zip(opened, files, strict=True)]
        if not sent:
            return
        before = {fd: os.fstat(fd) for _, _, fd in fds}
        target = upload_target(remote, message)
        if isinstance(api, UploadWorker):  # the worker gets the fds themselves (SCM_RIGHTS)
            api.call(remote.endpoint, target, sent, stall_timeout)
        else:
            # huggingface_hub takes paths or bytes, not file objects: /proc/self/fd/N opens the very file
            # checked above (no symlink is resolved again), and keeps large NEFFs out of memory.
            send(api, target, [(f"/proc/self/fd/{fd}", dest) for fd, dest in sent])
        for upload, name, fd in fds:
            st = os.fstat(fd)
            if not (_same_file(st, upload.checked.get(name)) and _same_file(st, before[fd])):
                changed[upload.module] = f"{name} changed while it was published: published again once finished"
    finally:
        for _, _, fd in fds:
            os.close(fd)


def publish_modules(
    api: Any,
    remote: NeffRemote,
    upper: Path,
    modules: Sequence[Upload],
    *,
    stall_timeout: float = constants.OPERATION_TIMEOUT,
    commit_interval: float = constants.COMMIT_INTERVAL,
) -> dict[str, str]:
    """Upload the files of `modules` from the local layer `upper`; returns module -> reason of those left out
    because they changed since they were checked. Upload errors propagate. `api`: an UploadWorker (each
    call stopped when no byte moved for `stall_timeout` seconds) or an HfApi used in this process.

    Each batch's `model.done` files go in calls after all the rest succeeded: `batch_bucket_files` may
    split a batch and apply part of it, so with the markers last a failure can leave a module without its
    marker (invisible to compilers, published again later), never a marker alone. To a repo: commits
    (`commit_round`) at most one per `commit_interval` seconds, the markers in a later commit.
    """
    logger.info(
        "publishing %d files of %d modules to %s", sum(len(u.files) for u in modules), len(modules), remote_name(remote)
    )
    changed: dict[str, str] = {}
    if isinstance(remote, RepoTree):
        queue = list(modules)
        while queue:
            started = time.monotonic()
            more, waiting, later = commit_round(api, remote, upper, queue, stall_timeout=stall_timeout)
            changed.update(more)
            queue = waiting + later
            if queue:
                logger.info("next commit to %s in %.0f s (--commit-interval)", remote_name(remote), commit_interval)
                time.sleep(max(0.0, started + commit_interval - time.monotonic()))
        return changed
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
                _upload(api, remote, upper, list(by_module.values()), changed, stall_timeout)
    return changed


def commit_round(
    api: Any, repo: RepoTree, upper: Path, uploads: Sequence[Upload], *, stall_timeout: float
) -> tuple[dict[str, str], list[Upload], list[Upload]]:
    """One commit to `repo`: the done markers of modules whose other files it holds already (an upload of
    the marker alone), and every other file, but the marker, of the rest, at most REPO_COMMIT_FILES files.

    Returns (changed: module -> why it was left out, uploads of the markers that wait for the next commit,
    uploads that did not fit and wait whole). The repo then follows the new commit at once.
    """
    part: list[tuple[Upload, Additions]] = []
    waiting: list[Upload] = []
    later: list[Upload] = []
    count = 0
    for upload in uploads:
        rest = [pair for pair in upload.files if Path(pair[0]).name != DONE_MARKER]
        files = rest or upload.files
        if part and count + len(files) > REPO_COMMIT_FILES:
            later.append(upload)
            continue
        part.append((upload, files))
        count += len(files)
        if rest and len(rest) < len(upload.files):
            waiting.append(dataclasses.replace(upload, files=[p for p in upload.files if p not in rest]))
    markers = sum(1 for _, files in part if Path(files[0][0]).name == DONE_MARKER)
    message = f"hffs-neuron: {len(part) - markers} modules, {markers} done markers"
    changed: dict[str, str] = {}
    _upload(api, repo, upper, part, changed, stall_timeout, message)
    repo.current_commit(force=True)
    return changed, [w for w in waiting if w.module not in changed], later


def lost_race(remote: NeffRemote, upload: Upload, upper: Path, hashes: HashCache) -> str | None:
    """After a module's upload: the conflict if the remote does not hold exactly its files (another node
    published the same module meanwhile, with other bytes), or None."""
    theirs = remote_hashes(remote, upload.module)
    differ = differing(upper, upload.module, upload.names, theirs, hashes)
    if differ:
        return f"conflict: another copy of {upload.module} won the race ({differ[0]} differs in {remote_name(remote)})"
    return None


ALREADY_PUBLISHED = "already published (the remote holds the same content)"


def prepare(remote: NeffRemote, upper: Path, module: str, local: LocalModule, hashes: HashCache) -> Upload | str | None:
    """The upload of a publishable `module`; None if the remote already holds it; else the conflict."""
    comparison = compare(remote, upper, module, local.files, hashes)
    if comparison.conflict:
        return comparison.conflict
    if not comparison.upload:
        return None
    return Upload(
        module,
        additions(remote, upper, module, comparison.upload),
        {n: local.files[n] for n in comparison.upload},
        sorted(local.files),
    )


def plan_push(upper: Path, remote: NeffRemote, checks: Checks, *, include_untrusted: bool = False) -> PushPlan:
    """Select the local modules that are finished, trusted and not yet in the remote (with that content)."""
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
            upload = prepare(remote, upper, rel, local, checks.hashes)
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
    options = state.get("options", {})
    remote = parse_source(state["source"], options.get("prefix")).open(http, ref_ttl=0.0)
    upper = Path(layer) / "upper"
    # The mount's owner is whoever owns its layer (the daemon made it), also when root runs push.
    trust = TrustedWriters.parse(os.stat(layer).st_uid, options.get("publish_from") or ())
    checks = Checks.for_layer(
        upper, trust, writing=lambda: writing, max_bytes=options.get("publish_max_bytes") or constants.PUBLISH_MAX_BYTES
    )
    plan = plan_push(upper, remote, checks, include_untrusted=include_untrusted)
    if dry_run or not plan.upload:
        return plan
    check_write_access(remote)
    worker = UploadWorker() if api is None else None
    try:
        changed = publish_modules(
            api or worker,
            remote,
            upper,
            plan.upload,
            stall_timeout=options.get("timeout") or constants.OPERATION_TIMEOUT,
            commit_interval=options.get("commit_interval", constants.COMMIT_INTERVAL),
        )
    finally:
        if worker is not None:
            worker.close()
    for upload in plan.upload:
        if upload.module not in changed and (conflict := lost_race(remote, upload, upper, checks.hashes)):
            changed[upload.module] = conflict
    plan.skipped += [(module, f"not pushed: {reason}") for module, reason in changed.items()]
    plan.upload = [upload for upload in plan.upload if upload.module not in changed]
    return plan
