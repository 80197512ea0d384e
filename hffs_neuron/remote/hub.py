"""A Hub model or dataset repo, pinned to one commit."""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import HffsError, RemoteAccessDenied, RemoteNotFound, RemoteUnavailable, UsageError
from .base import Digest, RemoteEntry, checked_size, drop_unsafe, is_git_oid, is_sha256
from .http import HubHttp

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset")


def check_repo_id(repo_id: str) -> None:
    """Raise UsageError unless `repo_id` is a syntactically valid `org/name` (or `name`)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid repo id {repo_id!r}: expected 'org/name'") from exc


class HubRepo:
    """A repo whose revision is resolved to a commit once, at construction, and pinned.

    The whole file tree at that commit is listed once (it cannot change) and answers `list`/`stat`.
    """

    def __init__(self, http: HubHttp, repo_type: str, repo_id: str, revision: str = "main"):
        if repo_type not in REPO_TYPES:
            raise UsageError(f"unknown repo type {repo_type!r}: expected one of {', '.join(REPO_TYPES)}")
        check_repo_id(repo_id)
        self._http = http
        self.repo_type = repo_type
        what = f"{repo_type} {repo_id}@{revision}"
        info = http.get_json(f"api/{repo_type}s/{repo_id}/revision/{quote(revision, safe='')}", what=what)
        if not isinstance(info, dict):
            raise HffsError(f"{what}: the Hub answered {type(info).__name__}, expected an object")
        # Both end up in file names and symlink targets: only well-formed values are taken.
        if not is_git_oid(info.get("sha")):
            raise HffsError(f"{what}: the Hub answered an invalid commit id {str(info.get('sha'))[:80]!r}")
        canonical = info.get("id")
        if not isinstance(canonical, str) or canonical.lower() != repo_id.lower():
            canonical = repo_id  # a renamed repo (or a bad answer): keep the name the caller asked for
        self.repo_id: str = canonical  # the Hub's canonical casing
        self.commit: str = info["sha"]
        self.gated = bool(info.get("gated"))  # metadata is public, files need a token with access
        self.private = bool(info.get("private"))  # resolving it at all needed a token with access
        self.revision = revision
        self.cache_namespace = f"{http.endpoint}|{http.token_fingerprint}|{repo_type}|{self.repo_id}|{self.commit}"
        self._tree: dict[str, RemoteEntry] | None = None
        self._children: dict[str, list[RemoteEntry]] = {}
        self._tree_lock = threading.Lock()

    def _load_tree(self) -> dict[str, RemoteEntry]:
        if self._tree is not None:
            return self._tree
        # Another thread may be listing: wait for it at most as long as a listing may take.
        if not self._tree_lock.acquire(timeout=self._http.operation_timeout):
            raise RemoteUnavailable(f"{self.repo_id}@{self.commit[:12]}: timed out waiting for the file list")
        try:
            if self._tree is not None:
                return self._tree
            what = f"{self.repo_type} {self.repo_id}@{self.commit[:12]}: tree"
            items = self._http.paginate(
                f"api/{self.repo_type}s/{self.repo_id}/tree/{self.commit}",
                {"recursive": "true", "expand": "false"},
                what,
            )
            parsed = []
            for item in items:
                try:
                    parsed.append(_entry_from_item(item))
                except (KeyError, TypeError, ValueError, AttributeError) as exc:  # one bad item, not all
                    logger.warning("%s: ignoring a malformed tree item (%s): %r", what, exc, item)
            entries = drop_unsafe(parsed, what)
            tree = {"": RemoteEntry(path="", is_dir=True)}
            for entry in entries:
                tree[entry.path] = entry
                parent = posixpath.dirname(entry.path)
                while parent and parent not in tree:  # directories implied by files
                    tree[parent] = RemoteEntry(path=parent, is_dir=True)
                    parent = posixpath.dirname(parent)
            children: dict[str, list[RemoteEntry]] = {path: [] for path, e in tree.items() if e.is_dir}
            for path, entry in tree.items():
                if path:
                    children.setdefault(posixpath.dirname(path), []).append(entry)
            self._children = children
            self._tree = tree
            return tree
        finally:
            self._tree_lock.release()

    def files(self) -> list[RemoteEntry]:
        """Every file of the repo at the pinned commit."""
        return [e for e in self._load_tree().values() if not e.is_dir]

    def list(self, path: str) -> list[RemoteEntry]:
        entry = self.stat(path)
        if not entry.is_dir:
            raise RemoteNotFound(f"{self.repo_id}: {path!r} is not a directory")
        return list(self._children.get(path, []))

    def stat(self, path: str) -> RemoteEntry:
        entry = self._load_tree().get(path.strip("/"))
        if entry is None:
            raise RemoteNotFound(f"{self.repo_id}@{self.commit[:12]}: {path!r} not found")
        return entry

    def read_range(
        self, entry: RemoteEntry, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float
    ) -> None:
        """Stream bytes [start, end) of `entry` to `sink(offset, data)`, retrying transient failures."""
        self._http.stream_range(self.download_url(entry), start, end, sink, f"read {entry.path}", deadline)

    def check_download_access(self) -> None:
        """Raise RemoteAccessDenied unless this identity may download files: one byte of the smallest one.

        Metadata of a gated repo is public, its files are not: only a download tells.
        """
        files = [e for e in self.files() if e.size > 0]
        if not files:
            return  # nothing to read, nothing to protect
        smallest = min(files, key=lambda e: e.size)
        try:
            self.read_range(smallest, 0, 1, lambda _o, _d: None, time.monotonic() + self._http.operation_timeout)
        except RemoteAccessDenied as exc:
            raise RemoteAccessDenied(f"{self.repo_type} {self.repo_id} is gated: {exc}") from exc

    def xet_token_url(self) -> str:
        return self._http.url(f"api/{self.repo_type}s/{self.repo_id}/xet-read-token/{self.commit}")

    def download_url(self, entry: RemoteEntry) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return self._http.url(f"{prefix}{self.repo_id}/resolve/{self.commit}/{quote(entry.path)}")


def _entry_from_item(item: dict) -> RemoteEntry:
    """A tree item as an entry; ValueError for object ids that are not lowercase hex of the right length
    (they become blob names and symlink targets) and for impossible sizes."""
    if item.get("type") == "directory":
        return RemoteEntry(path=item["path"], is_dir=True)
    lfs, oid = item.get("lfs"), item.get("oid")
    if lfs and not is_sha256(lfs.get("oid")):
        raise ValueError(f"invalid LFS sha256 {str(lfs.get('oid'))[:80]!r}")
    if not is_git_oid(oid) and not (lfs and oid is None):  # an LFS pointer's own oid is optional
        raise ValueError(f"invalid git object id {str(oid)[:80]!r}")
    xet_hash = item.get("xetHash")
    if xet_hash is not None and not is_sha256(xet_hash):
        xet_hash = None  # unusable: the file is still served over HTTP
    if lfs:
        return RemoteEntry(
            path=item["path"],
            is_dir=False,
            size=checked_size(lfs.get("size", item.get("size", 0))),
            content_id=lfs["oid"],
            digest=Digest("sha256", lfs["oid"]),
            lfs=True,
            git_oid=item.get("oid"),
            xet_hash=xet_hash,
        )
    return RemoteEntry(
        path=item["path"],
        is_dir=False,
        size=checked_size(item.get("size", 0)),
        content_id=item["oid"],
        digest=Digest("git-sha1", item["oid"]),
        git_oid=item["oid"],
        xet_hash=xet_hash,
    )
