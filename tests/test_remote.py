"""Remotes (HubRepo, Bucket) over real HTTP to the local Hub emulator: metadata, bytes, errors, retries."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import hf_xet
import pytest
from conftest import TEST_TOKEN
from huggingface_hub import constants as hf_constants

from hffs_neuron.errors import RangeIgnored, RemoteAccessDenied, RemoteNotFound, RemoteUnavailable, UsageError
from hffs_neuron.remote import Bucket, HubHttp, HubRepo, RemoteEntry, is_safe_path, token_fingerprint
from hffs_neuron.remote.base import Digest
from hffs_neuron.testing.hub_emulator import HubEmulator, git_blob_sha1

CONFIG = b'{"model_type": "llama"}'
WEIGHTS = os.urandom(300 * 1024)  # LFS (size and suffix)
NOTES = b"hello\n"


def make_http(hub: HubEmulator, token: str | None = "", **kwargs: object) -> HubHttp:
    """A client with short deadlines so that failure paths finish in seconds.

    token="" means anonymous (None would pick up HF_TOKEN / a saved token).
    """
    options: dict = dict(connect_timeout=2, read_timeout=1, operation_timeout=8, max_retries=3)
    options.update(kwargs)
    return HubHttp(hub.url, token, **options)


@pytest.fixture
def http(hub: HubEmulator) -> Iterator[HubHttp]:
    client = make_http(hub)
    yield client
    client.close()


@pytest.fixture
def repo_sha(hub: HubEmulator) -> str:
    return hub.add_repo(
        "Org/Model",
        {
            "config.json": CONFIG,
            "model.safetensors": WEIGHTS,
            "empty.txt": b"",
            "sub/dir/notes.txt": NOTES,
        },
    )


def read_all(remote: HubRepo | Bucket, entry: RemoteEntry, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of `entry`, placed at the offsets the remote reports."""
    end = entry.size if end is None else end
    buf = bytearray(end - start)

    def sink(offset: int, data: bytes) -> None:
        buf[offset - start : offset - start + len(data)] = data

    remote.read_range(entry, start, end, sink, time.monotonic() + 30)
    return bytes(buf)


def downloads(hub: HubEmulator, name: str) -> list:
    return [r for r in hub.requests(name, "GET") if "/resolve/" in r.path]


# -- HubRepo metadata and bytes ---------------------------------------------------------------------


def test_hub_repo_entries_and_bytes(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    hub.page_size = 2  # the tree arrives in several pages
    repo = HubRepo(http, "model", "org/model", "main")
    assert repo.commit == repo_sha
    assert repo.repo_id == "Org/Model"  # the Hub's canonical casing

    config = repo.stat("config.json")
    assert (config.size, config.lfs, config.is_dir) == (len(CONFIG), False, False)
    assert config.content_id == git_blob_sha1(CONFIG)  # regular file: git blob sha1
    assert config.digest is not None and config.digest.algo == "git-sha1"

    weights = repo.stat("model.safetensors")
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    assert (weights.size, weights.lfs, weights.content_id) == (len(WEIGHTS), True, sha256)
    assert weights.digest is not None and (weights.digest.algo, weights.digest.hexdigest) == ("sha256", sha256)
    assert weights.git_oid and weights.git_oid != sha256  # the pointer's git oid

    assert repo.stat("empty.txt").size == 0
    assert {e.path for e in repo.files()} == {"config.json", "model.safetensors", "empty.txt", "sub/dir/notes.txt"}
    assert {(e.name, e.is_dir) for e in repo.list("")} == {
        ("config.json", False),
        ("model.safetensors", False),
        ("empty.txt", False),
        ("sub", True),
    }
    assert [e.path for e in repo.list("sub/dir")] == ["sub/dir/notes.txt"]

    assert read_all(repo, config) == CONFIG
    assert read_all(repo, weights) == WEIGHTS
    assert read_all(repo, repo.stat("empty.txt")) == b""
    assert read_all(repo, repo.stat("sub/dir/notes.txt")) == NOTES
    assert read_all(repo, weights, 1000, 5000) == WEIGHTS[1000:5000]


def test_hub_repo_is_pinned_to_a_commit(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    pinned = HubRepo(http, "model", "Org/Model", "main")
    new_sha = hub.add_repo("Org/Model", {"config.json": b'{"v": 2}'}, parent="main")
    # The branch moved, the pinned repo did not: same tree, same bytes.
    assert pinned.commit == repo_sha
    assert read_all(pinned, pinned.stat("config.json")) == CONFIG
    assert HubRepo(http, "model", "Org/Model", "main").commit == new_sha
    by_commit = HubRepo(http, "model", "Org/Model", repo_sha)
    assert read_all(by_commit, by_commit.stat("config.json")) == CONFIG


def test_dataset_repo_and_lfs_redirect(hub: HubEmulator, http: HubHttp) -> None:
    hub.add_repo("Org/Data", {"train.bin": WEIGHTS, "README.md": NOTES}, repo_type="dataset")
    hub.redirect_lfs = True  # LFS bytes come from a second origin (the "CDN")
    repo = HubRepo(http, "dataset", "Org/Data")
    assert read_all(repo, repo.stat("train.bin")) == WEIGHTS
    assert read_all(repo, repo.stat("train.bin"), 7, 70_000) == WEIGHTS[7:70_000]
    assert read_all(repo, repo.stat("README.md")) == NOTES
    assert hub.bytes_served("/lfs/") >= len(WEIGHTS)


def test_invalid_ids_are_usage_errors(http: HubHttp) -> None:
    with pytest.raises(UsageError):
        HubRepo(http, "space", "Org/Model")
    with pytest.raises(UsageError):
        HubRepo(http, "model", "../etc")
    with pytest.raises(UsageError):
        Bucket(http, "no-namespace")


# -- not found / access denied ---------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", TEST_TOKEN], ids=["anonymous", "token"])
def test_missing_repo_revision_file_are_enoent(hub: HubEmulator, repo_sha: str, token: str) -> None:
    http = make_http(hub, token)
    try:
        with pytest.raises(RemoteNotFound) as info:
            HubRepo(http, "model", "Org/Missing")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(RemoteNotFound):
            HubRepo(http, "model", "Org/Model", "no-such-branch")
        with pytest.raises(RemoteNotFound):
            HubRepo(http, "model", "Org/Model", "0" * 40)
        repo = HubRepo(http, "model", "Org/Model")
        with pytest.raises(RemoteNotFound):
            repo.stat("nope.json")
        with pytest.raises(RemoteNotFound):
            repo.list("config.json")  # a file is not a directory
        # The download itself answers 404 for a path the tree does not have.
        ghost = RemoteEntry(path="ghost.bin", is_dir=False, size=10)
        with pytest.raises(RemoteNotFound) as info:
            read_all(repo, ghost)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(RemoteNotFound):
            Bucket(http, "org/no-bucket")
    finally:
        http.close()


@pytest.fixture
def gated(hub: HubEmulator) -> str:
    hub.add_repo("Org/Gated", {"config.json": CONFIG, "model.safetensors": WEIGHTS}, gated=True)
    return "Org/Gated"


def test_gated_repo_without_token_is_eacces(hub: HubEmulator, gated: str) -> None:
    for token in ("", "hf_wrong_token"):
        http = make_http(hub, token)
        repo = HubRepo(http, "model", gated)
        for name in ("config.json", "model.safetensors"):
            with pytest.raises(RemoteAccessDenied) as info:
                read_all(repo, repo.stat(name))
            assert info.value.errno == errno.EACCES
            assert "--token-file" in str(info.value)  # says which token counts: the mount's
        http.close()
    assert hub.bytes_served("Gated") == 0


def test_gated_repo_with_explicit_token(hub: HubEmulator, gated: str) -> None:
    http = make_http(hub, TEST_TOKEN)
    repo = HubRepo(http, "model", gated)
    assert read_all(repo, repo.stat("model.safetensors")) == WEIGHTS
    hub.redirect_lfs = True
    assert read_all(repo, repo.stat("model.safetensors")) == WEIGHTS
    http.close()


def test_gated_repo_with_hf_token_env(hub: HubEmulator, gated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    http = make_http(hub, None)  # None: huggingface_hub's own lookup
    assert http.has_token and http.token_fingerprint == token_fingerprint(TEST_TOKEN)
    repo = HubRepo(http, "model", gated)
    assert read_all(repo, repo.stat("config.json")) == CONFIG
    http.close()


def test_gated_repo_with_saved_token(hub: HubEmulator, gated: str) -> None:
    token_path = Path(hf_constants.HF_TOKEN_PATH)
    assert not token_path.exists()
    token_path.parent.mkdir(parents=True, exist_ok=True)
    token_path.write_text(TEST_TOKEN)
    try:
        http = make_http(hub, None)
        repo = HubRepo(http, "model", gated)
        assert read_all(repo, repo.stat("config.json")) == CONFIG
        http.close()
    finally:
        token_path.unlink()


def test_token_never_logged_nor_in_messages(
    hub: HubEmulator, gated: str, repo_sha: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx2 and huggingface_hub included
    http = make_http(hub, TEST_TOKEN, max_retries=2)
    messages = []
    hub.faults.add("*/resolve/*", "status", status=503, count=1)
    hub.faults.add("*/resolve/*", "reset", count=1)
    repo = HubRepo(http, "model", gated)
    assert read_all(repo, repo.stat("model.safetensors")) == WEIGHTS
    for call in (
        lambda: HubRepo(http, "model", "Org/Missing"),
        lambda: read_all(repo, RemoteEntry(path="ghost", is_dir=False, size=3)),
    ):
        with pytest.raises(RemoteNotFound) as info:
            call()
        messages.append(str(info.value))
    hub.faults.add("*/resolve/*", "status", status=503)
    with pytest.raises(RemoteUnavailable) as unavailable:
        read_all(repo, repo.stat("config.json"))
    messages.append(str(unavailable.value))
    assert "retry" in caplog.text  # the retries were logged...
    assert TEST_TOKEN not in caplog.text  # ...without the token
    assert not any(TEST_TOKEN in m for m in messages)
    assert TEST_TOKEN not in repo.cache_namespace and TEST_TOKEN not in repr(vars(http).get("token_fingerprint"))
    http.close()


def test_cache_namespace_separates_identities(hub: HubEmulator, repo_sha: str) -> None:
    anonymous, other = make_http(hub, ""), make_http(hub, TEST_TOKEN)
    a, b = HubRepo(anonymous, "model", "Org/Model"), HubRepo(other, "model", "Org/Model")
    assert a.cache_namespace != b.cache_namespace
    assert TEST_TOKEN not in b.cache_namespace and repo_sha in b.cache_namespace
    anonymous.close()
    other.close()


# -- transient failures: retried, or a bounded EIO -----------------------------------------------


@pytest.mark.parametrize(
    "kind,options",
    [
        ("status", {"status": 503, "count": 3}),
        ("status", {"status": 502, "count": 1}),
        ("status", {"status": 429, "count": 2, "retry_after": 0}),
        ("reset", {"count": 2}),
        ("truncate", {"count": 2}),
        ("stall", {"seconds": 4, "count": 1}),  # beyond the 1 s read timeout
        ("latency", {"seconds": 0.5, "count": 1}),  # slow but within the read timeout: no retry
    ],
)
@pytest.mark.timeout(60)
def test_transient_download_failures_are_retried(
    hub: HubEmulator, http: HubHttp, repo_sha: str, kind: str, options: dict
) -> None:
    repo = HubRepo(http, "model", "Org/Model")
    hub.faults.add("*/model.safetensors", kind, **options)
    assert read_all(repo, repo.stat("model.safetensors")) == WEIGHTS
    sent = downloads(hub, "model.safetensors")
    assert len([r for r in sent if r.fault]) == options["count"]
    assert len(sent) == options["count"] + (kind != "latency")  # each failure cost one more request


@pytest.mark.parametrize(
    "kind,options",
    [
        ("status", {"status": 503}),
        ("status", {"status": 500}),
        ("reset", {}),
        ("truncate", {}),
        ("stall", {"seconds": 5}),
    ],
)
@pytest.mark.timeout(60)
def test_persistent_download_failures_are_bounded_eio(
    hub: HubEmulator, repo_sha: str, kind: str, options: dict
) -> None:
    http = make_http(hub, "", max_retries=2)
    repo = HubRepo(http, "model", "Org/Model")
    hub.faults.add("*/model.safetensors", kind, **options)
    with pytest.raises(RemoteUnavailable) as info:
        read_all(repo, repo.stat("model.safetensors"))
    assert info.value.errno == errno.EIO
    assert len(downloads(hub, "model.safetensors")) == 3  # one try + max_retries, then give up
    http.close()


@pytest.mark.timeout(60)
def test_metadata_failures_are_retried_then_bounded(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    # Damaged JSON is retried like any transient failure, never a bare ValueError.
    hub.faults.add("/api/models/*", "corrupt", count=1)
    hub.faults.add("/api/models/*", "status", status=503, count=1)
    hub.faults.add("/api/models/*", "truncate", count=1)
    repo = HubRepo(http, "model", "Org/Model")
    assert repo.commit == repo_sha and len(repo.files()) == 4
    hub.faults.add("/api/models/*", "status", status=504)
    with pytest.raises(RemoteUnavailable):
        HubRepo(http, "model", "Org/Model")


@pytest.mark.timeout(30)
def test_unreachable_endpoint_is_bounded_eio() -> None:
    http = HubHttp("http://127.0.0.1:9", "", connect_timeout=1, read_timeout=1, operation_timeout=4, max_retries=2)
    with pytest.raises(RemoteUnavailable) as info:
        HubRepo(http, "model", "Org/Model")
    assert info.value.errno == errno.EIO
    http.close()


@pytest.mark.timeout(30)
def test_retry_after_is_honoured(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    repo = HubRepo(http, "model", "Org/Model")
    hub.faults.add("*/config.json", "status", status=429, retry_after=1.5, count=1)
    assert read_all(repo, repo.stat("config.json")) == CONFIG
    first, second = downloads(hub, "config.json")
    assert first.status == 429 and second.status in (200, 206)
    # Our own backoff would have waited at most 0.375 s; the server asked for 1.5 s.
    assert second.time - first.time >= 1.4


@pytest.mark.timeout(30)
def test_retry_after_beyond_the_deadline_gives_up_at_once(hub: HubEmulator, repo_sha: str) -> None:
    http = make_http(hub, "", operation_timeout=3)
    repo = HubRepo(http, "model", "Org/Model")
    entry = repo.stat("config.json")
    hub.faults.add("*/config.json", "status", status=429, retry_after=3600)
    with pytest.raises(RemoteUnavailable):
        http.stream_range(repo.download_url(entry), 0, entry.size, lambda o, d: None, "read", None)
    assert len(downloads(hub, "config.json")) == 1  # no pointless wait-then-fail
    http.close()


def test_expired_deadline_fails_without_hanging(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    repo = HubRepo(http, "model", "Org/Model")
    entry = repo.stat("config.json")
    with pytest.raises(RemoteUnavailable):
        repo.read_range(entry, 0, entry.size, lambda o, d: None, time.monotonic() - 1)


# -- buckets ---------------------------------------------------------------------------------------


@pytest.fixture
def bucket_files(hub: HubEmulator) -> dict[str, bytes]:
    files = {
        "foo.sample": b"not a directory",
        "foobar": b"neither",
        "foo/a.bin": os.urandom(5000),
        "foo/b/c.txt": b"deep",
        "other/x": b"x",
    }
    hub.add_bucket("org/cache", files)
    return files


def test_bucket_entries_and_bytes(hub: HubEmulator, http: HubHttp, bucket_files: dict[str, bytes]) -> None:
    bucket = Bucket(http, "Org/Cache")
    entry = bucket.stat("foo/a.bin")
    data = bucket_files["foo/a.bin"]
    assert (entry.size, entry.is_dir) == (len(data), False)
    on_disk_path = hub.bucket_dir("org/cache") / "foo/a.bin"
    assert entry.content_id == hf_xet.hash_files([str(on_disk_path)])[0].hash  # a real xet hash, as the Hub lists
    assert entry.digest == Digest("xet", entry.content_id)  # what the store verifies the bytes against
    on_disk = (hub.bucket_dir("org/cache") / "foo/a.bin").stat().st_mtime
    assert entry.mtime is not None and abs(entry.mtime - on_disk) < 2
    assert read_all(bucket, entry) == data
    assert read_all(bucket, entry, 100, 200) == data[100:200]
    with pytest.raises(RemoteNotFound):
        bucket.stat("foo/missing")
    with pytest.raises(RemoteNotFound):
        bucket.stat("foo")  # a directory is not a file


def test_bucket_listing_uses_whole_components(hub: HubEmulator, http: HubHttp, bucket_files: dict) -> None:
    bucket = Bucket(http, "org/cache")
    assert {(e.path, e.is_dir) for e in bucket.list("")} == {
        ("foo", True),
        ("foo.sample", False),
        ("foobar", False),
        ("other", True),
    }
    assert {(e.path, e.is_dir) for e in bucket.list("foo")} == {("foo/a.bin", False), ("foo/b", True)}
    assert [e.path for e in bucket.list("foo/b")] == ["foo/b/c.txt"]
    # Nested items a server slips into a listing are not direct children: ignored.
    hub.add_listing_override("org/cache", [{"type": "file", "path": "foo/b/zz/deep", "size": 1, "xetHash": "a" * 64}])
    assert {e.path for e in bucket.list("foo")} == {"foo/a.bin", "foo/b"}

    scoped = Bucket(http, "org/cache", prefix="foo")  # paths relative to the prefix
    assert {(e.path, e.is_dir) for e in scoped.list("")} == {("a.bin", False), ("b", True)}
    assert read_all(scoped, scoped.stat("b/c.txt")) == b"deep"
    assert read_all(scoped, scoped.stat("a.bin")) == bucket_files["foo/a.bin"]


def test_unsafe_remote_names_are_dropped(
    hub: HubEmulator, http: HubHttp, bucket_files: dict, repo_sha: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = ["..", ".", "bad\x01name", "new\nline", "x" * 300, "back\\slash"]
    items = [{"type": "file", "path": p, "size": 1, "xetHash": "b" * 64, "oid": "c" * 40} for p in hostile]
    items += [{"type": "file", "path": "foo/..", "size": 1, "xetHash": "b" * 64, "oid": "c" * 40}]
    items += [{"type": "file", "path": "malformed-no-oid", "size": 1}]  # repo listings need an oid
    hub.add_listing_override("org/cache", items)
    bucket = Bucket(http, "org/cache")
    root = [e.path for e in bucket.list("")]
    assert set(root) == {"foo", "foo.sample", "foobar", "other", "malformed-no-oid"}  # the good ones are still served
    assert {e.path for e in bucket.list("foo")} == {"foo/a.bin", "foo/b"}
    assert "unsafe name" in caplog.text

    hub.add_listing_override("Org/Model", items, repo_type="model")
    repo = HubRepo(http, "model", "Org/Model")
    assert all(is_safe_path(e.path) for e in repo.files())
    assert {e.path for e in repo.files()} == {"config.json", "model.safetensors", "empty.txt", "sub/dir/notes.txt"}


@pytest.mark.timeout(60)
def test_bucket_transient_failures(hub: HubEmulator, http: HubHttp, bucket_files: dict) -> None:
    hub.faults.add("/api/buckets/*", "status", status=503, count=2, methods=("GET", "POST"))
    hub.faults.add("/api/buckets/*", "corrupt", count=1, methods=("GET", "POST"))
    bucket = Bucket(http, "org/cache")
    assert len(bucket.list("")) == 4
    entry = bucket.stat("foo/a.bin")
    hub.faults.add("/buckets/*", "reset", count=2)
    assert read_all(bucket, entry) == bucket_files["foo/a.bin"]


def test_a_server_that_ignores_range(hub: HubEmulator, http: HubHttp, repo_sha: str) -> None:
    """A 200 to a ranged request is the whole body: from byte 0 its first bytes serve the range; past
    the start it raises RangeIgnored at once, without retries (issue 26)."""
    repo = HubRepo(http, "model", "Org/Model")
    entry = repo.stat("model.safetensors")
    hub.faults.add("*/model.safetensors", "ignore_range")
    assert read_all(repo, entry, 0, 1000) == WEIGHTS[:1000]
    assert read_all(repo, entry) == WEIGHTS
    hub.reset_stats()
    with pytest.raises(RangeIgnored) as raised:
        read_all(repo, entry, 1000, 2000)
    assert raised.value.errno == errno.EIO
    assert len(hub.requests("model.safetensors", method="GET")) == 1
