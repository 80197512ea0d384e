"""A Hugging Face Storage Bucket (optionally one folder of it)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from urllib.parse import quote

from ..errors import RemoteNotFound, UsageError
from .base import XET, Digest, DropLog, RemoteEntry, checked_size, direct_children, is_safe_path, is_sha256
from .http import HubHttp

logger = logging.getLogger(__name__)

_BUCKET_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_bucket_id(bucket_id: str) -> None:
    """Raise UsageError unless `bucket_id` looks like `namespace/name`."""
    if not _BUCKET_ID.match(bucket_id) or ".." in bucket_id:
        raise UsageError(f"invalid bucket id {bucket_id!r}: expected 'namespace/name'")


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Bucket:
    """A bucket's files, listed one directory at a time (buckets may hold millions of files).

    Paths given to and returned by this class are relative to `prefix`.
    """

    event_feed = True  # the Hub serves its change feed (views/neff_follow.py)

    def __init__(self, http: HubHttp, bucket_id: str, prefix: str | None = None, *, info: dict | None = None):
        """`info`: the bucket's info (`GET /api/buckets/{id}`) when already known or assumed (a mount
        whose check was skipped: `{"private": True}`); None: asked now."""
        check_bucket_id(bucket_id)
        prefix = (prefix or "").strip("/")
        if prefix and not is_safe_path(prefix):
            raise UsageError(f"invalid bucket prefix {prefix!r}")
        self._http = http
        self.endpoint = http.endpoint
        self.bucket_id = bucket_id
        self._warned_unhashed = False
        self._drop = DropLog()
        self.prefix = prefix
        if info is None:
            info = http.get_json(f"api/buckets/{bucket_id}", what=f"bucket {bucket_id}")
        canonical = info.get("id") if isinstance(info, dict) else None
        if isinstance(canonical, str) and canonical.lower() == bucket_id.lower():
            self.bucket_id = canonical  # the Hub's casing; anything else (a bad answer) is ignored
        self.private = bool(info.get("private")) if isinstance(info, dict) else False
        self.cache_namespace = f"{http.endpoint}|{http.token_fingerprint}|bucket|{self.bucket_id}|{prefix}"
        self.layer_identity = f"{self.bucket_id}|{prefix}"  # what the NEFF local layer's key names

    def _full(self, path: str) -> str:
        path = path.strip("/")
        return f"{self.prefix}/{path}" if self.prefix and path else (self.prefix or path)

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _entry(self, item: dict) -> RemoteEntry:
        """A listing item as an entry; ValueError for a xet hash that is not 64 lowercase hex digits
        (it becomes a blob name) or an impossible size."""
        path = self._relative(item["path"])
        if item.get("type") == "directory":
            return RemoteEntry(path=path, is_dir=True, mtime=_parse_time(item.get("uploadedAt")))
        mtime = _parse_time(item.get("mtime") or item.get("uploadedAt"))
        return self.file_entry(path, item.get("size", 0), item.get("xetHash"), mtime)

    def mount_path(self, full: str) -> str | None:
        """The mount-relative path of bucket path `full` (from the event feed); None outside the prefix
        or unsafe."""
        if not isinstance(full, str) or not is_safe_path(full):
            return None
        if self.prefix and not full.startswith(f"{self.prefix}/"):
            return None
        return self._relative(full)

    def file_entry(self, path: str, size: object, xet_hash: str | None, mtime: float | None) -> RemoteEntry:
        """The entry of file `path` (mount-relative); ValueError for a xet hash that is not 64 lowercase
        hex digits (it becomes a blob name) or a size that is not an integer in [0, 2^50)."""
        size = checked_size(size)
        if xet_hash is not None and not is_sha256(xet_hash):
            raise ValueError(f"invalid xet hash {str(xet_hash)[:80]!r}")
        if not xet_hash and not self._warned_unhashed:
            # Real buckets always send one; without it only the size can be checked.
            self._warned_unhashed = True
            logger.warning(
                "bucket %s: files listed without a xetHash (e.g. %s) are verified by size only", self.bucket_id, path
            )
        return RemoteEntry(
            path=path,
            is_dir=False,
            size=size,
            content_id=xet_hash,
            digest=Digest(XET, xet_hash) if xet_hash else None,
            xet_hash=xet_hash,
            mtime=mtime,
        )

    def list(self, path: str) -> list[RemoteEntry]:
        full = self._full(path)
        what = f"bucket {self.bucket_id}: list {full or '/'}"
        suffix = f"/{quote(full, safe='')}" if full else ""
        items = self._http.paginate(f"api/buckets/{self.bucket_id}/tree{suffix}", {"recursive": "false"}, what)
        return direct_children(items, full, self._entry, what, self._drop)

    def stat(self, path: str) -> RemoteEntry:
        full = self._full(path)
        what = f"bucket {self.bucket_id}: stat {full}"
        items, _ = self._http.request_json(
            "POST", f"api/buckets/{self.bucket_id}/paths-info", what, json={"paths": [full]}
        )
        for item in items:
            if item.get("path") == full and item.get("type", "file") == "file":
                try:
                    return self._entry(item)
                except ValueError as exc:
                    self._drop(what, full, exc)
        raise RemoteNotFound(f"{what}: not found")

    def read_range(
        self, entry: RemoteEntry, start: int, end: int, sink: Callable[[int, bytes], None], deadline: float
    ) -> None:
        """Stream bytes [start, end) of `entry` to `sink(offset, data)`, retrying transient failures."""
        self._http.stream_range(self.download_url(entry), start, end, sink, f"read {entry.path}", deadline)

    def xet_token_url(self) -> str:
        return self._http.url(f"api/buckets/{self.bucket_id}/xet-read-token")

    def download_url(self, entry: RemoteEntry) -> str:
        return self._http.url(f"buckets/{self.bucket_id}/resolve/{quote(self._full(entry.path))}")
