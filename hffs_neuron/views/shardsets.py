"""Shard sets, and reading them ahead: opening one file of a sharded checkpoint fetches the others.

Loaders open shards one after another; on a real network that is several times slower than fetching
them all at once (transformers' opt-in `HF_SHARD_PREFETCH` exists for this). The mount knows the set
before the loader does. A shard set, within one directory of a snapshot, is what a `*.index.json`
there lists in its `weight_map` (safetensors and `pytorch_model.bin` indexes), or the files named
`<prefix>-NNNNN-of-NNNNN.<ext>` with the same prefix, count and extension.

`ReadAhead.opened` is the hub-cache view's hook (called on every open of a blob, in a FUSE thread: it
only queues). In the background it finds the set (mode "shards") or the whole snapshot (mode
"snapshot") and queues every member on the store's scheduler behind all foreground transfers, but only
if the missing members fit in the cache size without evicting anything in use; otherwise it logs once
and reads nothing ahead.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import threading
from collections.abc import Callable

from ..remote.base import RemoteEntry
from ..remote.hub import HubRepo
from ..store.blobstore import BlobStore, blob_key
from ..store.scheduler import READ_AHEAD
from .hubcache import repo_folder
from .merged import MergedView

logger = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.(?P<ext>[^.]+)$")
_INDEX_SUFFIX = ".index.json"
# Index files larger than this are not read (real ones are a few hundred KB at most).
_MAX_INDEX_BYTES = 32 * 1024 * 1024
# Paths whose set was already planned, remembered per mount up to this many (then forgotten).
_MAX_PLANNED = 100_000


def shard_set(path: str, files: dict[str, RemoteEntry], read_index: Callable[[RemoteEntry], bytes]) -> list[str]:
    """The paths of the shard set `path` belongs to (or that the index `path` lists); [] if none.

    `files` holds at least every file of `path`'s directory by path; `read_index(entry)` returns an index
    file's bytes.
    """
    directory = posixpath.dirname(path)
    name = posixpath.basename(path)

    def in_dir(member: str) -> str:
        return posixpath.join(directory, member) if directory else member

    if name.endswith(_INDEX_SUFFIX):
        return sorted(p for p in map(in_dir, _weight_map_files(files[path], read_index)) if p in files)
    numbered = _NUMBERED.match(name)
    if numbered:
        key = numbered.group("prefix", "count", "ext")
        siblings = [p for p in files if posixpath.dirname(p) == directory]
        return sorted(
            p
            for p in siblings
            if (m := _NUMBERED.match(posixpath.basename(p))) and m.group("prefix", "count", "ext") == key
        )
    for index in sorted(p for p in files if posixpath.dirname(p) == directory and p.endswith(_INDEX_SUFFIX)):
        members = _weight_map_files(files[index], read_index)
        if name in members:
            return sorted(p for p in map(in_dir, members) if p in files)
    return []


def _weight_map_files(entry: RemoteEntry, read_index: Callable[[RemoteEntry], bytes]) -> set[str]:
    if entry.size > _MAX_INDEX_BYTES:
        return set()
    try:
        weight_map = json.loads(read_index(entry)).get("weight_map") or {}
        return {v for v in weight_map.values() if isinstance(v, str) and "/" not in v}
    except (ValueError, AttributeError):
        return set()  # not an index after all: no set


class ReadAhead:
    """The read-ahead policy of a hub-cache mount (`--read-ahead shards|snapshot`)."""

    def __init__(self, store: BlobStore, mode: str, layer: MergedView):
        self.store = store
        self.mode = mode
        self._layer = layer  # the view: blobs its backing already holds are never fetched
        self._planned: set[tuple[str, str]] = set()  # (commit, path) already covered by a plan
        self._lock = threading.Lock()

    def opened(self, repo: HubRepo, entry: RemoteEntry) -> None:
        """A blob of `repo` is being opened: plan its read-ahead in the background (returns at once)."""
        token = (repo.commit, "" if self.mode == "snapshot" else entry.path)
        with self._lock:
            if token in self._planned:
                return
            if len(self._planned) >= _MAX_PLANNED:
                self._planned.clear()
            self._planned.add(token)
        self.store.scheduler.read_ahead(f"plan:{repo.commit}:{token[1]}", lambda: self._plan(repo, entry), False)

    def _plan(self, repo: HubRepo, entry: RemoteEntry) -> None:
        # A shard set lies within one directory: its listing (held already: the file was found in it)
        # is all "shards" needs; "snapshot" lists the whole tree.
        listed = repo.files() if self.mode == "snapshot" else repo.list(posixpath.dirname(entry.path))
        files = {e.path: e for e in listed if not e.is_dir}
        folder = repo_folder(repo.repo_type, repo.repo_id)

        def local(member: RemoteEntry) -> bool:
            return self._layer.layer_has(f"{folder}/blobs/{member.content_id}")

        def read_index(index: RemoteEntry) -> bytes:
            fd = self._layer.open_layer_file(f"{folder}/blobs/{index.content_id}")
            if fd is None:  # not in the backing (or a link there, never followed): the store's copy
                path = self.store.materialize(index.content_id or "", repo, index, READ_AHEAD)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                return f.read(_MAX_INDEX_BYTES)

        members = sorted(files) if self.mode == "snapshot" else shard_set(entry.path, files, read_index)
        with self._lock:
            self._planned.update((repo.commit, p) for p in members)
        wanted = [files[p] for p in members if p != entry.path and files[p].content_id]
        missing = [e for e in wanted if not self.store.has(blob_key(e.content_id or "")) and not local(e)]
        if not missing:
            return
        size = sum(e.size for e in missing)
        if not self.store.can_hold(size):
            logger.warning(
                "read-ahead of %d files of %s (%d MiB) skipped: it does not fit in --cache-size without evicting"
                " blobs in use",
                len(missing),
                repo.repo_id,
                size >> 20,
            )
            return
        logger.info("reading ahead %d files of %s (%d MiB)", len(missing), repo.repo_id, size >> 20)
        for member in missing:
            self.store.prefetch(member.content_id or "", repo, member)
