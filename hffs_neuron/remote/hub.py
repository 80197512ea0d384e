"""A Hub model or dataset repo, pinned to one commit."""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .. import constants
from ..errors import HffsError, RemoteAccessDenied, RemoteNotFound, UsageError
from ..store.metacache import MetadataCache
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

    Its tree is listed one directory at a time, as clients reach it (the tree API with a path, not
    recursive): opening a file needs the listing of its own directory (and, for directories on the way
    that no held listing shows, one paths-info each), whatever the repo's size. The whole tree is listed
    only for callers that need every file (`files()`). Every listing is streamed page by page, each page
    with its own deadline (`--timeout`, attempts a fraction of it) and retried from its own cursor, so a
    slow but moving listing completes; the page cap bounds a server that never stops sending `next`.
    Listings live in `listings` (the mount's metadata cache: weighed by entries, evicted per directory).
    """

    def __init__(
        self,
        http: HubHttp,
        repo_type: str,
        repo_id: str,
        revision: str = "main",
        *,
        listings: MetadataCache | None = None,
    ):
        if repo_type not in REPO_TYPES:
            raise UsageError(f"unknown repo type {repo_type!r}: expected one of {', '.join(REPO_TYPES)}")
        check_repo_id(repo_id)
        self._http = http
        self.repo_type = repo_type
        what = f"{repo_type} {repo_id}@{revision}"
        info = http.get_json(
            f"api/{repo_type}s/{repo_id}/revision/{quote(revision, safe='')}",
            what=what,
            # Only what is used: the default answer lists every file of the repo (its size grows with it).
            params={"expand": ["sha", "private", "gated"]},
        )
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
        self._listings = listings if listings is not None else MetadataCache(wait_timeout=http.operation_timeout)
        self._api = f"api/{repo_type}s/{self.repo_id}"

    # -- listings ---------------------------------------------------------------------------------
    def _key(self, kind: str, path: str = "") -> tuple:
        return (self.cache_namespace, kind, path)

    def _pages(self, path: str, recursive: bool, key: tuple) -> Iterator[list[RemoteEntry]]:
        """The tree below `path`, page by page, each page with its own deadline (`HubHttp.pages`)."""
        what = f"{self.repo_type} {self.repo_id}@{self.commit[:12]}: tree {path or '/'}"
        url = self._http.url(f"{self._api}/tree/{self.commit}" + (f"/{quote(path)}" if path else ""))
        params = {"recursive": "true" if recursive else "false", "expand": "false"}
        for items in self._http.pages(url, params, what):
            yield _entries(items, what)
            self._listings.progress(key)  # another caller waiting on this listing waits for progress

    def _directory(self, path: str) -> dict[str, RemoteEntry]:
        """The direct children of directory `path` by name (cached; RemoteNotFound if it is none)."""
        key = self._key("dir", path)

        def load() -> dict[str, RemoteEntry]:
            children: dict[str, RemoteEntry] = {}
            for page in self._pages(path, False, key):
                children.update((e.name, e) for e in page if posixpath.dirname(e.path) == path)
            return children

        return self._listings.get(key, load, ttl=constants.PINNED_TTL)

    def _path_info(self, path: str) -> RemoteEntry:
        """One entry by paths-info (cached): a directory on the way to a file needs no listing of its parent."""

        def load() -> RemoteEntry:
            what = f"{self.repo_type} {self.repo_id}@{self.commit[:12]}: paths-info {path}"
            items, _ = self._http.request_json(
                "POST", f"{self._api}/paths-info/{self.commit}", what, data={"paths": [path]}
            )
            for entry in _entries(items if isinstance(items, list) else [], what):
                if entry.path == path:
                    return entry
            raise RemoteNotFound(f"{self.repo_id}@{self.commit[:12]}: {path!r} not found")

        return self._listings.get(self._key("info", path), load, ttl=constants.PINNED_TTL)

    def listed(self, path: str) -> dict[str, RemoteEntry] | None:
        """The children of `path` by name if its listing is held now (no request), else None."""
        found = self._listings.peek(self._key("dir", path.strip("/")))
        return found if isinstance(found, dict) else None

    def list(self, path: str) -> list[RemoteEntry]:
        """The direct children of directory `path` ("" is the root). Raises RemoteNotFound."""
        return list(self._directory(path.strip("/")).values())

    def stat(self, path: str) -> RemoteEntry:
        """The entry at `path`: from its directory's listing when held; a file otherwise lists its
        directory (every sibling then shows with its final size); a directory needs one paths-info."""
        path = path.strip("/")
        if not path:
            return RemoteEntry(path="", is_dir=True)
        parent, name = posixpath.split(path)
        children = self.listed(parent)
        if children is None:
            entry = self._path_info(path)
            if entry.is_dir:
                return entry
            children = self._directory(parent)
        entry = children.get(name)
        if entry is None:
            raise RemoteNotFound(f"{self.repo_id}@{self.commit[:12]}: {path!r} not found")
        return entry

    def files(self) -> list[RemoteEntry]:
        """Every file of the repo at the pinned commit: one recursive listing (held while it fits the
        metadata cache), which also fills the listing of every directory."""
        key = self._key("all")

        def load() -> tuple[RemoteEntry, ...]:
            directories: dict[str, dict[str, RemoteEntry]] = {"": {}}
            for page in self._pages("", True, key):
                for entry in page:
                    if entry.is_dir:
                        directories.setdefault(entry.path, {})  # listed even when empty
                    parent = posixpath.dirname(entry.path)
                    new = parent not in directories
                    directories.setdefault(parent, {})[entry.name] = entry
                    while new and parent:  # a directory the listing left out (or has not reached yet)
                        grand = posixpath.dirname(parent)
                        new = grand not in directories
                        siblings = directories.setdefault(grand, {})
                        siblings.setdefault(posixpath.basename(parent), RemoteEntry(parent, True))
                        parent = grand
            for path, children in directories.items():
                self._listings.put(self._key("dir", path), children, ttl=constants.PINNED_TTL)
            return tuple(e for children in directories.values() for e in children.values() if not e.is_dir)

        return list(self._listings.get(key, load, ttl=constants.PINNED_TTL))

    def read_range(
        self, entry: RemoteEntry, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float
    ) -> None:
        """Stream bytes [start, end) of `entry` to `sink(offset, data)`, retrying transient failures."""
        self._http.stream_range(self.download_url(entry), start, end, sink, f"read {entry.path}", deadline)

    def check_download_access(self) -> None:
        """Raise RemoteAccessDenied unless this identity may download files: one byte of the smallest one.

        Metadata of a gated repo is public, its files are not: only a download tells.
        """
        # The root's files usually suffice; the whole tree only for a repo whose root has none.
        files = [e for e in self.list("") if not e.is_dir and e.size > 0] or [e for e in self.files() if e.size > 0]
        if not files:
            return  # nothing to read, nothing to protect
        smallest = min(files, key=lambda e: e.size)
        try:
            self.read_range(smallest, 0, 1, lambda _o, _d: None, time.monotonic() + self._http.operation_timeout)
        except RemoteAccessDenied as exc:
            raise RemoteAccessDenied(f"{self.repo_type} {self.repo_id} is gated: {exc}") from exc

    def xet_token_url(self) -> str:
        return self._http.url(f"{self._api}/xet-read-token/{self.commit}")

    def download_url(self, entry: RemoteEntry) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return self._http.url(f"{prefix}{self.repo_id}/resolve/{self.commit}/{quote(entry.path)}")


def _entries(items: list, what: str) -> list[RemoteEntry]:
    """The usable entries of one listing page; a malformed item or an unsafe name is logged and left out."""
    parsed = []
    for item in items:
        try:
            parsed.append(_entry_from_item(item))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # one bad item, not all
            logger.warning("%s: ignoring a malformed tree item (%s): %r", what, exc, item)
    return drop_unsafe(parsed, what)


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
