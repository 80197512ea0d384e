"""The Hub's HTTP conventions as the emulator speaks them: requests, responses, errors, ranges, ids.

Routes build a :class:`Response` (or raise :class:`HubError`); the server writes it. File bodies are
:class:`FileBody` references, never bytes in memory, so they can be sent with ``sendfile``.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

HEX = frozenset("0123456789abcdef")
NOT_FOUND = "Sorry, we can't find the page you are looking for."


class EmulatorHub(Protocol):
    """What the emulator's parts (stores, bridge, server) use of the ``hub.HubEmulator`` that owns them.

    Typed here rather than imported from ``hub.py``: that module imports every part, so a part importing
    it back would close an import circle. The parts' own classes are ``Any`` for the same reason.
    """

    root: Path
    url: str
    cdn_url: str | None
    xet: bool
    redirect_lfs: bool
    stop_event: threading.Event
    accounting: Any  # accounting.Accounting
    buckets: Any  # buckets.BucketStore
    repos: Any  # repos.RepoStore
    bucket_events: Any  # events.BucketEvents
    cas: Any  # cas.CasStore
    xet_bridge: Any  # xet_bridge.XetBridge

    def authorized(self, headers: Mapping[str, str]) -> bool: ...
    def route(self, req: Request) -> Response: ...
    def overrides_for(self, key: str, prefix: str) -> list[dict[str, Any]]: ...
    def xet_headers(self, xet_hash: str, token_route: str) -> dict[str, str]: ...
    def paginated(self, items: list[dict[str, Any]], req: Request) -> Response: ...
    def paginated_paths(
        self, paths: Sequence[str], item: Callable[[int], dict[str, Any]], req: Request
    ) -> Response: ...


@dataclass
class FileBody:
    """``length`` bytes of the file at ``path`` from ``offset``."""

    path: Path
    offset: int
    length: int


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes | FileBody | list[bytes | FileBody] = b""  # a list: parts written in order (multipart)
    stream: Iterator[bytes] | None = None  # instead of a body: chunks sent as they come (event feeds)

    @property
    def length(self) -> int:
        parts = self.body if isinstance(self.body, list) else [self.body]
        return sum(p.length if isinstance(p, FileBody) else len(p) for p in parts)


@dataclass
class Request:
    """What the routes need from a request: segments are the URL path split on '/' and decoded."""

    role: str
    method: str
    raw_path: str
    segments: list[str]
    query: dict[str, list[str]]
    body: bytes
    headers: Mapping[str, str]

    def param(self, name: str) -> str:
        return self.query.get(name, [""])[-1]


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` and a json ``error``."""

    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def response(self) -> Response:
        headers = {"Content-Type": "application/json", "X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return Response(self.status, headers, json.dumps({"error": self.message}).encode())


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single ``bytes=`` range, None to serve the whole body.

    Multi-range and malformed headers are ignored (RFC 9110 allows it); raises
    :class:`RangeNotSatisfiable` for a syntactically valid range beyond the end.
    """
    if not header or not header.strip().startswith("bytes=") or "," in header:
        return None
    return _parse_spec(header.strip()[len("bytes=") :], size)


def _parse_spec(spec: str, size: int) -> tuple[int, int] | None:
    """One ``first-last`` / ``first-`` / ``-suffix`` range spec; None if malformed."""
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if not first:  # suffix range: the last N bytes
            n = int(last)
            if n <= 0 or size == 0:
                raise RangeNotSatisfiable
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    if end < start:
        return None
    return start, min(end, size - 1)


def ranges_response(blob: Path, size: int, etag: str, req: Request, extra: Mapping[str, str]) -> Response:
    """Like :func:`file_response`, but a multi-range header gets a ``multipart/byteranges`` answer."""
    header = (req.headers.get("Range") or "").strip()
    if not header.startswith("bytes=") or "," not in header:
        return file_response(blob, size, etag, req, extra)
    try:
        ranges = [_parse_spec(spec, size) for spec in header[len("bytes=") :].split(",")]
    except RangeNotSatisfiable:
        return Response(416, {**extra, "Content-Range": f"bytes */{size}"})
    boundary = "hffs_emulator_byteranges"
    parts: list[bytes | FileBody] = []
    for rng in ranges:
        if rng is None:
            return Response(400, {"Content-Type": "text/plain"}, b"malformed range")
        start, end = rng
        head = f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {start}-{end}/{size}"
        parts += [head.encode() + b"\r\n\r\n", FileBody(blob, start, end - start + 1), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    headers = {**extra, "ETag": f'"{etag}"', "Content-Type": f"multipart/byteranges; boundary={boundary}"}
    return Response(206, headers, parts)


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())


def file_response(blob: Path, size: int, etag: str, req: Request, extra: Mapping[str, str]) -> Response:
    """200 with the whole file, 206 for a satisfiable Range, 416 otherwise."""
    base = {**extra, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
    try:
        rng = parse_range(req.headers.get("Range"), size)
    except RangeNotSatisfiable:
        return Response(416, {**base, "Content-Range": f"bytes */{size}"})
    if rng is None:
        return Response(200, base, FileBody(blob, 0, size))
    start, end = rng
    return Response(
        206, {**base, "Content-Range": f"bytes {start}-{end}/{size}"}, FileBody(blob, start, end - start + 1)
    )


def parse_form_or_json(body: bytes, headers: Mapping[str, str]) -> dict[str, list[Any]]:
    """Parse a form-encoded (what huggingface_hub sends) or json paths-info body into lists."""
    if "json" in (headers.get("Content-Type") or ""):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HubError(400, None, "invalid json body") from None
        return {k: v if isinstance(v, list) else [v] for k, v in data.items()}
    return parse_qs(body.decode(), keep_blank_values=True)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def whoami(token: str | None, valid: frozenset[str]) -> Response:
    """``GET /api/whoami-v2``: who the token belongs to, or 401 (as the Hub answers) for none or an unknown one."""
    if token is None or token not in valid:
        raise HubError(401, None, "Invalid credentials in Authorization header")
    auth = {"type": "access_token", "accessToken": {"displayName": "emulator", "role": "read"}}
    return json_response({"type": "user", "name": "hffs-test", "auth": auth})


def iso(ts: float) -> str:
    """A timestamp in the Hub's ISO-8601 format (millisecond precision, ``Z`` suffix)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def is_commit_sha(rev: str) -> bool:
    return len(rev) == 40 and set(rev) <= HEX


def clean_rel_path(path: str) -> str | None:
    """A relative POSIX path with no empty, '.' or '..' component, or None if it is not one."""
    path = path.strip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or "\0" in path:
        return None
    return path


def check_id(kind: str, ident: str) -> None:
    parts = ident.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{kind} id must look like 'namespace/name', got {ident!r}")


def encode_cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode()).decode()


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return ""
