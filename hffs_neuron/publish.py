"""Publishing complete local Neuron cache modules back to the bucket (`mountctl push`, `--publish`).

One completion rule and one upload order serve both: `module_skip_reason` decides whether a local module
may be published, `publishable_files` what of it, and `publish_modules` uploads the rest before the done
markers (a separate call), so no other node ever sees a `model.done` without its NEFF.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MountError, RemoteNotFound
from .remote.bucket import Bucket
from .remote.http import HubHttp
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name, is_module_complete

logger = logging.getLogger(__name__)

DONE_MARKER = "model.done"

# (local path, path in the bucket) of each file of one upload.
Additions = list[tuple[str, str]]


@dataclass
class PushPlan:
    """What `push` would do: modules to upload and modules skipped, each with the reason."""

    upload: list[tuple[str, Additions]] = field(default_factory=list)  # (module, [(local, remote)])
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)


def module_skip_reason(names: set[str]) -> str | None:
    """Why a module holding files `names` must not be published yet (None: it is complete)."""
    if any(is_lock_name(n) for n in names):
        return "in progress (a *.lock file is present)"
    if "model.log" in names and "model.neff" not in names:
        return "failed compile (model.log without model.neff)"
    if not is_module_complete(names - {"model.log"}):  # a complete module may keep a log of warnings
        return "incomplete (needs model.neff and model.done)"
    return None


def is_publishable_name(name: str) -> bool:
    """Files of a module that travel: not the compile log, locks, copy-up temps or FUSE's hidden files."""
    return not (name == "model.log" or is_lock_name(name) or ".hffs-copyup." in name or name.startswith(".fuse_hidden"))


def local_modules(upper: Path) -> list[str]:
    """`neuronxcc-*/MODULE_*` directories of a local layer, as bucket-relative paths."""
    if not upper.is_dir():
        return []
    return [
        f"{version.name}/{module.name}"
        for version in sorted(p for p in upper.iterdir() if p.is_dir() and p.name.startswith(VERSION_PREFIX))
        for module in sorted(p for p in version.iterdir() if p.is_dir() and p.name.startswith(MODULE_PREFIX))
    ]


def publishable_files(module_dir: Path) -> tuple[str | None, list[Path]]:
    """(skip reason or None, the regular files to upload) of one local module directory."""
    try:
        entries = list(os.scandir(module_dir))
    except FileNotFoundError:
        return "removed", []
    reason = module_skip_reason({e.name for e in entries})
    if reason:
        return reason, []
    files = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False) and is_publishable_name(e.name)]
    return None, sorted(files)


def unpublished(bucket: Bucket, module: str, files: Sequence[Path]) -> list[Path]:
    """The `files` of `module` the bucket lacks or holds with another size (none: already published).

    After an interrupted publish (the rest uploaded, the marker not) only what is missing goes again.
    """
    try:
        remote = {e.name: e.size for e in bucket.list(module) if not e.is_dir}
    except RemoteNotFound:
        return list(files)
    return [f for f in files if remote.get(f.name) != f.stat().st_size]


def additions(bucket: Bucket, module: str, files: Sequence[Path]) -> Additions:
    """(local path, path in the bucket) of each of a module's `files`."""
    prefix = f"{bucket.prefix}/" if bucket.prefix else ""
    return [(str(f), f"{prefix}{module}/{f.name}") for f in files]


def upload_to_bucket(api: Any, bucket_id: str, additions: Additions) -> None:
    """The one call that writes to a bucket (a seam: tests without Xet uploads replace only this)."""
    api.batch_bucket_files(bucket_id, add=additions)


def publish_modules(api: Any, bucket: Bucket, modules: Sequence[tuple[str, Additions]]) -> None:
    """Upload the files of `modules`, every `model.done` in a second call once all the rest succeeded.

    `batch_bucket_files` may split a batch and apply part of it: with the markers last, a failure can leave
    a module without its marker (invisible to compilers, published again later), never a marker alone.
    """
    additions = [pair for _, files in modules for pair in files]
    rest = [pair for pair in additions if not pair[1].endswith(f"/{DONE_MARKER}")]
    markers = [pair for pair in additions if pair[1].endswith(f"/{DONE_MARKER}")]
    logger.info("publishing %d files of %d modules to %s", len(additions), len(modules), bucket.bucket_id)
    for batch in (rest, markers):
        if batch:
            upload_to_bucket(api, bucket.bucket_id, batch)


def plan_push(upper: Path, bucket: Bucket) -> PushPlan:
    """Select the local modules that are complete (neff + done, no lock, no log) and not yet published."""
    plan = PushPlan()
    for rel in local_modules(upper):
        reason, files = publishable_files(upper / rel)
        if reason is None:
            files = unpublished(bucket, rel, files)
            if not files:
                reason = "already published (same files and sizes in the bucket)"
        if reason:
            plan.skipped.append((rel, reason))
            continue
        plan.upload.append((rel, additions(bucket, rel, files)))
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
    plan = plan_push(Path(layer) / "upper", bucket)
    if dry_run or not plan.upload:
        return plan
    publish_modules(api or HfApi(endpoint=http.endpoint), bucket, plan.upload)
    return plan
