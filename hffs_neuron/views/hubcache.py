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
import functools
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import LRUCache

from .. import constants
from ..errors import HffsError, RemoteAccessDenied, RemoteNotFound, RemoteUnavailable, no_access
from ..remote.admission import AdmissionLimiter
from ..remote.base import RemoteEntry
from ..remote.http import HubHttp
from ..remote.hub import HubRepo
from ..store.blobstore import BlobStore
from ..store.metacache import MetadataCache
from .creators import Caller
from .localfs import LocalTree
from .merged import FileHandle, MergedView, VNode, fs_error

logger = logging.getLogger(__name__)

_FOLDER = re.compile(r"^(models|datasets)--(.+)$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# `.no_exist` is always there so that every user's huggingface_hub can record a missing file in it.
_REPO_DIRS = ("blobs", "refs", "snapshots", "trees", ".no_exist")
# The private directory of copy-up temp files, in the backing (renames stay on one filesystem); never shown.
_TMP_DIR = ".hffs-tmp"
# The longest ref file a client may install (a commit id; a little slack for odd writers).
_MAX_REF_BYTES = 256
# A directory listing is reused only if the directory's mtime is older than the listing by this much.
_MTIME_TRUST_NS = 2_000_000_000
# huggingface_hub 2.x writes `refs/<rev>` through `refs/<rev>.<uuid4().hex[:8]>.tmp` + os.replace.
_HF_TEMP_REF = re.compile(r"^.+\.[0-9a-f]{8}\.tmp$")
_CONTENT_DIRS = ("blobs", "snapshots")  # where file bytes are served (access-checked for gated/private)
# trees/<commit>.json documents kept built, in bytes (one of a 500,000-file repo is about 80 MB).
_TREE_JSON_BYTES = 128 * 1024 * 1024
# How long a repo lookup that failed after its whole deadline (timeout, 5xx) is answered from memory:
# one FUSE call asks twice (the layer path's casing, then the view), and the kernel may repeat it at
# once; each must not wait out the deadline again. Far below the negative TTL, so recovery is not delayed.
_FAILED_LOOKUP_MEMO_S = 1.0
_FAILED_LOOKUP_MEMO_MAX = 1024
_ETAG = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


def repo_folder(repo_type: str, repo_id: str) -> str:
    """huggingface_hub's folder name for a repo: `models--Org--Name`."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


@functools.lru_cache(maxsize=4096)  # called several times per FUSE call on the same few folder names
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
    # Both dicts are changed only under the view's lock; iterate the view's snapshots of them.
    refs: dict[str, str] = field(default_factory=dict)  # revision -> commit
    commits: dict[str, HubRepo] = field(default_factory=dict)
    gated: bool = False  # files need a token with access (metadata is public)
    private: bool = False  # the Hub showed it to this mount's token at all


# How long the backing directory's missing directories are remembered (`LocalTree.absent_ttl`): what the
# mount itself creates shows at once; a directory another process makes there, within a second, as a
# kernel "not found" would.
LAYER_ABSENT_TTL = 1.0


class HubCacheView(MergedView):
    # Called with (repo, file) on every open of a blob before it is fetched: the daemon's read-ahead.
    read_ahead: Callable[[HubRepo, RemoteEntry], None] | None = None
    # Snapshot symlinks point at one blob forever; local ones change only through the mount (fuse_ops.py).
    immutable_symlinks = True
    # Kernel entry and attribute timeout (fuse_ops.py): snapshot entries, blobs and trees never change
    # (commit-pinned, content-addressed), refs keep their size when their commit moves (their bytes are
    # read on every open) and local entries change through the mount. Five minutes lets a warm walk of a
    # 500,000-file snapshot (two minutes cold here) reuse the kernel's entries instead of one lookup each.
    kernel_attr_timeout = 300.0

    def __init__(
        self,
        http: HubHttp,
        store: BlobStore,
        meta: MetadataCache,
        backing_dir: str | os.PathLike,
        state_dir: str | os.PathLike,
        *,
        pinned: list[tuple[str, str, str]] = (),
        read_only: bool = False,
        revision_ttl: float | None = None,
        group_gid: int | None = None,
        shared: bool = False,
        max_resolutions_per_s: float = constants.MAX_RESOLUTIONS_PER_S,
    ):
        super().__init__(
            # Its mode is the mount root's: others may enter. A walk of a snapshot asks it about every file
            # of directories it lacks: each missing directory is remembered for LAYER_ABSENT_TTL.
            LocalTree(backing_dir, create_mode=0o755, absent_ttl=LAYER_ABSENT_TTL),
            upper="",
            tmp=_TMP_DIR,
            state=LocalTree(state_dir),
            read_only=read_only,
            group_gid=group_gid,
        )
        self.http = http
        self.store = store
        self.meta = meta
        self.revision_ttl = revision_ttl
        self.shared = shared  # --allow-other: other users' access to gated/private repos is checked
        self._repos: dict[tuple[str, str], RepoState] = {}  # (type, id.lower()) -> state
        self._lock = threading.Lock()
        self._folders_memo: tuple[tuple[int, int], int, dict[str, str]] | None = None
        # (monotonic time, the backing tree's `changes`) when the memo last proved current by its mtime.
        self._folders_checked: tuple[float, int] = (float("-inf"), -1)
        # (type, id.lower()) -> (monotonic expiry, the error) of repo lookups that just failed, _lock
        self._failed_lookups: dict[tuple[str, str], tuple[float, RemoteUnavailable]] = {}
        self._tree_json: LRUCache = LRUCache(maxsize=_TREE_JSON_BYTES, getsizeof=len)  # commit -> bytes, _lock
        # (repo type, lower-cased id, etag) -> (commit's repo, file path) of every file served from a
        # listing: `blobs/<etag>` (what each snapshot symlink points to) is answered from the file's
        # directory listing, not the whole tree. Paths only, so that evicted listings are not kept alive;
        # bounded like the listings; a forgotten etag costs one recursive listing.
        self._etags: LRUCache = LRUCache(maxsize=meta.maxsize)
        # (commit namespace, directory) -> `readdir`'s answer (names and modes) of snapshot directories the
        # backing holds nothing of: a warm walk answers each `readdir` without rebuilding it.
        self._readdir_memo: LRUCache = LRUCache(maxsize=meta.maxsize, getsizeof=lambda entries: max(1, len(entries)))
        # Lookups of names not seen yet, started by clients: bounded (see `_hub_repo`).
        self.resolutions = AdmissionLimiter(
            max_resolutions_per_s, constants.MAX_CONCURRENT_RESOLUTIONS, "Hub lookups of new repos or revisions"
        )
        for repo_type, repo_id, revision in pinned:
            self.pin_repo(repo_type, repo_id, revision, limited=False)

    # -- repos ----------------------------------------------------------------------------------
    def _repo_key(self, repo_type: str, repo_id: str, revision: str) -> tuple:
        return (self.http.endpoint, self.http.token_fingerprint, "repo", repo_type, repo_id.lower(), revision)

    def _hub_repo(self, repo_type: str, repo_id: str, revision: str, *, limited: bool = True) -> HubRepo:
        """`repo_id@revision` resolved on the Hub (cached). `limited`: a client's lookup, admitted by
        `self.resolutions` or refused at once with EAGAIN (not cached, so a later lookup goes upstream)."""
        key = self._repo_key(repo_type, repo_id, revision)
        ttl = constants.PINNED_TTL if _COMMIT.match(revision) else self.revision_ttl

        def resolve() -> HubRepo:
            if not limited:
                return HubRepo(self.http, repo_type, repo_id, revision, listings=self.meta)
            with self.resolutions.admit():
                return HubRepo(self.http, repo_type, repo_id, revision, listings=self.meta)

        return self.meta.get(key, resolve, ttl=ttl)

    def pin_repo(self, repo_type: str, repo_id: str, revision: str = "main", *, limited: bool = True) -> RepoState:
        """Resolve `repo_id@revision` now and keep it listed (`limited=False`: mount-time `--repo`)."""
        repo = self._hub_repo(repo_type, repo_id, revision, limited=limited)
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
            state.gated = state.gated or repo.gated  # once gated, every open is checked
            state.private = state.private or repo.private
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
        key = (repo_type, repo_id.lower())
        now = time.monotonic()
        with self._lock:
            state = self._repos.get(key)
            failed = self._failed_lookups.get(key)
        if state is not None and state.refs:
            return state
        if failed is not None and failed[0] > now:
            raise failed[1]
        try:
            return self.pin_repo(repo_type, repo_id, "main")
        except RemoteNotFound:
            return None
        except RemoteUnavailable as exc:
            self._remember_failed_lookup(key, exc)
            raise

    def _remember_failed_lookup(self, key: tuple[str, str], exc: RemoteUnavailable) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failed_lookups) >= _FAILED_LOOKUP_MEMO_MAX:
                self._failed_lookups = {k: v for k, v in self._failed_lookups.items() if v[0] > now}
            if len(self._failed_lookups) < _FAILED_LOOKUP_MEMO_MAX:
                self._failed_lookups[key] = (now + _FAILED_LOOKUP_MEMO_S, exc)

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
        found = self._backing_folders().get(folder.lower())
        if found is not None:
            return found
        with self._lock:
            state = self._repos.get((parsed[0], parsed[1].lower()))
        if state is None:
            try:
                state = self._repo_state(folder)
            except HffsError:
                state = None  # offline or failing Hub: keep the caller's casing
        return repo_folder(state.repo_type, state.repo_id) if state else folder

    def _backing_folders(self) -> dict[str, str]:
        """Lower-cased name -> the backing's casing (sorted first) of each top-level entry.

        Every path below a repo folder is canonicalized: the listing is reused while the backing
        root's mtime stays put, and trusted only once that mtime is older than the listing by more
        than a timestamp tick could hide (coarse or skewed file-system clocks). A memo found current is
        used without looking again for LAYER_ABSENT_TTL, unless the mount changed the tree meanwhile: a
        walk asks for it on every file."""
        now, changes = time.monotonic(), self.local.changes
        with self._lock:
            memo, (checked_at, checked_changes) = self._folders_memo, self._folders_checked
        if memo is not None and checked_changes == changes and now - checked_at < LAYER_ABSENT_TTL:
            return memo[2]
        st = self.local.lstat("")
        stamp = (st.st_mtime_ns, st.st_ino)
        if memo is not None and memo[0] == stamp and memo[1] - st.st_mtime_ns > _MTIME_TRUST_NS:
            with self._lock:
                self._folders_checked = (now, changes)
            return memo[2]
        listed_at = time.time_ns()
        folders: dict[str, str] = {}
        for name, _mode in sorted(self.local.listdir("")):
            folders.setdefault(name.lower(), name)
        with self._lock:
            self._folders_memo = (stamp, listed_at, folders)
        return folders

    def layer_path(self, path: str) -> str:
        parts = path.split("/")
        if parse_repo_folder(parts[0]):
            parts[0] = self.canonical_folder(parts[0])
        elif parts[0] == ".locks" and len(parts) > 1 and parse_repo_folder(parts[1]):
            parts[1] = self.canonical_folder(parts[1])
        return "/".join(parts)

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
                found = self._blob(state, name)
                return VNode("file", size=found[1].size) if found else None
            if top == "trees":  # one document, not every commit's (huggingface_hub's temp names: none)
                repo = self._commit(state, name.removesuffix(".json")) if name.endswith(".json") else None
                return VNode("file", size=len(self._tree_bytes(repo))) if repo else None
            if top == "snapshots":
                self._commit(state, name)
            elif top == "refs" and name not in state.refs:
                self._ref(state, name)
        if len(rest) > 2 and rest[0] == "snapshots":  # a file or directory of a snapshot: its directory only
            repo = self._commit(state, rest[1])
            if repo is None:
                return None
            try:
                entry = repo.stat("/".join(rest[2:]))
            except RemoteNotFound:
                return None
            return self._snapshot_node(state, repo, entry, len(rest) - 3)
        return self._children_of(state, rest[:-1]).get(rest[-1])

    def _ref(self, state: RepoState, revision: str) -> None:
        """Resolve a branch or tag name not seen yet (`refs/<name>`); unknown names stay absent.

        Dotfiles and huggingface_hub's own temp names (`<rev>.<8 hex>.tmp`, written on every ref
        update) are never asked of the Hub; a tag that merely ends in `.tmp` still is.
        """
        if _COMMIT.match(revision) or revision.startswith(".") or _HF_TEMP_REF.match(revision):
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

    def _snapshot(self, state: RepoState) -> tuple[dict[str, str], dict[str, HubRepo]]:
        """Copies of a repo's refs and commits, taken under the lock (other threads add to them)."""
        with self._lock:
            return dict(state.refs), dict(state.commits)

    def _note(self, state: RepoState, repo: HubRepo, *entries: RemoteEntry) -> None:
        """Remember which file `blobs/<etag>` is (the snapshot symlink to it was just shown)."""
        folder = (state.repo_type, state.repo_id.lower())
        with self._lock:
            for entry in entries:
                key = (*folder, entry.content_id)
                if key not in self._etags:
                    self._etags[key] = (repo, entry.path)

    def _blob(self, state: RepoState, etag: str) -> tuple[HubRepo, RemoteEntry] | None:
        """The file behind `blobs/<etag>`: one a listing showed (found again in its directory's listing,
        listed anew if it was evicted), else found by listing whole commits."""
        key = (state.repo_type, state.repo_id.lower(), etag)
        with self._lock:
            found = self._etags.get(key)
        if found is None and _ETAG.match(etag):
            self._all_blobs(state)  # notes every blob: a `stat` of each blob in turn lists the tree once
            with self._lock:
                found = self._etags.get(key)
        if found is None:
            return None
        repo, path = found
        try:
            entry = repo.stat(path)
        except RemoteNotFound:
            return None
        return (repo, entry) if entry.content_id == etag else None

    def _all_blobs(self, state: RepoState) -> dict[str, RemoteEntry]:
        """Every blob of every commit the mount knows (`ls blobs/`: whole listings), each noted."""
        blobs: dict[str, RemoteEntry] = {}
        for repo in self._snapshot(state)[1].values():
            files = [e for e in repo.files() if e.content_id]
            self._note(state, repo, *files)
            blobs.update((e.content_id, e) for e in files)
        return blobs

    def _snapshot_node(self, state: RepoState, repo: HubRepo, entry: RemoteEntry, depth: int) -> VNode:
        """A snapshot entry `depth` directories below the snapshot root: a directory, or a relative
        symlink to its blob (noted, so that the kernel's lookup of the target costs no listing)."""
        if entry.is_dir:
            return VNode("dir")
        self._note(state, repo, entry)
        return VNode("symlink", target="../" * (depth + 2) + f"blobs/{entry.content_id}")

    def _children_of(self, state: RepoState, rest: list[str]) -> dict[str, VNode]:
        """Children of a directory inside a repo folder (`rest` is its path below the folder)."""
        if not rest:
            return {name: VNode("dir") for name in _REPO_DIRS}
        top = rest[0]
        refs, commits = self._snapshot(state)
        if top == "refs" and len(rest) == 1:
            return {rev: VNode("file", size=len(commit)) for rev, commit in refs.items() if "/" not in rev}
        if top == "blobs" and len(rest) == 1:
            return {etag: VNode("file", size=entry.size) for etag, entry in self._all_blobs(state).items()}
        if top == "trees" and len(rest) == 1:
            return {f"{c}.json": VNode("file", size=len(self._tree_bytes(r))) for c, r in commits.items()}
        if top == "snapshots":
            if len(rest) == 1:
                return {commit: VNode("dir") for commit in commits}
            repo = self._commit(state, rest[1])
            if repo is None:
                return {}
            try:
                entries = repo.list("/".join(rest[2:]))
            except RemoteNotFound:
                return {}
            depth = len(rest) - 2  # directories below the snapshot root
            return {entry.name: self._snapshot_node(state, repo, entry, depth) for entry in entries}
        return {}

    def fixed_listing(self, path: str) -> bool:
        # A snapshot (named by its commit) and its directories list the same files forever, unless a client
        # wrote into one: each casing of a repo folder is its own directory to the kernel, and a write
        # through one would not drop the listing kept for another.
        parts = path.split("/")
        return (
            len(parts) >= 3
            and parts[1] == "snapshots"
            and bool(_COMMIT.fullmatch(parts[2]))
            and parse_repo_folder(parts[0]) is not None
            and not self.layer_has(path)
        )

    def readdir(self, path: str) -> list[tuple[str, int]]:
        state, rest = self._resolve(path) if path else (None, [])
        repo = self._commit(state, rest[1]) if state is not None and len(rest) >= 2 and rest[0] == "snapshots" else None
        if repo is None or self._lstat(self._rel(path)) is not None:
            return super().readdir(path)
        key = (repo.cache_namespace, "/".join(rest[2:]))
        with self._lock:
            entries = self._readdir_memo.get(key)
        if entries is None:  # a commit's directory never changes: its answer stands while the backing adds none
            entries = super().readdir(path)
            with self._lock:
                self._readdir_memo[key] = entries
        return entries

    def readdir_attrs(self, path: str) -> list[tuple[str, int, dict | None]]:
        """`readdir` with each entry's attributes (FUSE readdirplus, fuse_ops.py): a walk then needs no
        lookup per entry. Inside a repo folder the entries come from the nodes `readdir` was built from
        (a snapshot directory's listing, already held: no request); local entries and the top level take
        `getattr` per entry.
        An entry whose attributes cannot be had right now (e.g. a Hub error) goes without them."""
        entries = self.readdir(path)
        state, rest = self._resolve(path) if path else (None, [])
        virtual: dict[str, VNode] = {}
        local: set[str] = set()
        if state is not None and rest:  # inside a repo folder: the entries' own nodes (blobs/: no lookup each)
            virtual = self._children_of(state, rest)
            rel = self._rel(path)
            st = self._lstat(rel)
            if st is not None and stat.S_ISDIR(st.st_mode):
                local = {name for name, _mode in self.local.listdir(rel)}
        out: list[tuple[str, int, dict | None]] = []
        for name, mode in entries:
            child = f"{path}/{name}" if path else name
            node = virtual.get(name)
            try:
                if node is not None and name not in local:
                    attrs = self._vattrs(node)
                    self.adjust_attrs(child, attrs)
                else:
                    attrs = self.getattr(child)
            except (OSError, HffsError):
                attrs = None
            out.append((name, mode, attrs))
        return out

    def _tree_bytes(self, repo: HubRepo) -> bytes:
        """huggingface_hub's `trees/<commit>.json` (format_version 1) for a commit."""
        with self._lock:
            data = self._tree_json.get(repo.commit)
        if data is None:  # built outside the lock: it may list the tree (network) and is large
            # Written entry by entry: a dict of every file first would cost ~1 KB per file while it is
            # built (~0.5 GB for 500,000 files); the document itself is ~115 bytes per file.
            out = bytearray(b'{"format_version": 1, "files": {')
            for i, entry in enumerate(sorted(repo.files(), key=lambda e: e.path)):
                info: dict = {"size": entry.size, "blob_id": entry.git_oid}
                if entry.lfs:
                    info.update(lfs_sha256=entry.content_id, lfs_size=entry.size)
                out += b"%s\n %s: %s" % (b"," if i else b"", json.dumps(entry.path).encode(), json.dumps(info).encode())
            out += b"\n}}\n"
            data = bytes(out)
            with self._lock:
                try:
                    self._tree_json[repo.commit] = data
                except ValueError:  # larger than the whole budget: built again on the next use
                    pass
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
            repo = self._snapshot(state)[1].get(name.removesuffix(".json"))
            if repo is None:
                raise fs_error(errno.ENOENT)
            return FileHandle(data=self._tree_bytes(repo))
        if top == "blobs":
            found = self._blob(state, name)
            if found is None:
                raise fs_error(errno.ENOENT)
            repo, entry = found
            if self.read_ahead is not None:
                self.read_ahead(repo, entry)
            fd, unpin = self.store.open_blob(name, repo, entry)
            return FileHandle(fd=fd, keep_cache=True, on_release=unpin)
        raise fs_error(errno.ENOENT)

    # -- shared-host rules (README "Security model") ---------------------------------------
    def check_write(self, path: str, caller: Caller | None) -> None:
        """Other users write only where huggingface_hub must: lock files, `.no_exist` markers and refs
        (a ref only as a rename that names the Hub's commit, see `rename`). Snapshots and blobs come
        from the Hub: nobody else adds to them."""
        super().check_write(path, caller)
        if self.is_owner(caller):
            return
        parts = path.split("/")
        if parts[0] == ".locks" and len(parts) > 1:
            return
        if parse_repo_folder(parts[0]) and len(parts) > 2 and parts[1] in (".no_exist", "refs"):
            return
        raise fs_error(errno.EACCES)

    def policy_mode(self, path: str, is_dir: bool) -> int | None:
        if not is_dir:
            return None
        parts = path.split("/")
        if parts[0] == ".locks" or (len(parts) >= 2 and parse_repo_folder(parts[0]) and parts[1] == ".no_exist"):
            return 0o1777  # like /tmp: everyone creates, only the creator (or owner) removes
        return None

    def adjust_attrs(self, path: str, attrs: dict) -> None:
        super().adjust_attrs(path, attrs)
        if self.shared and "/" not in path and parse_repo_folder(path) and self._is_restricted(path):
            self.restrict(attrs)
        elif stat.S_ISDIR(attrs["st_mode"]) and _in_refs(path, or_itself=True):
            # Shown writable by all, not sticky, and kept 0755 on disk: a user's ref rename must be
            # able to replace the owner's ref; `rename` and `unlink` decide who may do what here.
            attrs["st_mode"] = stat.S_IFDIR | 0o777

    def _is_restricted(self, folder: str) -> bool:
        """A gated or private repo: its files are for the owner (and --group) only. So is a folder the
        Hub cannot vouch for: unreachable, or not found (a private repo this token cannot see)."""
        try:
            state = self._repo_state(folder)
        except HffsError:
            return True
        if state is None:
            return True
        with self._lock:
            repos = list(state.commits.values())
        return any(repo.gated or repo.private for repo in repos)

    def _caller_owns(self, path: str, caller: Caller) -> bool:
        try:
            return self.local.lstat(self._rel(path)).st_uid == caller.uid
        except FileNotFoundError:
            return False

    def unlink(self, path: str, caller: Caller | None = None) -> None:
        if not self.is_owner(caller) and _in_refs(path) and not self._caller_owns(path, caller):
            raise fs_error(errno.EPERM)  # refs/ is not sticky (see policy_mode): the rule is ours
        super().unlink(path, caller)

    def rename(self, old: str, new: str, caller: Caller | None = None, *, noreplace: bool = False) -> None:
        if self.is_owner(caller) or not (_in_refs(old) or _in_refs(new)):
            super().rename(old, new, caller, noreplace=noreplace)
            return
        self.check_write(old, caller)
        self.check_write(new, caller)
        if not (_in_refs(old) and _in_refs(new)) or not self._caller_owns(old, caller):
            raise fs_error(errno.EPERM)
        if noreplace and (self._lstat(self._rel(new)) is not None or self._vnode(new) is not None):
            raise fs_error(errno.EEXIST)
        self._install_ref(old, new)

    def _install_ref(self, source: str, ref: str) -> None:
        """Another user's `refs/<rev>` update: accepted only when it names the commit the Hub reports
        for <rev>. The owner's own copy of that commit is installed (the user's file, which the user
        could still write to, is only read), then the user's file is removed."""
        source_rel, ref_rel = self._rel(source), self._rel(ref)
        fd = self.local.open(source_rel, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            claimed = f.read(_MAX_REF_BYTES + 1).decode(errors="replace")
        parts = ref.split("/")
        state = self._repo_state(parts[0])
        revision = "/".join(parts[2:])
        if state is None or not _COMMIT.match(claimed) or claimed != self._hub_commit(state, revision, claimed):
            logger.warning("refused a ref update from another user: %s -> %r", ref, claimed[:64])
            raise fs_error(errno.EACCES)
        self._ensure_local_parent(ref)
        tmp = self._tmp_name()
        try:
            out = self.local.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(out, "wb") as f:
                os.fchmod(out, 0o644)
                f.write(claimed.encode())
            with self._locks.hold(source, ref):
                self.local.rename(tmp, ref_rel)
                self.local.unlink(source_rel)
                self.creators.forget(self._key(source_rel))
                self.creators.forget(self._key(ref_rel))
        finally:
            if self.local.exists(tmp):
                self.local.unlink(tmp)
        with self._lock:
            state.refs[revision] = claimed

    def _hub_commit(self, state: RepoState, revision: str, claimed: str) -> str | None:
        """The Hub's commit for `revision`, re-asked once when the cached answer differs from `claimed`
        (the branch may have moved within the metadata TTL)."""
        try:
            commit = self._hub_repo(state.repo_type, state.repo_id, revision).commit
            if commit != claimed:
                self.meta.invalidate(lambda key: key == self._repo_key(state.repo_type, state.repo_id, revision))
                commit = self._hub_repo(state.repo_type, state.repo_id, revision).commit
        except RemoteNotFound:
            return None
        return commit

    # -- access to gated and private content (issue 12.5) -----------------------------------------
    def open(self, path: str, flags: int, caller: Caller | None = None) -> FileHandle:
        if flags & os.O_ACCMODE != os.O_WRONLY:
            self.check_content_access(path)
        return super().open(path, flags, caller)

    def check_content_access(self, path: str) -> None:
        """Raise EACCES unless this mount may serve the bytes at `path`.

        A blob or snapshot file of a gated or private repo may come from the blob store shared with
        other mounts, or from a shared backing directory, with no request of ours: it is served only
        once this mount's own identity was confirmed (private: the repo resolved with our token;
        gated: a one-byte download, remembered per repo and token for the metadata TTL). A repo the Hub
        does not show to this token cannot be told apart from a private one: EACCES as well.
        """
        parts = path.split("/")
        if len(parts) < 3 or parts[1] not in _CONTENT_DIRS or parse_repo_folder(parts[0]) is None:
            return
        state = self._repo_state(parts[0])
        if state is None and self.http.offline and not self.shared:
            return  # HF_HUB_OFFLINE=1: only the owner reaches this mount, and reads what it cached itself
        if state is None:
            raise no_access(parse_repo_folder(parts[0])[1])  # private or gone: the Hub does not show it to us
        if not state.gated or state.private:
            return  # public, or private and resolved with our own token
        if not self.http.has_token:
            raise no_access(state.repo_id)
        key = (self.http.endpoint, self.http.token_fingerprint, "access", state.repo_type, state.repo_id.lower())
        denied = self.meta.get(key, lambda: self._probe_download_access(state), ttl=self.meta.ttl)
        if denied:
            raise RemoteAccessDenied(denied, repo=state.repo_id)

    def _probe_download_access(self, state: RepoState) -> str:
        """Why this mount's token may not download the repo's files; "" if it may (cached either way)."""
        commits = self._snapshot(state)[1]
        if not commits:
            return ""
        try:
            next(iter(commits.values())).check_download_access()
        except RemoteAccessDenied as exc:
            return str(exc)
        return ""


def _in_refs(path: str, *, or_itself: bool = False) -> bool:
    """Is `path` below a repo folder's `refs/` (`or_itself`: or `refs/` itself)?"""
    parts = path.split("/")
    deep_enough = len(parts) >= 2 if or_itself else len(parts) > 2
    return deep_enough and parts[1] == "refs" and parse_repo_folder(parts[0]) is not None
