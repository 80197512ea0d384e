"""Publishing complete local Neuron cache modules back to the bucket (`mountctl push`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MountError, RemoteNotFound
from .remote.bucket import Bucket
from .remote.http import HubHttp
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name, is_module_complete

logger = logging.getLogger(__name__)


@dataclass
class PushPlan:
    """What `push` would do: modules to upload and modules skipped, each with the reason."""

    upload: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # (module, [(local, remote)])
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)


def plan_push(upper: Path, bucket: Bucket) -> PushPlan:
    """Select the local modules that are complete (neff + done, no lock, no log) and not yet published."""
    plan = PushPlan()
    if not upper.is_dir():
        return plan
    for version in sorted(p for p in upper.iterdir() if p.is_dir() and p.name.startswith(VERSION_PREFIX)):
        for module in sorted(p for p in version.iterdir() if p.is_dir() and p.name.startswith(MODULE_PREFIX)):
            rel = f"{version.name}/{module.name}"
            names = {p.name for p in module.iterdir()}
            if any(is_lock_name(n) for n in names):
                plan.skipped.append((rel, "in progress (a *.lock file is present)"))
                continue
            if "model.log" in names and "model.neff" not in names:
                plan.skipped.append((rel, "failed compile (model.log without model.neff)"))
                continue
            if not is_module_complete(names - {"model.log"}):
                plan.skipped.append((rel, "incomplete (needs model.neff and model.done)"))
                continue
            # A copy-up in progress leaves a private temp file next to its target: never publish it.
            files = sorted(
                p for p in module.iterdir() if p.is_file() and p.name != "model.log" and ".hffs-copyup." not in p.name
            )
            try:
                remote = {e.name: e for e in bucket.list(rel) if not e.is_dir}
            except RemoteNotFound:
                remote = {}
            if remote and all(f.name in remote and remote[f.name].size == f.stat().st_size for f in files):
                plan.skipped.append((rel, "already published (same files and sizes in the bucket)"))
                continue
            plan.upload.append((rel, [(str(f), _remote_path(bucket, f"{rel}/{f.name}")) for f in files]))
    return plan


def _remote_path(bucket: Bucket, rel: str) -> str:
    return f"{bucket.prefix}/{rel}" if bucket.prefix else rel


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
    api = api or HfApi(endpoint=http.endpoint)
    additions = [pair for _, files in plan.upload for pair in files]
    logger.info("pushing %d files of %d modules to %s", len(additions), len(plan.upload), bucket.bucket_id)
    api.batch_bucket_files(bucket.bucket_id, add=additions)
    return plan
