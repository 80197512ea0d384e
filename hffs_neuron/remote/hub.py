"""A Hub model or dataset repo, pinned to one commit."""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Callable
from urllib.parse import quote

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import RemoteNotFound, UsageError
from .base import Digest, RemoteEntry, drop_unsafe
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
        self.repo_id: str = info["id"]  # the Hub's canonical casing
        self.commit: str = info["sha"]
        self.gated = bool(info.get("gated"))  # metadata is public, files need a token with access
        self.private = bool(info.get("private"))
        self.revision = revision
        self.cache_namespace = f"{http.endpoint}|{http.token_fingerprint}|{repo_type}|{self.repo_id}|{self.commit}"
        self._tree: dict[str, RemoteEntry] | None = None
        self._children: dict[str, list[RemoteEntry]] = {}
        self._tree_lock = threading.Lock()

    def _load_tree(self) -> dict[str, RemoteEntry]:
        with self._tree_lock:
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
                except (KeyError, TypeError, ValueError):  # one malformed item must not hide the rest
                    logger.warning("%s: ignoring a malformed tree item: %r", what, item)
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

    def download_url(self, entry: RemoteEntry) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return self._http.url(f"{prefix}{self.repo_id}/resolve/{self.commit}/{quote(entry.path)}")


def _entry_from_item(item: dict) -> RemoteEntry:
    if item.get("type") == "directory":
        return RemoteEntry(path=item["path"], is_dir=True)
    lfs = item.get("lfs")
    if lfs:
        return RemoteEntry(
            path=item["path"],
            is_dir=False,
            size=int(lfs.get("size", item.get("size", 0))),
            content_id=lfs["oid"],
            digest=Digest("sha256", lfs["oid"]),
            lfs=True,
            git_oid=item.get("oid"),
        )
    return RemoteEntry(
        path=item["path"],
        is_dir=False,
        size=int(item.get("size", 0)),
        content_id=item["oid"],
        digest=Digest("git-sha1", item["oid"]),
        git_oid=item["oid"],
    )
