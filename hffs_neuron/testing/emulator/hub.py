"""The emulator itself: one object owning the data stores, the two origins, faults and accounting,
and the routing table that maps Hub URLs to the stores.

It speaks the subset of the Hub protocol that ``huggingface_hub`` 2.x uses for reading (repo info,
tree listings, paths-info, ``resolve`` downloads with Range and optional LFS redirects, Storage
Bucket listings and downloads), bucket writes, and Xet (a CAS the real ``hf_xet`` downloads from and
uploads to), so that tests and demos run the real clients with no network.

Bodies are never held in memory: repo files live content-addressed under ``<root>/blobs/<sha256>``,
bucket files are plain files under ``<root>/buckets/<namespace>/<name>/``, and both are sent with
``sendfile``. Every hash (sha256, git sha1, Xet) is computed once (when a repo file is added, or the
first time a bucket file is seen with a given size and mtime), never per request.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from hffs_neuron.testing.emulator.accounting import Accounting, RequestRecord
from hffs_neuron.testing.emulator.buckets import BucketStore, bucket_key
from hffs_neuron.testing.emulator.cas import CasStore
from hffs_neuron.testing.emulator.commits import CommitRoutes
from hffs_neuron.testing.emulator.events import BucketEvents
from hffs_neuron.testing.emulator.faults import FaultInjector
from hffs_neuron.testing.emulator.network import NetworkProfile
from hffs_neuron.testing.emulator.protocol import (
    NOT_FOUND,
    HubError,
    Request,
    Response,
    bearer_token,
    decode_cursor,
    encode_cursor,
    json_response,
    whoami,
)
from hffs_neuron.testing.emulator.repos import FileSource, RepoStore, repo_key
from hffs_neuron.testing.emulator.server import Server
from hffs_neuron.testing.emulator.xet_bridge import XetBridge

logger = logging.getLogger(__name__)


class HubEmulator:
    """A Hub served from ``root`` on a local port (plus a second "CDN" origin for LFS redirects).

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``page_size``, ``page_latency_s``
    (seconds each page of a tree listing takes before it is answered, like a slow Hub paging a large
    repo) and ``redirect_lfs`` may be changed while it runs. ``conn_mbps`` (a bandwidth cap per TCP connection,
    in 10^6 bytes/s) and ``latency_ms`` (added to every request) simulate a real network; both are off
    by default and can be changed while running with :meth:`set_network`.

    With ``xet`` the emulator also speaks Xet: a CAS on the hub origin (see :mod:`.cas`), Xet hashes
    and token links in listings and ``resolve`` answers, and bucket writes (``batch_bucket_files``).
    Files placed in repos and buckets reach the CAS lazily through the real ``hf_xet`` client.
    ``xet`` may be switched while it runs; :meth:`reset` restores it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = 1000,
        page_latency_s: float = 0.0,
        redirect_lfs: bool = False,
        tokens: Iterable[str] = (),
        conn_mbps: float | None = None,
        latency_ms: float = 0.0,
        xet: bool = True,
        xet_token_ttl: float = 120.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.host, self._port = host, port
        self.page_size, self.page_latency_s, self.redirect_lfs = page_size, page_latency_s, redirect_lfs
        self.network = NetworkProfile(conn_mbps, latency_ms)
        self._defaults = (page_size, page_latency_s, redirect_lfs, self.network, xet)
        self.tokens = frozenset(tokens)
        self.xet = xet
        self.faults = FaultInjector()
        self.accounting = Accounting()
        self.url = ""
        self.cdn_url: str | None = None
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._overrides: dict[str, list[dict[str, Any]]] = {}
        self._servers: list[Server] = []
        self._init_root()
        self.repos = RepoStore(self)
        self.commits = CommitRoutes(self)  # create_commit's routes and refs (commits.py)
        self.buckets = BucketStore(self)
        self.bucket_events = BucketEvents(self)
        self.cas = CasStore(self, xet_token_ttl)
        self.xet_bridge = XetBridge(self)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubEmulator:
        """Bind both origins and serve them from background threads."""
        self.stop_event.clear()
        hub = Server((self.host, self._port), self, "hub")
        cdn = Server((self.host, 0), self, "cdn")
        self._servers = [hub, cdn]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        self.url = f"http://{self.host}:{hub.server_port}"
        self.cdn_url = f"http://{self.host}:{cdn.server_port}"
        logger.info("hub emulator serving %s (cdn %s) from %s", self.url, self.cdn_url, self.root)
        return self

    def stop(self) -> None:
        """Stop serving; stalled requests are woken up and dropped."""
        self.stop_event.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        self._servers = []

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, buckets (wiping ``root``), stats and faults; restore the constructor's settings.

        The Xet CAS stays: it is content-addressed like the real one, and hf_xet clients remember
        which xorbs the server holds (a wiped CAS would reject their next shards).
        """
        with self._lock:
            self.repos.clear()
            self.bucket_events.clear()
            self.xet_bridge.clear()
            self._overrides.clear()
            for child in self.root.iterdir():
                if child.name == "xet":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self._init_root()
        self.page_size, self.page_latency_s, self.redirect_lfs, self.network, self.xet = self._defaults
        self.faults.clear()
        self.reset_stats()

    def _init_root(self) -> None:
        for sub in ("blobs", "repos", "buckets", "tmp", "xet/xorbs", "xet/shards"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def set_network(self, conn_mbps: float | None = None, latency_ms: float = 0.0) -> None:
        """Simulate a network from now on (``None`` and 0 turn it off); bodies being sent adapt at once."""
        self.network = NetworkProfile(conn_mbps, latency_ms)

    # -- content -----------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        repo_type: str = "model",
        revision: str = "main",
        lfs: Callable[[str, int], bool] | None = None,
        gated: bool = False,
        parent: str | None = None,
    ) -> str:
        """Commit ``files`` to branch ``revision`` (creating the repo if needed); return the commit sha.

        Values are contents (bytes/str) or paths of existing files, which are hard-linked into
        the blob store (copied across filesystems); don't modify such a file afterwards. With
        ``parent`` (a branch or commit) the new commit starts from that commit's files.
        """
        return self.repos.add(
            repo_id, files, repo_type=repo_type, revision=revision, lfs=lfs, gated=gated, parent=parent
        )

    def set_gated(self, repo_id: str, gated: bool, *, repo_type: str = "model") -> None:
        """Gate (or ungate) a repo: downloads then need ``Authorization: Bearer <token>``."""
        self.repos.set_gated(repo_id, gated, repo_type)

    def add_bucket(self, bucket_id: str, files: Mapping[str, FileSource] | None = None) -> Path:
        """Create a bucket (if needed) holding ``files``; return its directory.

        Files written into that directory later are served too (listings are never cached).
        """
        return self.buckets.add(bucket_id, files)

    def bucket_dir(self, bucket_id: str) -> Path:
        """The directory holding a bucket's files (KeyError if there is no such bucket)."""
        found = self.buckets.find(bucket_id)
        if found is None:
            raise KeyError(bucket_id)
        return found[1]

    def add_listing_override(
        self, target_id: str, items: Iterable[Mapping[str, Any]], *, repo_type: str | None = None
    ) -> None:
        """Inject raw listing items (e.g. hostile names such as ``../x``) that don't exist on disk.

        ``target_id`` is a bucket id, or a repo id when ``repo_type`` is given. The items are
        returned verbatim, bypassing the direct-children rule, by every tree listing whose prefix
        is empty or a whole-component prefix of the item's path, and by paths-info on an exact path.
        """
        key = bucket_key(target_id) if repo_type is None else repo_key(repo_type, target_id)
        with self._lock:
            self._overrides.setdefault(key, []).extend(dict(i) for i in items)

    def overrides_for(self, key: str, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._overrides.get(key, ()))
        return [i for i in items if not prefix or str(i.get("path", "")).startswith(prefix + "/")]

    def prepare_xet(self) -> int:
        """Convert every file placed so far (LFS repo files, bucket files) to Xet now, rather than on the
        first download of each; benchmarks call it so conversion is never timed. Needs a started
        emulator (the upload goes through its own CAS routes). Returns the number of files uploaded."""
        return self.xet_bridge.convert(self.repos.lfs_blobs() + self.buckets.all_files())

    # -- accounting --------------------------------------------------------------------------------

    def requests(self, path_contains: str = "", method: str | None = None) -> list[RequestRecord]:
        """Copies of the recorded requests whose (decoded) URL path contains ``path_contains``."""
        return self.accounting.requests(path_contains, method)

    def bytes_served(self, path_contains: str = "") -> int:
        """File bytes sent (200/206 bodies of GET ``resolve``, CDN and CAS xorb requests) whose path contains
        the string (a CAS request's path holds the file's Xet hash, not its name).

        Error bodies (e.g. an injected 503) are not file bytes and are not counted.
        """
        return self.accounting.bytes_served(path_contains)

    def reset_stats(self) -> None:
        """Forget recorded requests."""
        self.accounting.reset()

    # -- routing -----------------------------------------------------------------------------------

    def authorized(self, headers: Mapping[str, str]) -> bool:
        return bearer_token(headers) in self.tokens

    def route(self, req: Request) -> Response:
        """Map a request to a response; errors are raised as :class:`HubError`."""
        seg, method = req.segments, req.method
        if req.role == "cdn":
            if len(seg) >= 5 and seg[0] == "lfs" and method in ("GET", "HEAD"):
                return self.repos.serve_cdn(seg[4], req)
            raise HubError(404, None, "not found")
        if self.xet and (cas := self.cas.route(req)) is not None:
            return cas
        if seg[:2] == ["api", "agent-harnesses"]:
            return json_response({"standardEnvVars": [], "harnesses": {}})
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return whoami(bearer_token(req.headers), self.tokens)
        if (written := self.commits.route(req)) is not None:
            return written
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in ("models", "datasets"):
            return self.repos.route_api(seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[4:], req)
        if len(seg) >= 4 and seg[:2] == ["api", "buckets"]:
            return self.buckets.route_api(f"{seg[2]}/{seg[3]}", seg[4:], req)
        if method in ("GET", "HEAD"):
            if len(seg) >= 6 and seg[0] == "datasets" and seg[3] == "resolve":
                return self.repos.resolve("dataset", f"{seg[1]}/{seg[2]}", seg[4], seg[5:], req)
            if len(seg) >= 5 and seg[0] == "buckets" and seg[3] == "resolve":
                return self.buckets.resolve(f"{seg[1]}/{seg[2]}", seg[4:], req)
            if len(seg) >= 5 and seg[2] == "resolve":
                return self.repos.resolve("model", f"{seg[0]}/{seg[1]}", seg[3], seg[4:], req)
        raise HubError(404, None, NOT_FOUND)

    def xet_headers(self, xet_hash: str, token_route: str) -> dict[str, str]:
        """The headers a ``resolve`` answer carries for a Xet file (token route relative to the hub)."""
        return {"X-Xet-Hash": xet_hash, "Link": f'<{self.url}{token_route}>; rel="xet-auth"'}

    def paginated(self, items: list[dict[str, Any]], req: Request) -> Response:
        """One page of ``items`` sorted by path after the cursor, with a ``Link`` to the next page.

        The cursor is the last path served, so a listing that changes between pages still progresses.
        """
        items.sort(key=lambda i: str(i.get("path", "")))
        paths = [str(i.get("path", "")) for i in items]
        return self.paginated_paths(paths, lambda index: items[index], req)

    def paginated_paths(self, paths: Sequence[str], item: Callable[[int], dict[str, Any]], req: Request) -> Response:
        """Like :meth:`paginated` for sorted ``paths`` whose items ``item(index)`` builds: only the page's
        items are built, so paging a listing of 500,000 entries costs each page its own size."""
        cursor = req.param("cursor")
        start = bisect.bisect_right(paths, decode_cursor(cursor)) if cursor else 0
        size = max(1, int(self.page_size))
        page = [item(i) for i in range(start, min(start + size, len(paths)))]
        headers = {}
        if start + size < len(paths):
            params = [(k, v) for k, vs in req.query.items() if k != "cursor" for v in vs]
            params.append(("cursor", encode_cursor(paths[start + size - 1])))
            headers["Link"] = f'<{self.url}{req.raw_path}?{urlencode(params)}>; rel="next"'
        if self.page_latency_s > 0:
            self.stop_event.wait(self.page_latency_s)
        return json_response(page, headers=headers)
