"""Model and dataset repos: branches of immutable commits over a content-addressed blob store, and
the Hub routes that read them (info, tree, paths-info, ``resolve``, the LFS CDN).

Repo files live under ``<root>/blobs/<sha256>``; each repo's index is persisted as json under
``<root>/repos/`` so an emulator restarted on the same root serves the same commits.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import quote

from hffs_neuron.testing.emulator.cas import token_response
from hffs_neuron.testing.emulator.protocol import (
    HEX,
    NOT_FOUND,
    EmulatorHub,
    HubError,
    Request,
    Response,
    check_id,
    clean_rel_path,
    file_response,
    is_commit_sha,
    iso,
    json_response,
    parse_form_or_json,
    truthy,
)

#: Files at least this large are stored as LFS files by default (the Hub's own rule of thumb).
LFS_MIN_SIZE = 10 * 1024
#: Suffixes always stored as LFS files by default, whatever their size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".neff", ".pb")
REPO_TYPES = ("model", "dataset")
_CHUNK = 8 * 1024 * 1024

FileSource = Union[bytes, str, "os.PathLike[str]"]


def default_lfs_rule(path: str, size: int) -> bool:
    """Whether a file is stored with LFS by default: large, or a binary weight/compiler artifact."""
    return size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The LFS pointer text git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def hash_file(path: Path, with_git_sha1: bool) -> tuple[str, str | None]:
    """Stream a file once and return (sha256, git blob sha1 or None)."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if with_git_sha1 else None
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), (sha1.hexdigest() if sha1 is not None else None)


def repo_key(repo_type: str, repo_id: str) -> str:
    return f"{repo_type}:{repo_id.lower()}"


@dataclass
class Repo:
    """A repo: branches pointing at immutable commits, each a mapping path -> file entry."""

    repo_type: str
    repo_id: str  # canonical spelling (the first one used)
    gated: bool = False
    created: float = field(default_factory=time.time)
    branches: dict[str, str] = field(default_factory=dict)
    # sha -> {"parent": str|None, "time": float, "title": str, "files": {path: entry}}
    # entry: {"size": int, "oid": git sha1, "sha256": content sha256, "lfs": bool, "pointer_size": int|None}
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TreeIndex:
    """Directory structure of one commit, derived once (commits never change)."""

    files: dict[str, dict[str, Any]]
    dir_oids: dict[str, str]  # "" is the root
    children: dict[str, list[str]]  # dir -> full paths of its direct children (sorted)
    _everything: list[str] | None = None

    def everything(self) -> list[str]:
        """Every file and directory path, sorted (built on the first recursive listing)."""
        if self._everything is None:
            self._everything = sorted([*self.files, *(d for d in self.dir_oids if d)])
        return self._everything


def build_tree_index(files: dict[str, dict[str, Any]]) -> TreeIndex:
    children: dict[str, set[str]] = {"": set()}
    contents: dict[str, list[str]] = {"": []}  # dir -> "path oid" lines of all files below it
    for path, entry in files.items():
        parts = path.split("/")
        parent = ""
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            children.setdefault(parent, set()).add(d)
            children.setdefault(d, set())
            contents.setdefault(d, []).append(f"{path} {entry['oid']}")
            parent = d
        children[parent].add(path)
        contents[""].append(f"{path} {entry['oid']}")
    # Include the directory's own path so nested directories with the same files differ.
    dir_oids = {d: hashlib.sha1("\n".join([d, *sorted(lines)]).encode()).hexdigest() for d, lines in contents.items()}
    return TreeIndex(files, dir_oids, {d: sorted(c) for d, c in children.items()})


class RepoStore:
    """Every repo of one emulator, persisted under its root, and the routes that read them."""

    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub
        self._lock = threading.RLock()
        self._repos: dict[str, Repo] = {}
        self._trees: dict[str, TreeIndex] = {}
        self._counter = 0
        self._load()

    @property
    def _root(self) -> Path:
        return self.hub.root

    def clear(self) -> None:
        with self._lock:
            self._repos.clear()
            self._trees.clear()

    # -- writing -----------------------------------------------------------------------------------

    def add(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        repo_type: str,
        revision: str,
        lfs: Callable[[str, int], bool] | None,
        gated: bool,
        parent: str | None,
    ) -> str:
        """See :meth:`HubEmulator.add_repo`."""
        check_id("repo", repo_id)
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if is_commit_sha(revision):
            raise ValueError("revision must be a branch name, not a commit sha")
        rule = lfs or default_lfs_rule
        entries = {}
        for name, source in files.items():
            path = clean_rel_path(name)
            if path is None:
                raise ValueError(f"invalid path in repo: {name!r}")
            entries[path] = self._ingest(path, source, rule)
            self._xet_hash(entries[path])  # hashed now, like sha256, so no request pays for it
        with self._lock:
            key = repo_key(repo_type, repo_id)
            repo = self._repos.setdefault(key, Repo(repo_type, repo_id))
            repo.gated = repo.gated or gated
            base: dict[str, dict[str, Any]] = {}
            if parent is not None:
                parent_sha = self._resolve_revision(repo, parent)
                if parent_sha is None:
                    raise ValueError(f"unknown parent revision {parent!r}")
                base = dict(repo.commits[parent_sha]["files"])
            base.update(entries)
            self._counter += 1
            seed = json.dumps([key, revision, parent, sorted(base), self._counter, time.time_ns()])
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = {
                "parent": repo.branches.get(revision),
                "time": time.time(),
                "title": f"Commit {self._counter}",
                "files": base,
            }
            repo.branches[revision] = sha
            self._save(repo)
        return sha

    def set_gated(self, repo_id: str, gated: bool, repo_type: str) -> None:
        with self._lock:
            repo = self._repos[repo_key(repo_type, repo_id)]
            repo.gated = gated
            self._save(repo)

    def _ingest(self, path: str, source: FileSource, rule: Callable[[str, int], bool]) -> dict[str, Any]:
        """Store one file's content in the blob store and return its entry (hashes computed here)."""
        if isinstance(source, (bytes, str)):
            data = source.encode() if isinstance(source, str) else source
            is_lfs = rule(path, len(data))
            sha256 = hashlib.sha256(data).hexdigest()
            blob = self._root / "blobs" / sha256
            if not blob.exists():
                tmp = self._root / "tmp" / f"{sha256}.{threading.get_ident()}"
                tmp.write_bytes(data)
                os.replace(tmp, blob)
            size, sha1 = len(data), (None if is_lfs else git_blob_sha1(data))
        else:
            src = Path(source)
            size = src.stat().st_size
            is_lfs = rule(path, size)
            sha256, sha1 = hash_file(src, with_git_sha1=not is_lfs)
            blob = self._root / "blobs" / sha256
            if not blob.exists():
                try:
                    os.link(src, blob)
                except FileExistsError:
                    pass
                except OSError:  # another filesystem: copy aside then rename, never a partial blob
                    tmp = self._root / "tmp" / f"{sha256}.{threading.get_ident()}"
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, blob)
        if is_lfs:
            pointer = lfs_pointer(sha256, size)
            return {
                "size": size,
                "oid": git_blob_sha1(pointer),
                "sha256": sha256,
                "lfs": True,
                "pointer_size": len(pointer),
            }
        return {"size": size, "oid": sha1, "sha256": sha256, "lfs": False, "pointer_size": None}

    def _index_path(self, repo: Repo) -> Path:
        return self._root / "repos" / repo.repo_type / (repo.repo_id.lower().replace("/", "--") + ".json")

    def _save(self, repo: Repo) -> None:
        """Persist a repo's index (tmp + rename) so a restarted emulator on the same root sees it."""
        target = self._index_path(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(repo)))
        os.replace(tmp, target)

    def _load(self) -> None:
        for index in (self._root / "repos").glob("*/*.json"):
            repo = Repo(**json.loads(index.read_text()))
            self._repos[repo_key(repo.repo_type, repo.repo_id)] = repo

    def lfs_blobs(self) -> list[Path]:
        """The blob of every LFS file of every commit (each once)."""
        with self._lock:
            shas = {
                e["sha256"]
                for r in self._repos.values()
                for c in r.commits.values()
                for e in c["files"].values()
                if e["lfs"]
            }
        return [self._root / "blobs" / sha for sha in sorted(shas)]

    # -- reading -----------------------------------------------------------------------------------

    @staticmethod
    def _resolve_revision(repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None

    def _tree(self, repo: Repo, sha: str) -> TreeIndex:
        with self._lock:
            index = self._trees.get(sha)
            if index is None:
                index = self._trees[sha] = build_tree_index(repo.commits[sha]["files"])
            return index

    def get(self, repo_type: str, repo_id: str, req: Request) -> Repo:
        with self._lock:
            repo = self._repos.get(repo_key(repo_type, repo_id))
        if repo is None:
            # Like the Hub: anonymous callers get 401 (the repo could be private), others 404.
            status = 404 if req.headers.get("Authorization") else 401
            raise HubError(status, "RepoNotFound", "Repository not found")
        return repo

    def commit(self, repo: Repo, revision: str) -> str:
        with self._lock:
            sha = self._resolve_revision(repo, revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    # -- routes ------------------------------------------------------------------------------------

    def route_api(self, repo_type: str, repo_id: str, rest: list[str], req: Request) -> Response:
        """``/api/{models,datasets}/{id}/...``."""
        repo = self.get(repo_type, repo_id, req)
        if req.method in ("GET", "HEAD"):
            if not rest:
                return self._info(repo, "main", req)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo, rest[1], req)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._list_tree(repo, rest[1], "/".join(rest[2:]), req)
            if rest[0] == "xet-read-token" and len(rest) == 2 and self.hub.xet:
                self.commit(repo, rest[1])
                if repo.gated and not self.hub.authorized(req.headers):
                    raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
                return token_response(self.hub.cas.issue_token("read"))
        if req.method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            return self._paths_info(repo, rest[1], req)
        raise HubError(404, None, NOT_FOUND)

    def _info(self, repo: Repo, revision: str, req: Request) -> Response:
        sha = self.commit(repo, revision)
        commit = repo.commits[sha]
        with_blobs = truthy(req.param("blobs"))
        # Like the Hub, `expand` names the fields wanted: without "siblings" no file list is built (a
        # 500,000-file repo's is megabytes, on every resolution of a revision).
        expand = req.query.get("expand", []) + req.query.get("expand[]", [])
        siblings = []
        for path, e in sorted(commit["files"].items()) if not expand or "siblings" in expand else ():
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    sibling["lfs"] = {"size": e["size"], "sha256": e["sha256"], "pointerSize": e["pointer_size"]}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.lower().encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": iso(repo.created),
            "lastModified": iso(commit["time"]),
        }
        if not expand or "siblings" in expand:
            info["siblings"] = siblings
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return json_response(info)

    def _xet_hash(self, entry: dict[str, Any]) -> str | None:
        """The Xet hash of an LFS file when the emulator speaks Xet (regular files stay plain git blobs)."""
        if not (self.hub.xet and entry["lfs"]):
            return None
        blob = self._root / "blobs" / entry["sha256"]
        return self.hub.xet_bridge.hash_of(blob, blob.stat())

    def _item(self, index: TreeIndex, path: str, sha: str, commit: dict[str, Any], expand: bool) -> dict:
        if path in index.files:
            e = index.files[path]
            item: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
            if e["lfs"]:
                item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": e["pointer_size"]}
            if (xet_hash := self._xet_hash(e)) is not None:
                item["xetHash"] = xet_hash
        else:
            item = {"type": "directory", "oid": index.dir_oids[path], "size": 0, "path": path}
        if expand:
            item["lastCommit"] = {"id": sha, "title": commit["title"], "date": iso(commit["time"])}
        return item

    def _list_tree(self, repo: Repo, revision: str, path: str, req: Request) -> Response:
        sha = self.commit(repo, revision)
        index = self._tree(repo, sha)
        path = path.strip("/")
        if path and path not in index.dir_oids:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision} or is not a directory")
        expand = truthy(req.param("expand"))
        if truthy(req.param("recursive")):
            names = index.everything()
            if path:  # sorted: everything below `path/` is one run of the list
                lo = bisect.bisect_left(names, path + "/")
                names = names[lo : bisect.bisect_left(names, path + "0")]  # "0" sorts right after "/"
        else:
            names = index.children.get(path, [])
        commit = repo.commits[sha]
        overrides = self.hub.overrides_for(repo_key(repo.repo_type, repo.repo_id), path)
        if overrides:  # raw items of hostile-listing tests: few repos, small; built whole
            items = [self._item(index, p, sha, commit, expand) for p in names] + overrides
            return self.hub.paginated(items, req)
        return self.hub.paginated_paths(names, lambda i: self._item(index, names[i], sha, commit, expand), req)

    def _paths_info(self, repo: Repo, revision: str, req: Request) -> Response:
        sha = self.commit(repo, revision)
        index = self._tree(repo, sha)
        form = parse_form_or_json(req.body, req.headers)
        expand = truthy(str(form.get("expand", [""])[-1]))
        commit = repo.commits[sha]
        overrides = {i.get("path"): i for i in self.hub.overrides_for(repo_key(repo.repo_type, repo.repo_id), "")}
        out = []
        for raw in form.get("paths", []):
            path = str(raw).strip("/")
            if path in index.files or (path and path in index.dir_oids):
                out.append(self._item(index, path, sha, commit, expand))
            elif raw in overrides:
                out.append(overrides[raw])
        return json_response(out)

    def resolve(self, repo_type: str, repo_id: str, revision: str, path_parts: list[str], req: Request) -> Response:
        """``HEAD|GET /[datasets/]{id}/resolve/{rev}/{path}``."""
        repo = self.get(repo_type, repo_id, req)
        sha = self.commit(repo, revision)
        if repo.gated and not self.hub.authorized(req.headers):
            raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
        path = "/".join(path_parts)
        entry = repo.commits[sha]["files"].get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if (xet_hash := self._xet_hash(entry)) is not None:
            common.update(self.hub.xet_headers(xet_hash, f"/api/{repo_type}s/{repo.repo_id}/xet-read-token/{sha}"))
        if entry["lfs"]:
            common.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
            if self.hub.redirect_lfs and self.hub.cdn_url:
                # Like the Hub: HEAD and GET both get the 302, which carries the file's metadata.
                location = f"{self.hub.cdn_url}/lfs/{repo_type}s/{repo.repo_id}/{entry['sha256']}/{quote(path)}"
                return Response(302, {**common, "Location": location, "ETag": f'"{entry["sha256"]}"'})
            etag = entry["sha256"]
        else:
            etag = entry["oid"]
        return file_response(self._root / "blobs" / entry["sha256"], entry["size"], etag, req, common)

    def serve_cdn(self, sha256: str, req: Request) -> Response:
        """``GET /lfs/.../{sha256}/...`` on the CDN origin."""
        if len(sha256) != 64 or not set(sha256) <= HEX:
            raise HubError(404, None, "not found")
        blob = self._root / "blobs" / sha256
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise HubError(404, None, "not found") from None
        return file_response(blob, size, sha256, req, {"Accept-Ranges": "bytes"})
