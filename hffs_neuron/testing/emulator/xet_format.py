"""The Xet binary formats the CAS reads: shards (file reconstructions and xorb chunk lists) and the
chunk headers of serialized xorbs (huggingface.co/docs/xet: "Shard format", "Xorb format").

Only parsing: the real ``hf_xet`` client produces every shard and xorb the emulator stores.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: Every shard starts with this tag (xet-core ``MDB_SHARD_HEADER_TAG``).
SHARD_TAG = b"HFRepoMetaData\x00" + bytes(
    [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
_SHARD_HEADER = 48  # tag, version u64, footer size u64
_ENTRY = 48  # every file-info and xorb-info record: a 32-byte hash and 16 bytes of fields
_BOOKEND = b"\xff" * 32
_FLAG_VERIFICATION = 1 << 31
_FLAG_METADATA_EXT = 1 << 30
#: The footer of a serialized xorb starts with this ident; chunk headers start with a version byte 0.
XORB_FOOTER_IDENT = b"XETBLOB"
_CHUNK_HEADER = 8


class FormatError(ValueError):
    pass


def hash_hex(raw: bytes) -> str:
    """A 32-byte Merkle hash as Xet writes it: hex of each little-endian u64 word, in order."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


@dataclass(frozen=True)
class Segment:
    """A run of chunks ``[start, end)`` of one xorb, ``length`` bytes once unpacked."""

    xorb: str
    start: int
    end: int
    length: int


@dataclass(frozen=True)
class ShardContents:
    files: dict[str, list[Segment]]  # file hash -> its segments, in order
    xorbs: dict[str, list[int]]  # xorb hash -> unpacked length of each chunk
    sha256s: dict[str, str]  # file hash -> the sha256 its metadata extension names (LFS uploads carry one)


def parse_shard(data: bytes) -> ShardContents:
    """Read the file-info (with its sha256 metadata extension) and xorb-info sections of a shard (lookup
    tables and footer are not needed)."""
    if len(data) < _SHARD_HEADER or data[:32] != SHARD_TAG:
        raise FormatError("not a shard (wrong tag)")
    pos = _SHARD_HEADER

    def record(at: int) -> tuple[bytes, bytes]:
        if at + _ENTRY > len(data):
            raise FormatError("shard truncated")
        return data[at : at + 32], data[at + 32 : at + _ENTRY]

    files: dict[str, list[Segment]] = {}
    sha256s: dict[str, str] = {}
    while True:
        file_hash, fields = record(pos)
        pos += _ENTRY
        if file_hash == _BOOKEND:
            break
        flags, count = struct.unpack_from("<II", fields)
        segments = []
        for _ in range(count):
            xorb, seg = record(pos)
            pos += _ENTRY
            _xorb_flags, length, start, end = struct.unpack_from("<IIII", seg)
            segments.append(Segment(hash_hex(xorb), start, end, length))
        pos += _ENTRY * count if flags & _FLAG_VERIFICATION else 0
        if flags & _FLAG_METADATA_EXT:  # the sha256 (a 32-byte hash like the others) and 16 unused bytes
            sha256s[hash_hex(file_hash)] = hash_hex(record(pos)[0])
            pos += _ENTRY
        files[hash_hex(file_hash)] = segments
    xorbs: dict[str, list[int]] = {}
    while True:
        xorb_hash, fields = record(pos)
        pos += _ENTRY
        if xorb_hash == _BOOKEND:
            break
        _flags, count, _unpacked, _on_disk = struct.unpack_from("<IIII", fields)
        sizes = []
        for _ in range(count):
            _chunk, chunk_fields = record(pos)
            pos += _ENTRY
            sizes.append(struct.unpack_from("<II", chunk_fields)[1])
        xorbs[hash_hex(xorb_hash)] = sizes
    return ShardContents(files, xorbs, sha256s)


def xorb_chunk_offsets(data: bytes) -> list[int]:
    """Byte offset of each chunk in a serialized xorb, plus the end of the last chunk."""
    offsets, pos = [], 0
    while pos + _CHUNK_HEADER <= len(data) and not data.startswith(XORB_FOOTER_IDENT, pos):
        if data[pos] != 0:
            raise FormatError(f"unknown xorb chunk header version {data[pos]}")
        offsets.append(pos)
        compressed = int.from_bytes(data[pos + 1 : pos + 4], "little")
        pos += _CHUNK_HEADER + compressed
    if pos > len(data) or not offsets:
        raise FormatError("xorb truncated or empty")
    return [*offsets, pos]
