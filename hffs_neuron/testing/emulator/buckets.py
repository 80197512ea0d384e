"""Storage Buckets: plain directories under ``<root>/buckets/<namespace>/<name>/``, and the Hub routes
that create, list, download and write them (``create_bucket``, ``batch_bucket_files``).

Listings are never cached (files written into a bucket directory are served at once); each file's
content hash is computed once per (size, mtime) and reused. Writes name Xet hashes: the content comes
from the emulator's CAS (see :mod:`.xet_bridge`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hffs_neuron.testing.emulator.cas import token_response
from hffs_neuron.testing.emulator.protocol import (
    NOT_FOUND,
    EmulatorHub,
    HubError,
    Request,
    Response,
    check_id,
    clean_rel_path,
    file_response,
    iso,
    json_response,
    truthy,
)
from hffs_neuron.testing.emulator.repos import FileSource


def bucket_key(bucket_id: str) -> str:
    return f"bucket:{bucket_id.lower()}"


class BucketStore:
    """Every bucket of one emulator (its directories under the root) and the routes that read them."""

    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub

    @property
    def _buckets(self) -> Path:
        return self.hub.root / "buckets"

    def add(self, bucket_id: str, files: Mapping[str, FileSource] | None) -> Path:
        """See :meth:`HubEmulator.add_bucket`."""
        check_id("bucket", bucket_id)
        found = self.find(bucket_id)
        directory = found[1] if found else self._buckets / bucket_id
        directory.mkdir(parents=True, exist_ok=True)
        for name, source in (files or {}).items():
            path = clean_rel_path(name)
            if path is None:
                raise ValueError(f"invalid path in bucket: {name!r}")
            target = directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, (bytes, str)):
                target.write_bytes(source.encode() if isinstance(source, str) else source)
            else:
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
        return directory

    def all_files(self) -> list[Path]:
        """Every file of every bucket."""
        return [Path(d) / n for d, _dirs, names in os.walk(self._buckets) for n in names]

    def find(self, bucket_id: str) -> tuple[str, Path] | None:
        """(canonical id, directory) of a bucket, matching the id case-insensitively."""
        parts = bucket_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            return None
        exact = self._buckets / bucket_id
        if exact.is_dir():
            return bucket_id, exact
        wanted = bucket_id.lower()
        for ns in self._buckets.iterdir():
            if ns.name.lower() == parts[0].lower() and ns.is_dir():
                for b in ns.iterdir():
                    if f"{ns.name}/{b.name}".lower() == wanted and b.is_dir():
                        return f"{ns.name}/{b.name}", b
        return None

    def get(self, bucket_id: str) -> tuple[str, Path]:
        found = self.find(bucket_id)
        if found is None:
            # huggingface_hub maps RepoNotFound on /api/buckets/ URLs to BucketNotFoundError.
            raise HubError(404, "RepoNotFound", f"Bucket {bucket_id} not found")
        return found

    def content_hash(self, path: Path, st: os.stat_result) -> str:
        """The ``xetHash`` of a bucket file: its Xet hash, as the Hub lists it (also with Xet off: mounts
        verify bucket bytes against it)."""
        return self.hub.xet_bridge.hash_of(path, st)

    def _file_item(self, directory: Path, rel: str, st: os.stat_result) -> dict[str, Any]:
        return {
            "type": "file",
            "path": rel,
            "size": st.st_size,
            "xetHash": self.content_hash(directory / rel, st),
            "mtime": iso(st.st_mtime),
            "uploadedAt": iso(st.st_mtime),
        }

    def _listing(self, directory: Path, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Items under ``prefix`` matched by whole path components (``foo`` never matches ``foo.x``)."""
        if prefix and clean_rel_path(prefix) is None:
            return []
        target = directory / prefix if prefix else directory
        if prefix and target.is_file():
            return [self._file_item(directory, prefix, target.stat())]
        if not target.is_dir():
            return []
        items = []
        if recursive:
            for dirpath, _dirs, names in os.walk(target):
                for name in names:
                    full = Path(dirpath) / name
                    rel = full.relative_to(directory).as_posix()
                    items.append(self._file_item(directory, rel, full.stat()))
            return items
        with os.scandir(target) as it:
            for entry in it:
                rel = Path(entry.path).relative_to(directory).as_posix()
                st = entry.stat()
                if entry.is_dir():
                    items.append({"type": "directory", "path": rel, "uploadedAt": iso(st.st_mtime)})
                else:
                    items.append(self._file_item(directory, rel, st))
        return items

    # -- routes ------------------------------------------------------------------------------------

    def route_api(self, bucket_id: str, rest: list[str], req: Request) -> Response:
        """``/api/buckets/{id}[/tree[/prefix]|/paths-info|/batch|/xet-*-token]``; POST on the id creates."""
        if req.method == "POST" and not rest:
            return self._create(bucket_id)
        canonical, directory = self.get(bucket_id)
        if req.method == "GET" and rest in (["xet-read-token"], ["xet-write-token"]) and self.hub.xet:
            # Buckets here are public and writable by anyone: no token needed for either scope.
            return token_response(self.hub.cas.issue_token(rest[0].split("-")[1]))
        if req.method == "POST" and rest == ["batch"]:
            try:
                return self._batch(directory, req.body)
            finally:
                self.hub.bucket_events.scan(directory)  # the feed reports uploads at once
        if req.method == "GET" and rest == ["events"]:
            return self.hub.bucket_events.route(directory, req)
        key = bucket_key(canonical)
        if req.method in ("GET", "HEAD") and not rest:
            # Sizes only: hashing every file just to count them would make big buckets slow to describe.
            sizes = [(Path(d) / n).stat().st_size for d, _dirs, names in os.walk(directory) for n in names]
            return json_response(
                {
                    "id": canonical,
                    "private": False,
                    "createdAt": iso(directory.stat().st_ctime),
                    "size": sum(sizes),
                    "totalFiles": len(sizes),
                    "updatedAt": self.hub.bucket_events.updated_at(directory),
                }
            )
        if req.method in ("GET", "HEAD") and rest[:1] == ["tree"]:
            prefix = "/".join(rest[1:]).strip("/")
            recursive = truthy(req.param("recursive"))
            items = self._listing(directory, prefix, recursive) + self.hub.overrides_for(key, prefix)
            return self.hub.paginated(items, req)
        if req.method == "POST" and rest == ["paths-info"]:
            try:
                paths = json.loads(req.body or b"{}").get("paths", [])
            except (ValueError, AttributeError):
                raise HubError(400, None, "expected a json body {'paths': [...]}") from None
            overrides = {i.get("path"): i for i in self.hub.overrides_for(key, "")}
            out = []
            for raw in paths:
                rel = clean_rel_path(str(raw))
                target = directory / rel if rel else None
                if rel and target is not None and target.is_file():
                    out.append(self._file_item(directory, rel, target.stat()))
                elif raw in overrides:
                    out.append(overrides[raw])
            return json_response(out)
        raise HubError(404, None, NOT_FOUND)

    def resolve(self, bucket_id: str, path_parts: list[str], req: Request) -> Response:
        """``HEAD|GET /buckets/{id}/resolve/{path}``."""
        _, directory = self.get(bucket_id)
        rel = clean_rel_path("/".join(path_parts))
        target = directory / rel if rel else None
        if target is None or not target.is_file():
            raise HubError(404, "EntryNotFound", "Entry not found")
        st = target.stat()
        content_hash = self.content_hash(target, st)
        extra = {"Accept-Ranges": "bytes"}
        if self.hub.xet:
            extra.update(self.hub.xet_headers(content_hash, f"/api/buckets/{bucket_id}/xet-read-token"))
        return file_response(target, st.st_size, content_hash, req, extra)

    # -- writes ------------------------------------------------------------------------------------

    def _create(self, bucket_id: str) -> Response:
        """``create_bucket``: 409 if it exists, still with the url (huggingface_hub's ``exist_ok`` reads it)."""
        try:
            check_id("bucket", bucket_id)
        except ValueError as e:
            raise HubError(400, None, str(e)) from None
        found = self.find(bucket_id)
        if found is not None:
            message = f"Bucket {found[0]} already exists"
            body = {"error": message, "url": f"{self.hub.url}/buckets/{found[0]}"}
            return json_response(body, 409, {"X-Error-Message": message})
        self.add(bucket_id, None)
        return json_response({"url": f"{self.hub.url}/buckets/{bucket_id}", "id": bucket_id})

    def _batch(self, directory: Path, body: bytes) -> Response:
        """``batch_bucket_files``: ndjson ``addFile``/``copyFile`` (by Xet hash) and ``deleteFile``.

        Files are written whole (tmp + rename) before the answer, so listings show them at once.
        """
        failed: list[dict[str, str]] = []
        lines = [line for line in body.splitlines() if line.strip()]
        for line in lines:
            op: Any = {}
            try:
                op = json.loads(line)
                rel = clean_rel_path(str(op.get("path", "")))
                if rel is None:
                    raise ValueError("invalid path")
                target = directory / rel
                if op.get("type") in ("addFile", "copyFile"):
                    self.hub.xet_bridge.materialize(str(op.get("xetHash")), target)
                    if isinstance(op.get("mtime"), (int, float)):
                        os.utime(target, ns=(time.time_ns(), int(op["mtime"]) * 1_000_000))
                        self.hub.xet_bridge.remember(target, str(op.get("xetHash")))
                elif op.get("type") == "deleteFile":
                    target.unlink(missing_ok=True)
                else:
                    raise ValueError(f"unknown operation type {op.get('type')!r}")
            except KeyError:
                failed.append({"path": str(op.get("path")), "error": "xet hash not found in this CAS"})
            except (ValueError, AttributeError, OSError) as e:
                path = op.get("path") if isinstance(op, dict) else None
                failed.append({"path": str(path or line[:100].decode(errors="replace")), "error": str(e)})
        status = 422 if lines and len(failed) == len(lines) else 200
        return json_response({"failed": failed}, status)
