"""Storage Buckets: plain directories under ``<root>/buckets/<namespace>/<name>/``, and the Hub routes
that list and download them.

Listings are never cached (files written into a bucket directory are served at once); each file's
content hash is computed once per (size, mtime) and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hffs_neuron.testing.emulator.protocol import (
    NOT_FOUND,
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
from hffs_neuron.testing.emulator.repos import FileSource, hash_file

if TYPE_CHECKING:
    from hffs_neuron.testing.emulator.hub import HubEmulator


def bucket_key(bucket_id: str) -> str:
    return f"bucket:{bucket_id.lower()}"


class BucketStore:
    """Every bucket of one emulator (its directories under the root) and the routes that read them."""

    def __init__(self, hub: HubEmulator) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[int, int, str]] = {}  # abs path -> (size, mtime_ns, sha256)

    @property
    def _buckets(self) -> Path:
        return self.hub.root / "buckets"

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()

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

    def content_sha256(self, path: Path, st: os.stat_result) -> str:
        """sha256 of a bucket file, cached by (size, mtime_ns): rewriting the file invalidates it."""
        key = str(path)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        sha256, _ = hash_file(path, with_git_sha1=False)
        with self._lock:
            self._hashes[key] = (st.st_size, st.st_mtime_ns, sha256)
        return sha256

    def _file_item(self, directory: Path, rel: str, st: os.stat_result) -> dict[str, Any]:
        return {
            "type": "file",
            "path": rel,
            "size": st.st_size,
            "xetHash": self.content_sha256(directory / rel, st),
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
        """``/api/buckets/{id}[/tree[/prefix]|/paths-info]``."""
        canonical, directory = self.get(bucket_id)
        key = bucket_key(canonical)
        if req.method in ("GET", "HEAD") and not rest:
            files = self._listing(directory, "", recursive=True)
            return json_response(
                {
                    "id": canonical,
                    "private": False,
                    "createdAt": iso(directory.stat().st_ctime),
                    "size": sum(i["size"] for i in files),
                    "totalFiles": len(files),
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
        sha256 = self.content_sha256(target, st)
        return file_response(target, st.st_size, sha256, req, {"Accept-Ranges": "bytes"})
