"""Hub-cache view: a lazy, case-insensitive HF_HUB_CACHE.

Over a real hub-cache directory (the backing, where huggingface_hub's own writes land) it shows, for
every repo the Hub can resolve, the standard layout with every file of a commit present before any
byte is fetched:

    <type>s--<org>--<name>/refs/<rev>                    the commit, no trailing newline
    <type>s--<org>--<name>/snapshots/<commit>/<path>     -> ../../blobs/<etag> (relative symlink)
    <type>s--<org>--<name>/blobs/<etag>                  final size; bytes fetched on first open
    <type>s--<org>--<name>/trees/<commit>.json           the tree cache huggingface_hub reads offline

Every letter-case variant of a repo folder (and of `.locks/<repo folder>`) is one directory: the
backing folder's casing when one exists (the first in sorted order if several do), else the Hub's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import constants
from ..errors import HffsError, RemoteNotFound
from ..remote.base import RemoteEntry
from ..remote.http import HubHttp
from ..remote.hub import HubRepo
from ..store.blobstore import BlobStore
from ..store.metacache import MetadataCache
from .merged import FileHandle, MergedView, VNode, fs_error

logger = logging.getLogger(__name__)

_FOLDER = re.compile(r"^(models|datasets)--(.+)$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_DIRS = ("blobs", "refs", "snapshots", "trees")


def repo_folder(repo_type: str, repo_id: str) -> str:
    """huggingface_hub's folder name for a repo: `models--Org--Name`."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def parse_repo_folder(name: str) -> tuple[str, str] | None:
    """(repo_type, repo_id) for a folder name like `models--Org--Name`, in any case; None otherwise."""
    match = _FOLDER.match(name)
    if not match:
        return None
    parts = match.group(2).split("--")
    if len(parts) > 2 or not all(parts):
        return None
    return match.group(1).lower()[:-1], "/".join(parts)


@dataclass
class RepoState:
    """What this mount knows of one repo: its canonical id and the commits it has resolved."""

    repo_type: str
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)  # revision -> commit
    commits: dict[str, HubRepo] = field(default_factory=dict)
    # etag -> (commit's repo, file), rebuilt when a commit is added (blobs/ lookups are per open).
    _blobs: dict[str, tuple[HubRepo, RemoteEntry]] = field(default_factory=dict)
    _blobs_commits: int = -1

    def blobs(self) -> dict[str, tuple[HubRepo, RemoteEntry]]:
        commits = list(self.commits.values())
        if self._blobs_commits != len(commits):
            self._blobs = {e.content_id: (repo, e) for repo in commits for e in repo.files() if e.content_id}
            self._blobs_commits = len(commits)
        return self._blobs


class HubCacheView(MergedView):
    # Called with (repo, file) on every open of a blob before it is fetched: the daemon's read-ahead.
    read_ahead: Callable[[HubRepo, RemoteEntry], None] | None = None

    def __init__(
        self,
        http: HubHttp,
        store: BlobStore,
        meta: MetadataCache,
        backing_dir: str | os.PathLike,
        *,
        pinned: list[tuple[str, str, str]] = (),
        read_only: bool = False,
        revision_ttl: float | None = None,
    ):
        super().__init__(backing_dir, read_only=read_only)
        self.http = http
        self.store = store
        self.meta = meta
        self.revision_ttl = revision_ttl
        self._repos: dict[tuple[str, str], RepoState] = {}  # (type, id.lower()) -> state
        self._lock = threading.Lock()
        self._tree_json: dict[str, bytes] = {}
        for repo_type, repo_id, revision in pinned:
            self.pin_repo(repo_type, repo_id, revision)

    # -- repos ----------------------------------------------------------------------------------
    def _hub_repo(self, repo_type: str, repo_id: str, revision: str) -> HubRepo:
        key = (self.http.endpoint, self.http.token_fingerprint, "repo", repo_type, repo_id.lower(), revision)
        ttl = constants.PINNED_TTL if _COMMIT.match(revision) else self.revision_ttl
        return self.meta.get(key, lambda: HubRepo(self.http, repo_type, repo_id, revision), ttl=ttl)

    def pin_repo(self, repo_type: str, repo_id: str, revision: str = "main") -> RepoState:
        """Resolve `repo_id@revision` now and keep it listed (mount-time `--repo`)."""
        repo = self._hub_repo(repo_type, repo_id, revision)
        state = self._state_for(repo)
        with self._lock:
            changed = state.refs.get(revision) != repo.commit
            state.refs[revision] = repo.commit
        if changed:
            self.bump_generation()  # a new ref: directory listings changed
        return state

    def _state_for(self, repo: HubRepo) -> RepoState:
        with self._lock:
            state = self._repos.setdefault(
                (repo.repo_type, repo.repo_id.lower()), RepoState(repo.repo_type, repo.repo_id)
            )
            if repo.commit not in state.commits:
                state.commits[repo.commit] = repo
                self.bump_generation()
            return state

    def _repo_state(self, folder: str) -> RepoState | None:
        """The repo behind a folder name in any case, resolving its default branch on first sight."""
        parsed = parse_repo_folder(folder)
        if parsed is None:
            return None
        repo_type, repo_id = parsed
        with self._lock:
            state = self._repos.get((repo_type, repo_id.lower()))
        if state is not None and state.refs:
            return state
        try:
            return self.pin_repo(repo_type, repo_id, "main")
        except RemoteNotFound:
            return None

    def _commit(self, state: RepoState, commit: str) -> HubRepo | None:
        repo = state.commits.get(commit)
        if repo is None and _COMMIT.match(commit):
            try:
                repo = self._hub_repo(state.repo_type, state.repo_id, commit)
            except RemoteNotFound:
                return None
            self._state_for(repo)
        return repo

    # -- names ----------------------------------------------------------------------------------
    def canonical_folder(self, folder: str) -> str:
        """One casing for every variant: the backing's (sorted first if several), else the Hub's."""
        parsed = parse_repo_folder(folder)
        if parsed is None:
            return folder
        lowered = folder.lower()
        try:
            variants = sorted(n for n in os.listdir(self.local_root) if n.lower() == lowered)
        except FileNotFoundError:
            variants = []
        if variants:
            return variants[0]
        with self._lock:
            state = self._repos.get((parsed[0], parsed[1].lower()))
        if state is None:
            try:
                state = self._repo_state(folder)
            except HffsError:
                state = None  # offline or failing Hub: keep the caller's casing
        return repo_folder(state.repo_type, state.repo_id) if state else folder

    def local_path(self, path: str) -> str:
        if not path:
            return self.local_root
        parts = path.split("/")
        if parse_repo_folder(parts[0]):
            parts[0] = self.canonical_folder(parts[0])
        elif parts[0] == ".locks" and len(parts) > 1 and parse_repo_folder(parts[1]):
            parts[1] = self.canonical_folder(parts[1])
        return os.path.join(self.local_root, *parts)

    def display_name(self, parent: str, local_name: str) -> str:
        if not parent and parse_repo_folder(local_name):
            return self.canonical_folder(local_name)
        return local_name

    # -- the virtual tree -----------------------------------------------------------------------
    def _resolve(self, path: str) -> tuple[RepoState | None, list[str]]:
        parts = path.split("/")
        if not parse_repo_folder(parts[0]):
            return None, parts
        return self._repo_state(parts[0]), parts[1:]

    def virtual_lookup(self, path: str) -> VNode | None:
        if not path:
            return VNode("dir")
        state, rest = self._resolve(path)
        if state is None:
            return None
        if not rest:
            return VNode("dir")
        if len(rest) == 2:
            # Commits and revisions a client names (`revision=<sha>` / `revision="v1"`, online or
            # offline) are resolved on the Hub on first sight, like repos: their snapshot is then
            # complete here and huggingface_hub never downloads anything itself.
            top, name = rest
            if top == "blobs":  # per open of every file: no full directory build
                found = state.blobs().get(name)
                return VNode("file", size=found[1].size) if found else None
            if top == "snapshots":
                self._commit(state, name)
            elif top == "trees" and name.endswith(".json"):
                self._commit(state, name.removesuffix(".json"))
            elif top == "refs" and name not in state.refs:
                self._ref(state, name)
        return self._children_of(state, rest[:-1]).get(rest[-1])

    def _ref(self, state: RepoState, revision: str) -> None:
        """Resolve a branch or tag name not seen yet (`refs/<name>`); unknown names stay absent."""
        if _COMMIT.match(revision) or revision.startswith("."):
            return
        try:
            self.pin_repo(state.repo_type, state.repo_id, revision)
        except RemoteNotFound:
            pass

    def virtual_children(self, path: str) -> dict[str, VNode]:
        if not path:
            with self._lock:
                states = list(self._repos.values())
            return {self.canonical_folder(repo_folder(s.repo_type, s.repo_id)): VNode("dir") for s in states}
        state, rest = self._resolve(path)
        return {} if state is None else self._children_of(state, rest)

    def _children_of(self, state: RepoState, rest: list[str]) -> dict[str, VNode]:
        """Children of a directory inside a repo folder (`rest` is its path below the folder)."""
        if not rest:
            return {name: VNode("dir") for name in _REPO_DIRS}
        top = rest[0]
        if top == "refs" and len(rest) == 1:
            return {rev: VNode("file", size=len(commit)) for rev, commit in state.refs.items() if "/" not in rev}
        if top == "blobs" and len(rest) == 1:
            return {etag: VNode("file", size=entry.size) for etag, (_, entry) in state.blobs().items()}
        if top == "trees" and len(rest) == 1:
            return {f"{c}.json": VNode("file", size=len(self._tree_bytes(r))) for c, r in state.commits.items()}
        if top == "snapshots":
            if len(rest) == 1:
                return {commit: VNode("dir") for commit in state.commits}
            repo = self._commit(state, rest[1])
            if repo is None:
                return {}
            inner = "/".join(rest[2:])
            try:
                entries = repo.list(inner)
            except RemoteNotFound:
                return {}
            depth = len(rest) - 2  # directories below the snapshot root
            out = {}
            for entry in entries:
                if entry.is_dir:
                    out[entry.name] = VNode("dir")
                else:
                    target = "../" * (depth + 2) + f"blobs/{entry.content_id}"
                    out[entry.name] = VNode("symlink", target=target)
            return out
        return {}

    def _tree_bytes(self, repo: HubRepo) -> bytes:
        """huggingface_hub's `trees/<commit>.json` (format_version 1) for a commit."""
        data = self._tree_json.get(repo.commit)
        if data is None:
            files = {}
            for entry in sorted(repo.files(), key=lambda e: e.path):
                info: dict = {"size": entry.size, "blob_id": entry.git_oid}
                if entry.lfs:
                    info.update(lfs_sha256=entry.content_id, lfs_size=entry.size)
                files[entry.path] = info
            data = json.dumps({"format_version": 1, "files": files}, indent=1).encode()
            self._tree_json[repo.commit] = data
        return data

    def can_copy_up(self, path: str, node: VNode) -> bool:
        """Refs may be rewritten (huggingface_hub records a newer commit of a branch there): the ref is
        copied into the backing, which then shadows it. Blobs, snapshots and trees stay EROFS."""
        parts = path.split("/")
        return len(parts) == 3 and parts[1] == "refs" and node.kind == "file"

    def virtual_open(self, path: str, node: VNode) -> FileHandle:
        state, rest = self._resolve(path)
        if state is None or len(rest) != 2:
            raise fs_error(errno.ENOENT)
        top, name = rest
        if top == "refs":
            return FileHandle(data=state.refs[name].encode())
        if top == "trees":
            repo = state.commits.get(name.removesuffix(".json"))
            if repo is None:
                raise fs_error(errno.ENOENT)
            return FileHandle(data=self._tree_bytes(repo))
        if top == "blobs":
            found = state.blobs().get(name)
            if found is None:
                raise fs_error(errno.ENOENT)
            repo, entry = found
            if self.read_ahead is not None:
                self.read_ahead(repo, entry)
            fd, unpin = self.store.open_blob(name, repo, entry)
            return FileHandle(fd=fd, keep_cache=True, on_release=unpin)
        raise fs_error(errno.ENOENT)
