"""A model or dataset repo as the NEFF view's remote: the optimum-neuron cache (`aws-neuron/optimum-neuron-cache`).

Listed one directory at a time like a bucket (the public cache holds tens of thousands of modules), at
one commit: the commit resolved at mount (or `@REV`). A branch is followed: at most once per `ref_ttl`
(`--metadata-ttl`) a listing first asks the repo's refs (`GET /api/{models,datasets}/{id}/refs`, one
small answer whatever the repo's size) and moves on to the branch's new commit. Listings cached before
stay until their TTL; a module a new commit adds is found by the NEFF view's probe of that one name
(views/neff_probe.py), never by relisting its version directory. A commit id (`@<40 hex>`) stays pinned.

Each entry remembers the commit it was listed at and is downloaded from there; LFS files are verified
by their sha256, plain git files by their git blob id (store/verify.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from ..errors import HffsError, RemoteAccessDenied, RemoteNotFound, RemoteUnavailable, UsageError
from ..sources import DEFAULT_REVISION, Source
from .base import DropLog, RemoteEntry, direct_children, is_git_oid
from .http import HubHttp
from .hub import _entry_from_item

logger = logging.getLogger(__name__)


class RepoTree:
    """A repo's files at a followed branch (or a pinned commit), directory by directory."""

    prefix = ""  # the whole repo is mounted (publish.py writes bucket-relative paths with it)
    event_feed = False  # repos have no change feed: the branch is checked, names are probed

    def __init__(self, http: HubHttp, source: Source, ref_ttl: float, *, defer: bool = False):
        """Resolve the revision now; `defer`: a transient failure (timeout, 5xx) leaves it to the first
        listing instead (the mount comes up through a Hub blip, served as private until resolved)."""
        if not source.is_repo:
            raise ValueError(f"{source.canonical} is not a repo source")
        self._http = http
        self.endpoint = http.endpoint
        self.source = source
        self.repo_type = source.kind
        self.revision = source.revision or DEFAULT_REVISION
        self.ref_ttl = ref_ttl
        self._api = f"api/{self.repo_type}s/{source.repo_id}"
        self.repo_id = self.bucket_id = source.repo_id  # the Hub's casing once resolved (publish.py: bucket_id)
        self.private = True  # others never get past the root until the Hub says otherwise
        self.commit: str | None = None
        self.unresolved_reason = ""  # why the revision is not resolved yet (a deferred mount)
        self.follows = not is_git_oid(self.revision)  # a branch (or tag) name moves; a commit id never does
        namespace_rev = self.revision if self.follows else self.revision.lower()
        self.cache_namespace = (
            f"{http.endpoint}|{http.token_fingerprint}|{self.repo_type}|{source.repo_id.lower()}|{namespace_rev}"
        )
        # The NEFF local layer's key: one for every casing of the id, resolved or not.
        self.layer_identity = f"{source.kind}:{source.repo_id.lower()}@{self.revision}|"
        self.ref_checks = 0  # ref requests made (tests and status)
        self._checked = time.monotonic()
        self._ref_lock = threading.Lock()
        self._drop = DropLog()
        self._warned_ref = False
        try:
            self._resolve()
        except RemoteUnavailable as exc:
            if not defer:
                raise
            self.unresolved_reason = str(exc)
            logger.warning("%s@%s: not resolved at mount (%s); resolved on first use", self.repo_id, self.revision, exc)

    def _resolve(self) -> None:
        """The revision's commit, the repo's casing and visibility, from the Hub."""
        what = f"{self.repo_type} {self.source.repo_id}@{self.revision}"
        info = self._http.get_json(
            f"{self._api}/revision/{quote(self.revision, safe='')}",
            what=what,
            params={"expand": ["sha", "private", "gated"]},
        )
        sha = info.get("sha") if isinstance(info, dict) else None
        if not is_git_oid(sha):
            raise HffsError(f"{what}: the Hub answered an invalid commit id {str(sha)[:80]!r}")
        canonical = info.get("id")
        if isinstance(canonical, str) and canonical.lower() == self.source.repo_id.lower():
            self.repo_id = self.bucket_id = canonical
        self.private = bool(info.get("private")) or bool(info.get("gated"))
        self.commit = sha
        self._checked = time.monotonic()

    # -- following the branch -------------------------------------------------------------------------
    def current_commit(self, *, force: bool = False) -> str:
        """The commit to list at: the branch's newest, asked at most once per `ref_ttl` (`force`: now,
        after a commit of our own).

        One thread asks while the others go on with the commit known; a failed ref check keeps it (and is
        asked again a TTL later): listings never fail because the branch could not be checked.
        """
        if self.commit is None:
            return self._resolve_late()
        if not self.follows or (not force and time.monotonic() - self._checked < self.ref_ttl):
            return self.commit
        if not self._ref_lock.acquire(blocking=force, timeout=self._http.operation_timeout if force else -1):
            return self.commit
        try:
            if force or time.monotonic() - self._checked >= self.ref_ttl:
                self._check_ref()
        finally:
            self._ref_lock.release()
        return self.commit

    def _resolve_late(self) -> str:
        """The commit of a mount that came up unresolved: one thread asks, the others wait (bounded) and
        fail as it did (RemoteUnavailable: EIO, asked again next time)."""
        if not self._ref_lock.acquire(timeout=self._http.operation_timeout):
            raise RemoteUnavailable(f"{self.repo_type} {self.repo_id}@{self.revision}: not resolved yet")
        try:
            if self.commit is None:
                self._resolve()
                logger.info("%s@%s: resolved to commit %s", self.repo_id, self.revision, self.commit[:12])
        finally:
            self._ref_lock.release()
        return self.commit

    def _check_ref(self) -> None:
        what = f"{self.repo_type} {self.repo_id}: refs"
        self.ref_checks += 1
        try:
            refs = self._http.get_json(f"{self._api}/refs", what=what)
            target = _ref_target(refs, self.revision)
        except HffsError as exc:
            if not self._warned_ref:
                logger.warning("%s: keeping commit %s (%s)", what, self.commit[:12], exc)
                self._warned_ref = True
            return
        finally:
            self._checked = time.monotonic()
        if target is None:
            if not self._warned_ref:
                logger.warning(
                    "%s: no branch or tag %r any more; keeping commit %s", what, self.revision, self.commit[:12]
                )
                self._warned_ref = True
            return
        self._warned_ref = False
        if target != self.commit:
            logger.info("%s@%s: following new commit %s", self.repo_id, self.revision, target[:12])
            self.commit = target

    def check_write_access(self) -> None:
        """Raise RemoteAccessDenied (one line) unless the token may commit to the followed branch: a
        preupload of no file (what `create_commit` asks first) writes nothing. UsageError for a commit id."""
        what = f"{self.repo_type} {self.repo_id}"
        if not self.follows:
            raise UsageError(
                f"{what}@{self.revision[:12]} is a pinned commit: publish to a branch (hf://ORG/NAME[@BRANCH])"
            )
        try:
            self._http.request_json(
                "POST", f"{self._api}/preupload/{quote(self.revision, safe='')}", what, json={"files": []}
            )
        except RemoteAccessDenied as exc:
            raise RemoteAccessDenied(
                f"no write access to {what} ({exc}): publishing needs a token that can write to it "
                "(--token-file / HF_TOKEN)"
            ) from exc

    # -- the Remote interface -------------------------------------------------------------------------
    def _entry(self, commit: str) -> Callable[[dict], RemoteEntry]:
        return lambda item: dataclasses.replace(_entry_from_item(item), commit=commit)

    def list(self, path: str) -> list[RemoteEntry]:
        path = path.strip("/")
        commit = self.current_commit()
        what = f"{self.repo_type} {self.repo_id}@{commit[:12]}: list {path or '/'}"
        suffix = f"/{quote(path)}" if path else ""
        items = self._http.paginate(f"{self._api}/tree/{commit}{suffix}", {"recursive": "false"}, what)
        return direct_children(items, path, self._entry(commit), what, self._drop)

    def stat(self, path: str) -> RemoteEntry:
        path = path.strip("/")
        commit = self.current_commit()
        what = f"{self.repo_type} {self.repo_id}@{commit[:12]}: stat {path}"
        items, _ = self._http.request_json("POST", f"{self._api}/paths-info/{commit}", what, data={"paths": [path]})
        found = [e for e in direct_children(items or [], _parent(path), self._entry(commit), what, self._drop)]
        for entry in found:
            if entry.path == path:
                return entry
        raise RemoteNotFound(f"{what}: not found")

    def read_range(
        self, entry: RemoteEntry, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float
    ) -> None:
        """Stream bytes [start, end) of `entry` to `sink(offset, data)`, retrying transient failures."""
        self._http.stream_range(self.download_url(entry), start, end, sink, f"read {entry.path}", deadline)

    def xet_token_url(self) -> str:
        return self._http.url(f"{self._api}/xet-read-token/{self.current_commit()}")

    def download_url(self, entry: RemoteEntry) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return self._http.url(
            f"{prefix}{self.repo_id}/resolve/{entry.commit or self.current_commit()}/{quote(entry.path)}"
        )


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _ref_target(refs: object, name: str) -> str | None:
    """The commit branch or tag `name` points at in a `/refs` answer (None: no such ref, or a bad id)."""
    if not isinstance(refs, dict):
        raise HffsError(f"the Hub answered {type(refs).__name__} for refs, expected an object")
    for kind in ("branches", "tags"):
        for ref in refs.get(kind) or []:
            if isinstance(ref, dict) and ref.get("name") == name and is_git_oid(ref.get("targetCommit")):
                return ref["targetCommit"]
    return None
