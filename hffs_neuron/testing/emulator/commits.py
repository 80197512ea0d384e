"""Writing to model and dataset repos: the routes ``HfApi.create_commit`` uses, and the refs listing.

- ``GET /api/{models,datasets}/{id}/refs``: branches with their ``targetCommit`` (``list_repo_refs``);
- ``POST /api/{models,datasets}/{id}/preupload/{rev}``: ``uploadMode`` ("lfs" or "regular") per file,
  by the store's LFS rule, and the git oid a file already has at that revision;
- ``POST /[datasets/]{id}.git/info/lfs/objects/batch``: the LFS batch API: the ``xet`` transfer when the
  client offers it and the emulator speaks Xet (objects without actions: the client uploads them to the
  CAS), else the basic transfer, where an object the store already holds gets no action (huggingface_hub
  then skips its upload);
- ``PUT /_lfs/{sha256}``: the upload href the basic answer gives: the body is stored as a blob once its
  sha256 matches;
- ``GET /api/{models,datasets}/{id}/xet-write-token/{rev}``: a CAS write token (huggingface_hub 2.x with
  ``hf_xet`` asks for it straight after preupload, with no LFS batch call, and uploads xorbs and shards);
- ``POST /api/{models,datasets}/{id}/commit/{rev}``: the ndjson commit (``header``, ``file`` with base64
  content, ``lfsFile`` naming a blob by sha256), one new commit on the branch. A blob uploaded over Xet is
  found by the sha256 its shard names (:meth:`CasStore.file_by_sha256`) and downloaded from the CAS into
  the blob store, so ``resolve``, the LFS CDN and Xet reads all serve it.

Writes (all but the upload href) need one of the emulator's tokens, else 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from hffs_neuron.testing.emulator.cas import token_response
from hffs_neuron.testing.emulator.protocol import (
    EmulatorHub,
    HubError,
    Request,
    Response,
    clean_rel_path,
    json_response,
)
from hffs_neuron.testing.emulator.repos import REPO_TYPES, default_lfs_rule, hash_file


class CommitRoutes:
    """The write routes of repos (and their refs), over the emulator's RepoStore."""

    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub
        self._lock = threading.Lock()  # one commit at a time: each starts from the branch's newest
        #: Every commit made through the commit route, oldest first: (repo id, commit sha, paths it added).
        self.log: list[tuple[str, str, list[str]]] = []

    def route(self, req: Request) -> Response | None:
        """The answer to `req` if it is one of these routes, else None (the other stores route it)."""
        seg, method = req.segments, req.method
        if len(seg) >= 5 and seg[0] == "api" and seg[1] in ("models", "datasets"):
            repo_type, repo_id, rest = seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_type, repo_id, req)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self._check_write(req)
                return self._preupload(repo_type, repo_id, rest[1], req)
            if method == "GET" and len(rest) == 2 and rest[0] == "xet-write-token" and self.hub.xet:
                self._check_write(req)
                self.hub.repos.get(repo_type, repo_id, req)
                return token_response(self.hub.cas.issue_token("write"))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                self._check_write(req)
                return self._commit(repo_type, repo_id, rest[1], req)
            return None
        if method == "POST" and seg[-4:] == ["info", "lfs", "objects", "batch"]:
            head = seg[:-4]
            repo_type = "dataset" if head[:1] == ["datasets"] else "model"
            head = head[1:] if repo_type == "dataset" else head
            if len(head) == 2 and head[1].endswith(".git"):
                self._check_write(req)
                return self._lfs_batch(repo_type, f"{head[0]}/{head[1][: -len('.git')]}", req)
        if method == "PUT" and len(seg) == 2 and seg[0] == "_lfs":
            return self._lfs_put(seg[1], req)
        return None

    # -- reading ---------------------------------------------------------------------------------------
    def _refs(self, repo_type: str, repo_id: str, req: Request) -> Response:
        repo = self.hub.repos.get(repo_type, repo_id, req)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(repo.branches.items())
        ]
        return json_response({"branches": branches, "tags": [], "converts": []})

    # -- writing ---------------------------------------------------------------------------------------
    def _check_write(self, req: Request) -> None:
        """Writes need one of the emulator's tokens (like the Hub's write tokens); the LFS upload href is
        presigned, as on the Hub, and needs none."""
        if not self.hub.authorized(req.headers):
            raise HubError(403, None, "You don't have the rights to create a commit in this repo")

    def _preupload(self, repo_type: str, repo_id: str, revision: str, req: Request) -> Response:
        repo = self.hub.repos.get(repo_type, repo_id, req)
        files = repo.commits[repo.branches[revision]]["files"] if revision in repo.branches else {}
        out = []
        for item in json.loads(req.body or b"{}").get("files", []):
            path = str(item.get("path", ""))
            mode = "lfs" if default_lfs_rule(path, int(item.get("size") or 0)) else "regular"
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in files:
                entry["oid"] = files[path]["oid"]
            out.append(entry)
        return json_response({"files": out, "commitOid": repo.branches.get(revision)})

    def _lfs_batch(self, repo_type: str, repo_id: str, req: Request) -> Response:
        self.hub.repos.get(repo_type, repo_id, req)
        body = json.loads(req.body or b"{}")
        transfer = "xet" if self.hub.xet and "xet" in body.get("transfers", ()) else "basic"
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), int(obj.get("size") or 0)
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if transfer == "basic" and not (self.hub.root / "blobs" / oid).exists():
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{oid}"}}
            objects.append(answer)
        return json_response({"transfer": transfer, "objects": objects})

    def _lfs_put(self, sha256: str, req: Request) -> Response:
        if hashlib.sha256(req.body).hexdigest() != sha256:
            raise HubError(400, None, "uploaded content does not match its sha256")
        tmp = self.hub.root / "tmp" / f"{sha256}.{threading.get_ident()}"
        tmp.write_bytes(req.body)
        os.replace(tmp, self.hub.root / "blobs" / sha256)
        return json_response({})

    def _blob(self, sha256: str, path: str) -> Path:
        """The stored blob of an LFS file the commit names: uploaded with PUT, or over Xet (then written from
        the CAS into the blob store now, its content checked against the sha256)."""
        blob = self.hub.root / "blobs" / sha256
        if blob.exists():
            return blob
        xet_hash = self.hub.cas.file_by_sha256(sha256)
        if xet_hash is None:
            raise HubError(400, None, f"LFS object {sha256} of {path} was never uploaded")
        tmp = self.hub.root / "tmp" / f"xet-{sha256}.{threading.get_ident()}"
        self.hub.xet_bridge.materialize(xet_hash, tmp)
        if hash_file(tmp, with_git_sha1=False)[0] != sha256:
            tmp.unlink()
            raise HubError(400, None, f"the Xet file {xet_hash} of {path} does not match its sha256 {sha256}")
        os.replace(tmp, blob)
        self.hub.xet_bridge.remember(blob, xet_hash)  # served with this xetHash, never hashed again
        return blob

    def _commit(self, repo_type: str, repo_id: str, revision: str, req: Request) -> Response:
        if repo_type not in REPO_TYPES:
            raise HubError(400, None, f"unknown repo type {repo_type}")
        repo = self.hub.repos.get(repo_type, repo_id, req)
        files: dict[str, bytes | Path] = {}
        lfs_paths: set[str] = set()
        for line in req.body.splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op.get("key"), op.get("value") or {}
            if key == "header":
                parent = value.get("parentCommit")
                if parent and parent != repo.branches.get(revision):
                    raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
                continue
            path = clean_rel_path(str(value.get("path", "")))
            if path is None:
                raise HubError(400, None, f"invalid path {value.get('path')!r}")
            if key == "file":
                files[path] = base64.b64decode(value.get("content", ""))
            elif key == "lfsFile":
                # A path: hard-linked (a str would be taken as the content).
                files[path] = self._blob(str(value.get("oid")), path)
                lfs_paths.add(path)
            else:
                raise HubError(400, None, f"unknown commit operation {key!r}")
        with self._lock:
            sha = self.hub.repos.add(
                repo.repo_id,
                files,
                repo_type=repo_type,
                revision=revision,
                lfs=lambda path, _size: path in lfs_paths,
                gated=False,
                parent=revision if revision in repo.branches else None,
            )
            self.log.append((repo.repo_id, sha, sorted(files)))
        prefix = "datasets/" if repo_type == "dataset" else ""
        return json_response({"commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha})
