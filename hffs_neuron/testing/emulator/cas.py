"""The Xet CAS (content-addressed storage) the emulator serves on its own origin, with the routes
``hf_xet`` 1.x calls (huggingface.co/docs/xet, "CAS API"; xet-core's ``openapi/cas.openapi.yaml``):

- ``GET /v2/reconstructions/{file}`` (with ``Range``): the terms of a file and, per xorb, one URL
  with all the byte ranges to fetch (multi-range requests answered as ``multipart/byteranges``);
- ``GET /v1/reconstructions/{file}``: the same with one URL and byte range per term;
- ``POST /v1/xorbs/default/{xorb}`` and ``POST /v1/shards``: uploads (shards name the files and, for
  files a repo commit will name, their sha256: see :meth:`CasStore.file_by_sha256`);
- ``GET /v1/chunks/default/{chunk}``: the global dedupe query, always a miss (404), which is valid;
- ``GET /v1/xorb-data/{file}/{xorb}`` with ``Range``: the serialized xorb bytes a reconstruction
  points to (the file hash in the path lets accounting count CAS bytes per file);
- ``POST /v1/telemetry``: accepted and dropped.

``/v2/shards`` (streamed upload events) and ``/v1/xorb-grants`` (upload grants) answer 404, on which
the real client falls back to ``/v1/shards`` and direct xorb uploads. Access tokens are short-lived and issued by
:meth:`CasStore.issue_token` for the Hub's ``xet-read-token``/``xet-write-token`` routes.

Xorbs are stored as received under ``<root>/xet/xorbs/``, shards under ``<root>/xet/shards/`` (parsed
again when an emulator restarts on the same root).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from hffs_neuron.testing.emulator.protocol import (
    HEX,
    EmulatorHub,
    HubError,
    RangeNotSatisfiable,
    Request,
    Response,
    bearer_token,
    json_response,
    parse_range,
    ranges_response,
)
from hffs_neuron.testing.emulator.xet_bridge import EMPTY_HASH
from hffs_neuron.testing.emulator.xet_format import FormatError, Segment, parse_shard, xorb_chunk_offsets

#: Route prefix of the ranged xorb downloads a reconstruction points to.
XORB_DATA = "/v1/xorb-data/"
#: Tokens issued over the Hub routes; at most this many are remembered (oldest forgotten first).
_MAX_TOKENS = 10_000


def _is_hash(value: str) -> bool:
    return len(value) == 64 and set(value) <= HEX


class CasStore:
    """Xorbs, shards and file reconstructions of one emulator, and the CAS routes."""

    def __init__(self, hub: EmulatorHub, token_ttl: float) -> None:
        self.hub = hub
        self.token_ttl = token_ttl
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (scope, expiry)
        self._files: dict[str, list[Segment]] = {}
        self._by_sha256: dict[str, str] = {}  # sha256 -> file hash, from the shards' metadata extensions
        self._chunk_sizes: dict[str, list[int]] = {}  # xorb -> unpacked size of each chunk
        self._offsets: dict[str, list[int]] = {}  # xorb -> byte offset of each chunk (+ end)
        self._load()

    @property
    def _dir(self) -> Path:
        return self.hub.root / "xet"

    def _load(self) -> None:
        for shard in sorted((self._dir / "shards").iterdir()):
            self._register(shard.read_bytes())

    # -- tokens ------------------------------------------------------------------------------------

    def issue_token(self, scope: str, ttl: float | None = None) -> dict[str, object]:
        """A fresh token (``read`` or ``write``, for ``ttl`` or the configured seconds), as the Hub's
        token routes return it."""
        token, expiry = "xet_" + secrets.token_hex(16), time.time() + (self.token_ttl if ttl is None else ttl)
        with self._lock:
            now = time.time()
            for old in [t for t, (_, exp) in self._tokens.items() if exp < now]:
                del self._tokens[old]
            while len(self._tokens) >= _MAX_TOKENS:
                del self._tokens[next(iter(self._tokens))]
            self._tokens[token] = (scope, expiry)
        return {"accessToken": token, "exp": int(expiry), "casUrl": self.hub.url}

    def _check_token(self, headers: Mapping[str, str], scope: str) -> None:
        token = bearer_token(headers)
        with self._lock:
            granted = self._tokens.get(token or "")
        if granted is None or granted[1] < time.time():
            raise HubError(401, None, "missing, unknown or expired xet token")
        if scope == "write" and granted[0] != "write":
            raise HubError(403, None, "this xet token is read-only")

    # -- content -----------------------------------------------------------------------------------

    def has_file(self, file_hash: str) -> bool:
        with self._lock:
            return file_hash in self._files

    def file_by_sha256(self, sha256: str) -> str | None:
        """The file hash of an uploaded file whose shard named this sha256 (an LFS file sent over Xet)."""
        with self._lock:
            return self._by_sha256.get(sha256)

    def file_size(self, file_hash: str) -> int | None:
        with self._lock:
            segments = self._files.get(file_hash)
        return None if segments is None else sum(s.length for s in segments)

    def _xorb_path(self, xorb: str) -> Path:
        return self._dir / "xorbs" / xorb

    def _register(self, shard: bytes) -> bool:
        """Index a shard's files and xorbs; False if it named no new file."""
        contents = parse_shard(shard)
        with self._lock:
            self._chunk_sizes.update(contents.xorbs)
            new = any(f not in self._files for f in contents.files)
            self._files.update(contents.files)
            self._by_sha256.update((sha256, file_hash) for file_hash, sha256 in contents.sha256s.items())
        return new

    def _chunk_offsets(self, xorb: str) -> list[int]:
        with self._lock:
            offsets = self._offsets.get(xorb)
        if offsets is None:
            offsets = xorb_chunk_offsets(self._xorb_path(xorb).read_bytes())
            with self._lock:
                self._offsets[xorb] = offsets
        return offsets

    # -- routes ------------------------------------------------------------------------------------

    def route(self, req: Request) -> Response | None:
        """Answer a CAS route, or None if the path is not one (the Hub's 404 then applies)."""
        seg, method = req.segments, req.method
        if seg[:1] not in (["v1"], ["v2"]) or len(seg) < 2:
            return None
        kind = seg[1]
        if method == "GET" and kind == "reconstructions" and len(seg) == 3 and _is_hash(seg[2]):
            self._check_token(req.headers, "read")
            return self._reconstruction(seg[2], req, v2=seg[0] == "v2")
        if seg[0] != "v1":
            return None  # v2 shards and the like: 404, on which hf_xet falls back to v1
        if method in ("GET", "HEAD") and kind == "xorb-data" and len(seg) == 4 and _is_hash(seg[3]):
            return self._xorb_data(seg[3], req)
        if method == "GET" and kind == "chunks" and len(seg) == 4:
            self._check_token(req.headers, "read")
            raise HubError(404, None, "no global dedupe match")
        if method == "POST" and kind == "xorbs" and len(seg) == 4 and _is_hash(seg[3]):
            self._check_token(req.headers, "write")
            return self._put_xorb(seg[3], req.body)
        if method == "POST" and kind == "shards" and len(seg) == 2:
            self._check_token(req.headers, "write")
            return self._put_shard(req.body)
        if method == "POST" and kind == "telemetry":
            return json_response({})
        return None

    def _put_xorb(self, xorb: str, body: bytes) -> Response:
        try:
            offsets = xorb_chunk_offsets(body)
        except FormatError as e:
            raise HubError(400, None, f"invalid xorb: {e}") from None
        # Kept now, while the body is in memory: otherwise the first download of each xorb would read it
        # all from disk to find its chunks (and the first client timed would pay for it).
        with self._lock:
            self._offsets[xorb] = offsets
        target = self._xorb_path(xorb)
        inserted = not target.exists()
        if inserted:
            tmp = target.with_name(f".{xorb}.{threading.get_ident()}")
            tmp.write_bytes(body)
            os.replace(tmp, target)
        return json_response({"was_inserted": inserted})

    def _put_shard(self, body: bytes) -> Response:
        try:
            contents = parse_shard(body)
        except FormatError as e:
            raise HubError(400, None, f"invalid shard: {e}") from None
        missing = {s.xorb for segs in contents.files.values() for s in segs if not self._xorb_path(s.xorb).exists()}
        if missing:
            raise HubError(400, None, f"shard references xorbs never uploaded: {sorted(missing)[:3]}")
        target = self._dir / "shards" / f"{time.time_ns()}-{secrets.token_hex(4)}"
        tmp = target.with_name("." + target.name)
        tmp.write_bytes(body)
        os.replace(tmp, target)
        new = self._register(body)
        return json_response({"result": 1 if new else 0})

    def _reconstruction(self, file_hash: str, req: Request, v2: bool) -> Response:
        """v1: one fetch info (url + byte range) per term; v2: one multi-range url per xorb."""
        offset_into_first, terms, fetches = self._plan(file_hash, req)
        answer: dict[str, object] = {"offset_into_first_range": offset_into_first, "terms": terms}
        if not v2:
            answer["fetch_info"] = {
                xorb: [{"range": c, "url": self._xorb_url(file_hash, xorb), "url_range": b} for c, b in ranges]
                for xorb, ranges in fetches.items()
            }
        else:
            answer["xorbs"] = {
                xorb: [
                    {
                        "url": self._xorb_url(file_hash, xorb),
                        "ranges": [{"chunks": c, "bytes": b} for c, b in sorted(ranges, key=lambda r: r[0]["start"])],
                    }
                ]
                for xorb, ranges in fetches.items()
            }
        return json_response(answer)

    def _xorb_url(self, file_hash: str, xorb: str) -> str:
        return f"{self.hub.url}{XORB_DATA}{file_hash}/{xorb}"

    def _plan(self, file_hash: str, req: Request) -> tuple[int, list[dict[str, object]], dict[str, list[tuple]]]:
        """(offset into the first term, terms, xorb -> unique (chunk range, byte range) pairs to fetch)."""
        if file_hash == EMPTY_HASH:
            return 0, [], {}
        self.hub.xet_bridge.ensure_uploaded(file_hash)
        with self._lock:
            segments = self._files.get(file_hash)
        if segments is None:
            raise HubError(404, None, f"file {file_hash} not found")
        size = sum(s.length for s in segments)
        try:
            rng = parse_range(req.headers.get("Range"), size)
        except RangeNotSatisfiable:
            raise HubError(416, None, "range not satisfiable") from None
        first, last = rng if rng is not None else (0, size - 1)
        terms: list[dict[str, object]] = []
        fetches: dict[str, list[tuple]] = {}
        offset_into_first, pos = 0, 0
        for seg in segments:
            seg_end = pos + seg.length
            if seg_end > first and pos <= last:
                start, end, skipped, length = self._trim(seg, pos, first, last)
                if not terms:
                    offset_into_first = first - (pos + skipped)
                offsets = self._chunk_offsets(seg.xorb)
                chunks = {"start": start, "end": end}
                terms.append({"hash": seg.xorb, "unpacked_length": length, "range": chunks})
                pair = (chunks, {"start": offsets[start], "end": offsets[end] - 1})
                ranges = fetches.setdefault(seg.xorb, [])
                if pair not in ranges:  # a file repeating content names the same chunks twice
                    ranges.append(pair)
            pos = seg_end
        return offset_into_first, terms, fetches

    def _trim(self, seg: Segment, pos: int, first: int, last: int) -> tuple[int, int, int, int]:
        """The chunks of ``seg`` (which starts at file offset ``pos``) covering bytes ``first..last``.

        Returns (chunk start, chunk end, bytes skipped before the start, unpacked length); whole
        segments when the xorb's chunk sizes are unknown.
        """
        with self._lock:
            sizes = self._chunk_sizes.get(seg.xorb)
        if sizes is None or len(sizes) < seg.end:
            return seg.start, seg.end, 0, seg.length
        start, skipped = seg.start, 0
        while start + 1 < seg.end and pos + skipped + sizes[start] <= first:
            skipped += sizes[start]
            start += 1
        end, length = start, 0
        while end < seg.end and pos + skipped + length <= last:
            length += sizes[end]
            end += 1
        return start, end, skipped, length

    def _xorb_data(self, xorb: str, req: Request) -> Response:
        path = self._xorb_path(xorb)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise HubError(404, None, f"xorb {xorb} not found") from None
        return ranges_response(path, size, xorb, req, {"Accept-Ranges": "bytes"})


def token_response(grant: dict[str, object]) -> Response:
    """A token grant as the Hub sends it: json body plus the ``X-Xet-*`` headers huggingface_hub reads."""
    headers = {
        "X-Xet-Cas-Url": str(grant["casUrl"]),
        "X-Xet-Access-Token": str(grant["accessToken"]),
        "X-Xet-Token-Expiration": str(grant["exp"]),
    }
    return json_response(grant, headers=headers)
