"""`mountctl lookup`: which export configurations of a model a Neuron cache already holds compiled.

Two places record them, beside the flat `neuronxcc-<version>/MODULE_*` area:

- the model-repo cache's registry (optimum-neuron, `aws-neuron/optimum-neuron-cache`):
  `neuronxcc-<version>/0_REGISTRY/<optimum-neuron version>/<model_type>/<org>/<name>/<hash>.json`, each the
  model's config with a `neuron` section (task, batch_size, sequence_length, num_cores, auto_cast_type,
  compiler_type, compiler_version, checkpoint_id, checkpoint_revision);
- the bucket cache's per-model area: `neuronxcc-<version>/<org>/<name>/<task>/exports/<optimum version>/
  <hash8>.json`, the same fields at the top level.

Both are read through the NEFF view's remote (remote/bucket.py, remote/repo.py): one listing per
directory level, and a model's registry directories are found from its `model_type` (its config.json on
the Hub), so a version directory of thousands of modules is never listed. What a lookup finds is
remembered under the cache dir (`lookup/`), so the same lookup answers offline (`HF_HUB_OFFLINE=1`, or
the Hub unreachable) from what was seen last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import constants
from .errors import HffsError, RemoteNotFound, RemoteUnavailable, UsageError
from .remote.base import RemoteEntry
from .remote.http import HubHttp
from .runtime import ensure_private_dir, open_private_file
from .sources import Source
from .views.neff_names import VERSION_PREFIX

if TYPE_CHECKING:
    from .remote.bucket import Bucket
    from .remote.repo import RepoTree

    NeffRemote = Bucket | RepoTree

logger = logging.getLogger(__name__)

REGISTRY = "0_REGISTRY"
EXPORTS = "exports"
MAX_ENTRY_BYTES = 1 << 20  # a registry entry is a model config: anything larger is not one
COLUMNS = (
    ("compiler_version", "compiler"),
    ("task", "task"),
    ("batch_size", "batch"),
    ("sequence_length", "seq len"),
    ("num_cores", "cores"),
    ("auto_cast_type", "cast"),
    ("checkpoint_id", "checkpoint"),
    ("checkpoint_revision", "revision"),
)


@dataclass(frozen=True)
class CachedConfig:
    """One cached export configuration of a model."""

    compiler_version: str
    task: str | None
    batch_size: int | None
    sequence_length: int | None
    num_cores: int | None
    auto_cast_type: str | None
    compiler_type: str | None
    checkpoint_id: str | None
    checkpoint_revision: str | None
    optimum_version: str
    path: str  # where in the cache it is recorded


@dataclass
class LookupResult:
    model_id: str
    source: str
    entries: list[CachedConfig]
    offline: bool = False  # answered from what an earlier lookup remembered
    seen_at: float | None = None  # when that lookup was made


def lookup(
    source: Source,
    model_id: str,
    *,
    http: HubHttp,
    cache_dir: str | os.PathLike,
    task: str | None = None,
) -> LookupResult:
    """The cached configurations of `model_id` in `source` (newest compiler first; `task`: only those).

    Online, the cache is asked and the answer remembered under `cache_dir`; offline (`HF_HUB_OFFLINE=1`
    in `http`, or the Hub unreachable), the remembered answer is given (RemoteUnavailable if none).
    """
    if model_id.count("/") != 1 or not all(model_id.split("/")):
        raise UsageError(f"invalid model id {model_id!r}: expected ORG/NAME")
    memory = _Memory(Path(cache_dir), http.endpoint, source.canonical)
    result = LookupResult(model_id, source.canonical, [])
    try:
        if http.offline:
            raise RemoteUnavailable("HF_HUB_OFFLINE=1")
        found = _ask(source.open(http, ref_ttl=float("inf")), http, model_id)
        memory.remember(model_id, found)
    except RemoteUnavailable as exc:
        recalled = memory.recall(model_id)
        if recalled is None:
            raise RemoteUnavailable(
                f"{exc}; and {model_id} was never looked up in {source.canonical} with this cache dir"
            ) from exc
        logger.info("offline (%s): answering from the lookup of %s", exc, time.ctime(recalled[1]))
        found, result.seen_at, result.offline = recalled[0], recalled[1], True
    result.entries = sorted(
        (e for e in found if task is None or e.task == task),
        key=lambda e: (_version_key(e.compiler_version), e.optimum_version, e.path),
        reverse=True,
    )
    return result


def _ask(remote: NeffRemote, http: HubHttp, model_id: str) -> list[CachedConfig]:
    model_type = _model_type(http, model_id)
    found: list[CachedConfig] = []
    for version in _dirs(remote, ""):
        if not version.startswith(VERSION_PREFIX):
            continue
        for optimum in _dirs(remote, f"{version}/{REGISTRY}"):
            types = [model_type] if model_type else _dirs(remote, f"{version}/{REGISTRY}/{optimum}")
            for kind in types:
                folder = f"{version}/{REGISTRY}/{optimum}/{kind}/{model_id}"
                found += _read_entries(remote, folder, version, optimum)
        for task in _dirs(remote, f"{version}/{model_id}"):
            for optimum in _dirs(remote, f"{version}/{model_id}/{task}/{EXPORTS}"):
                folder = f"{version}/{model_id}/{task}/{EXPORTS}/{optimum}"
                found += _read_entries(remote, folder, version, optimum)
    return found


def _model_type(http: HubHttp, model_id: str) -> str | None:
    """The model's `model_type` from its config.json on the Hub; None (every type is then looked at)
    when it has none or cannot be read."""
    try:
        config = http.get_json(f"{model_id}/resolve/main/config.json", what=f"{model_id}: config.json")
    except RemoteUnavailable:
        raise
    except HffsError as exc:  # not found, gated, private: the registry is still looked through
        logger.info("%s: no readable config.json (%s): looking through every model type", model_id, exc)
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) and re.fullmatch(r"[\w.-]+", kind) else None


def _listing(remote: NeffRemote, path: str) -> list[RemoteEntry]:
    try:
        return remote.list(path)
    except RemoteNotFound:
        return []


def _dirs(remote: NeffRemote, path: str) -> list[str]:
    return sorted(e.name for e in _listing(remote, path) if e.is_dir)


def _read_entries(remote: NeffRemote, folder: str, version: str, optimum: str) -> list[CachedConfig]:
    out = []
    for entry in _listing(remote, folder):
        if entry.is_dir or not entry.name.endswith(".json") or entry.size > MAX_ENTRY_BYTES:
            continue
        body = bytearray()
        deadline = time.monotonic() + constants.OPERATION_TIMEOUT
        remote.read_range(entry, 0, entry.size, lambda _offset, data, body=body: body.extend(data), deadline)
        try:
            config = _entry(json.loads(bytes(body)), version, optimum, entry.path)
        except (ValueError, TypeError, AttributeError) as exc:
            logger.warning("ignoring %s: not a cache entry (%s)", entry.path, exc)
            continue
        out.append(config)
    return out


def _entry(data: dict, version: str, optimum: str, path: str) -> CachedConfig:
    """A registry entry (config + `neuron` section) or an export record (flat) as one configuration."""
    fields = {**data, **data["neuron"]} if isinstance(data.get("neuron"), dict) else dict(data)

    def text(key: str) -> str | None:
        value = fields.get(key)
        return str(value) if value is not None else None

    def number(key: str) -> int | None:
        value = fields.get(key)
        return int(value) if value is not None else None

    return CachedConfig(
        compiler_version=text("compiler_version") or version[len(VERSION_PREFIX) :],
        task=text("task"),
        batch_size=number("batch_size"),
        sequence_length=number("sequence_length"),
        num_cores=number("num_cores"),
        auto_cast_type=text("auto_cast_type"),
        compiler_type=text("compiler_type"),
        checkpoint_id=text("checkpoint_id") or text("model_id"),
        checkpoint_revision=text("checkpoint_revision"),
        optimum_version=optimum,
        path=path,
    )


def _version_key(version: str) -> tuple[int, ...]:
    """`2.21.18209.0+043b1bf7` -> (2, 21, 18209, 0): compilers compare by their numbers."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", 1)[0]))


class _Memory:
    """What lookups of one source found, per model, under `<cache dir>/lookup/` (owner-only)."""

    def __init__(self, cache_dir: Path, endpoint: str, source: str):
        key = hashlib.sha256(f"{endpoint}|{source}".encode()).hexdigest()[:16]
        self.dir = cache_dir / "lookup"
        self.path = self.dir / f"{key}.json"

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def recall(self, model_id: str) -> tuple[list[CachedConfig], float] | None:
        record = self._load().get(model_id.lower())
        if not isinstance(record, dict):
            return None
        try:
            return [CachedConfig(**e) for e in record["entries"]], float(record["seen_at"])
        except (KeyError, TypeError, ValueError):
            return None

    def remember(self, model_id: str, entries: list[CachedConfig]) -> None:
        data = self._load()
        data[model_id.lower()] = {"seen_at": time.time(), "entries": [asdict(e) for e in entries]}
        try:
            ensure_private_dir(self.dir)
            tmp = self.dir / f"{self.path.stem}.{os.getpid()}.tmp"
            with os.fdopen(open_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as exc:  # the answer stands; only the offline copy is missing
            logger.warning("could not remember the lookup under %s: %s", self.dir, exc)


def format_table(result: LookupResult) -> str:
    """The answer as `optimum-cli neuron cache lookup` gives it: a count line, then one row per entry."""
    where = f"{result.source}" + (
        f" (offline: as seen {time.strftime('%Y-%m-%d %H:%M', time.localtime(result.seen_at))})"
        if result.offline and result.seen_at
        else ""
    )
    if not result.entries:
        return f"no cached configuration of {result.model_id} in {where}"
    rows = [[label for _, label in COLUMNS]]
    for entry in result.entries:
        values = asdict(entry)
        rows.append(["-" if values[key] is None else str(values[key]) for key, _ in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"*** {len(result.entries)} entries found in cache for {result.model_id} in {where} ***", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def to_json(result: LookupResult) -> str:
    """The answer for `--json`: the model, the source, whether offline (and as of when), the entries."""
    return json.dumps(
        {
            "model_id": result.model_id,
            "source": result.source,
            "offline": result.offline,
            "seen_at": result.seen_at,
            "entries": [asdict(e) for e in result.entries],
        },
        indent=2,
    )
