"""The local Hub emulator, exercised with the real huggingface_hub client over real HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import hf_xet
import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BucketNotFoundError,
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hffs_neuron.testing.hub_emulator import EmulatorClient, HubEmulator, git_blob_sha1
from hffs_neuron.testing.sample_data import build_neff_bucket, build_sharded_model_repo

CONFIG = b'{"model_type": "llama"}'
WEIGHTS = os.urandom(64 * 1024)  # LFS by size and by suffix


@pytest.fixture
def repo(hub: HubEmulator) -> str:
    """A model repo with a regular file, an LFS file and a nested file; returns its commit."""
    return hub.add_repo(
        "Org/Model",
        {"config.json": CONFIG, "model.safetensors": WEIGHTS, "sub/dir/notes.txt": "hello"},
    )


def _blob_name(path: str) -> str:
    return os.path.basename(os.path.realpath(path))


# -- repo downloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["Org/Model", "org/model"])
def test_download_by_branch_and_commit(hub: HubEmulator, repo: str, hf_cache: Path, repo_id: str) -> None:
    for revision in ("main", repo):
        config = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=hf_cache)
        weights = hf_hub_download(repo_id, "model.safetensors", revision=revision, cache_dir=hf_cache)
        assert Path(config).read_bytes() == CONFIG
        assert Path(weights).read_bytes() == WEIGHTS
        assert _blob_name(config) == git_blob_sha1(CONFIG)  # regular file: git blob sha1
        assert _blob_name(weights) == hashlib.sha256(WEIGHTS).hexdigest()  # LFS file: sha256
    # The cache folder keeps the caller's spelling; the Hub side is case-insensitive.
    assert (hf_cache / f"models--{repo_id.replace('/', '--')}" / "refs" / "main").read_text() == repo


def test_second_commit_from_parent(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    second = hub.add_repo("org/model", {"config.json": b"{}"}, parent="main")
    assert second != repo
    new = hf_hub_download("Org/Model", "config.json", cache_dir=hf_cache)
    old = hf_hub_download("Org/Model", "config.json", revision=repo, cache_dir=hf_cache)
    assert Path(new).read_bytes() == b"{}" and Path(old).read_bytes() == CONFIG
    # Files not changed by the second commit are inherited from the parent.
    assert Path(hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)).read_bytes() == WEIGHTS
    assert HfApi().model_info("Org/Model").sha == second


def test_snapshot_download(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    folder = Path(snapshot_download("Org/Model", cache_dir=hf_cache))
    assert folder.name == repo
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "sub" / "dir" / "notes.txt").read_text() == "hello"


def test_dataset_repo(hub: HubEmulator, hf_cache: Path) -> None:
    hub.add_repo("Org/Data", {"train.csv": "a,b\n1,2\n"}, repo_type="dataset")
    path = hf_hub_download("org/data", "train.csv", repo_type="dataset", cache_dir=hf_cache)
    assert Path(path).read_text() == "a,b\n1,2\n"
    assert HfApi().dataset_info("org/data").id == "Org/Data"


# -- repo API ----------------------------------------------------------------------------------------


def test_list_repo_tree_paginates(hub: HubEmulator) -> None:
    files = {f"dir/file{i:02d}.txt": f"content {i}" for i in range(7)}
    files["top.txt"] = "top"
    hub.add_repo("Org/Paged", files)
    hub.page_size = 2
    api = HfApi()

    listed = list(api.list_repo_tree("org/paged", recursive=True))
    assert [e.path for e in listed] == sorted([*files, "dir"])
    pages = hub.requests("/tree/", method="GET")
    assert len(pages) == 5  # 9 entries, 2 per page
    assert all("cursor=" in r.query for r in pages[1:])

    children = list(api.list_repo_tree("org/paged", path_in_repo="dir"))
    assert [e.path for e in children] == sorted(p for p in files if p.startswith("dir/"))
    top = list(api.list_repo_tree("org/paged"))
    assert [(e.path, type(e).__name__) for e in top] == [("dir", "RepoFolder"), ("top.txt", "RepoFile")]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/paged", path_in_repo="top.txt"))
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/paged", path_in_repo="missing"))


def test_get_paths_info_and_model_info(hub: HubEmulator, repo: str) -> None:
    api = HfApi()
    infos = {i.path: i for i in api.get_paths_info("org/model", ["config.json", "model.safetensors", "sub", "nope"])}
    assert set(infos) == {"config.json", "model.safetensors", "sub"}
    assert infos["config.json"].blob_id == git_blob_sha1(CONFIG) and infos["config.json"].lfs is None
    lfs = infos["model.safetensors"].lfs
    assert lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest() and lfs.size == len(WEIGHTS)
    assert infos["model.safetensors"].blob_id == git_blob_sha1(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs.sha256}\nsize {len(WEIGHTS)}\n".encode()
    )

    info = api.model_info("ORG/model", files_metadata=True)
    assert info.id == "Org/Model" and info.sha == repo and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "model.safetensors", "sub/dir/notes.txt"}
    assert siblings["model.safetensors"].lfs.sha256 == lfs.sha256
    assert api.model_info("Org/Model", revision=repo).sha == repo


# -- buckets -----------------------------------------------------------------------------------------


@pytest.fixture
def bucket(hub: HubEmulator) -> Path:
    return hub.add_bucket(
        "ns/cache",
        {"foo/a.bin": b"a" * 10, "foo/sub/b.bin": b"b" * 20, "foo.sample/c.bin": b"c" * 30, "top.txt": b"top"},
    )


def test_list_bucket_tree(hub: HubEmulator, bucket: Path) -> None:
    api = HfApi()
    root = {(e.path, e.type) for e in api.list_bucket_tree("ns/cache")}
    assert root == {("foo", "directory"), ("foo.sample", "directory"), ("top.txt", "file")}
    everything = {e.path for e in api.list_bucket_tree("ns/cache", recursive=True)}
    assert everything == {"foo/a.bin", "foo/sub/b.bin", "foo.sample/c.bin", "top.txt"}
    # Whole-component prefixes: "foo" must not match "foo.sample".
    assert {e.path for e in api.list_bucket_tree("ns/cache", prefix="foo", recursive=True)} == {
        "foo/a.bin",
        "foo/sub/b.bin",
    }
    assert {(e.path, e.type) for e in api.list_bucket_tree("ns/cache", prefix="foo")} == {
        ("foo/a.bin", "file"),
        ("foo/sub", "directory"),
    }
    assert list(api.list_bucket_tree("ns/cache", prefix="fo", recursive=True)) == []

    # Files written straight into the directory are seen at once, with a fresh (xet) hash.
    (bucket / "foo" / "a.bin").write_bytes(b"new content")
    (entry,) = api.list_bucket_tree("ns/cache", prefix="foo/a.bin")
    assert entry.size == 11 and entry.xet_hash == hf_xet.hash_files([str(bucket / "foo" / "a.bin")])[0].hash


def test_bucket_tree_paginates(hub: HubEmulator, bucket: Path) -> None:
    hub.page_size = 1
    assert len(list(HfApi().list_bucket_tree("ns/cache", recursive=True))) == 4
    assert len(hub.requests("/api/buckets/ns/cache/tree", method="GET")) == 4


def test_bucket_paths_info_and_info(hub: HubEmulator, bucket: Path) -> None:
    api = HfApi()
    infos = list(api.get_bucket_paths_info("ns/cache", ["top.txt", "foo/sub/b.bin", "missing", "foo"]))
    assert {(i.path, i.size) for i in infos} == {("top.txt", 3), ("foo/sub/b.bin", 20)}
    assert all(i.mtime is not None and i.xet_hash for i in infos)
    info = api.bucket_info("NS/Cache")
    assert (info.id, info.size, info.total_files, info.private) == ("ns/cache", 63, 4, False)


def test_hffilesystem_reads_bucket_range(hub: HubEmulator) -> None:
    data = os.urandom(300_000)
    hub.add_bucket("ns/fs", {"dir/blob.bin": data})
    fs = HfFileSystem()
    assert fs.size("hf://buckets/ns/fs/dir/blob.bin") == len(data)
    with fs.open("hf://buckets/ns/fs/dir/blob.bin", "rb", block_size=4096) as f:
        f.seek(100_000)
        assert f.read(5000) == data[100_000:105_000]
    ranged = [r for r in hub.requests("/buckets/ns/fs/resolve/", method="GET") if r.range_header]
    assert ranged and all(r.status == 206 for r in ranged)


def test_listing_override_injects_hostile_names(hub: HubEmulator, bucket: Path) -> None:
    hostile = [
        {"type": "file", "path": "../escape.bin", "size": 1, "xetHash": "0" * 64},
        {"type": "file", "path": "foo/../../etc/passwd", "size": 1, "xetHash": "0" * 64},
    ]
    hub.add_listing_override("ns/cache", hostile)
    api = HfApi()
    assert "../escape.bin" in {e.path for e in api.list_bucket_tree("ns/cache")}
    assert "foo/../../etc/passwd" in {e.path for e in api.list_bucket_tree("ns/cache", prefix="foo")}
    response = get_session().get(f"{hub.url}/buckets/ns/cache/resolve/..%2Fescape.bin")
    assert response.status_code == 404  # listed but never served


# -- HTTP semantics ----------------------------------------------------------------------------------


def test_range_requests(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/model.safetensors"
    session, size = get_session(), len(WEIGHTS)
    r = session.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == WEIGHTS[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{size}"
    r = session.get(url, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == WEIGHTS[100:]
    r = session.get(url, headers={"Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == WEIGHTS[-7:]
    r = session.get(url, headers={"Range": f"bytes={size - 5}-{size + 100}"})
    assert r.status_code == 206 and r.content == WEIGHTS[-5:]
    r = session.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
    head = session.head(url)
    assert head.headers["Content-Length"] == str(size) and head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["X-Repo-Commit"] == repo
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert head.headers["X-Xet-Hash"]  # the emulator speaks xet by default
    hub.xet = False
    assert not any(k.lower().startswith("x-xet") for k in session.head(url).headers)


def test_redirect_lfs(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hub.redirect_lfs = True
    head = get_session().head(f"{hub.url}/org/model/resolve/main/model.safetensors", follow_redirects=False)
    assert head.status_code == 302 and head.headers["Location"].startswith(hub.cdn_url + "/lfs/")
    assert head.headers["X-Linked-Size"] == str(len(WEIGHTS)) and head.headers["X-Repo-Commit"] == repo
    path = hf_hub_download("org/model", "model.safetensors", cache_dir=hf_cache)
    assert Path(path).read_bytes() == WEIGHTS
    assert [r.status for r in hub.requests("/lfs/", method="GET")] == [200]
    assert hub.bytes_served("/lfs/") == len(WEIGHTS)
    # Regular files are never redirected.
    assert Path(hf_hub_download("org/model", "config.json", cache_dir=hf_cache)).read_bytes() == CONFIG
    assert not hub.requests("/lfs/models/Org/Model/", method="HEAD")


def test_misc_routes(hub: HubEmulator) -> None:
    session = get_session()
    assert session.get(f"{hub.url}/api/agent-harnesses").json() == {"standardEnvVars": [], "harnesses": {}}
    r = session.get(f"{hub.url}/api/nothing/here")
    assert r.status_code == 404 and "error" in r.json()


# -- errors ------------------------------------------------------------------------------------------


def test_error_mapping(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("Org/Missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("Org/Missing", "config.json", cache_dir=hf_cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("Org/Model", "config.json", revision="nope", cache_dir=hf_cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("Org/Model", revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("Org/Model", "missing.json", cache_dir=hf_cache)
    with pytest.raises(BucketNotFoundError):
        api.bucket_info("ns/missing")
    with pytest.raises(BucketNotFoundError):
        list(api.list_bucket_tree("ns/missing"))


def test_gated_repo(hub: HubEmulator, repo: str, hf_cache: Path, hub_token: str) -> None:
    hub.set_gated("org/model", True)
    assert HfApi().model_info("Org/Model").gated == "manual"  # info stays public
    with pytest.raises(GatedRepoError):
        hf_hub_download("Org/Model", "config.json", cache_dir=hf_cache)
    with pytest.raises(GatedRepoError):
        hf_hub_download("Org/Model", "config.json", cache_dir=hf_cache, token="hf_wrong")
    path = hf_hub_download("Org/Model", "config.json", cache_dir=hf_cache, token=hub_token)
    assert Path(path).read_bytes() == CONFIG


# -- faults ------------------------------------------------------------------------------------------


def test_fault_503_then_retry(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hub.faults.add("*/resolve/*/config.json", "status", status=503, count=1)
    assert Path(hf_hub_download("Org/Model", "config.json", cache_dir=hf_cache)).read_bytes() == CONFIG
    assert [r.status for r in hub.requests("config.json", method="HEAD")] == [503, 200]
    assert [rule.fired for rule in hub.faults.rules()] == [1]
    hub.faults.add("*/tree/*", "status", status=503, count=1)
    assert len(list(HfApi().list_repo_tree("Org/Model"))) == 3
    assert [r.status for r in hub.requests("/tree/")] == [503, 200]


def test_fault_429_retry_after(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hub.faults.add("*/model.safetensors", "status", status=429, retry_after=0, count=1, methods=["GET"])
    assert Path(hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)).read_bytes() == WEIGHTS
    first, second = hub.requests("model.safetensors", method="GET")
    assert first.status == 429 and first.fault == "status" and second.status == 200
    assert second.time - first.time >= 0.9  # the client honoured Retry-After (+1 s margin of its own)


def test_fault_reset_and_truncate_break_the_transfer(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/model.safetensors"
    for kind in ("reset", "truncate"):
        hub.faults.add("*/model.safetensors", kind, count=1)
        with pytest.raises(httpx2.TransportError):
            get_session().get(url)
        # HEAD requests never consume body faults, and the next GET is clean again.
        assert get_session().head(url).status_code == 200
        assert get_session().get(url).content == WEIGHTS


def test_fault_truncate_retried_by_hf_hub_download(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hub.faults.add("*/model.safetensors", "truncate", count=1)
    assert Path(hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)).read_bytes() == WEIGHTS
    # The client retries (a small file restarts from 0: nothing reached its 10 MiB chunk buffer).
    gets = hub.requests("model.safetensors", method="GET")
    assert [r.fault for r in gets] == ["truncate", None]
    assert [r.bytes_sent for r in gets] == [len(WEIGHTS) // 2, len(WEIGHTS)]


def test_fault_corrupt(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hub.faults.add("*/model.safetensors", "corrupt", count=1)
    data = Path(hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)).read_bytes()
    assert len(data) == len(WEIGHTS) and data != WEIGHTS  # the client does not verify: poison


def test_fault_latency_and_stall(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/config.json"
    hub.faults.add("*/config.json", "latency", seconds=0.3, count=1)
    start = time.monotonic()
    assert get_session().get(url).content == CONFIG
    assert time.monotonic() - start >= 0.3
    hub.faults.add("*/config.json", "stall", seconds=3, count=1)
    start = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        get_session().get(url, timeout=0.5)
    assert time.monotonic() - start < 2


def test_fault_blackhole_holds_the_connection_unread(hub: HubEmulator, repo: str) -> None:
    hub.faults.add("*/config.json", "blackhole", seconds=1.5, count=1)
    with socket.create_connection((urlsplit(hub.url).hostname, urlsplit(hub.url).port), timeout=0.5) as conn:
        conn.sendall(b"GET /Org/Model/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            conn.recv(1)  # accepted, never answered
        conn.settimeout(5)
        start = time.monotonic()
        assert conn.recv(1) == b""  # closed once the fault's seconds are over, still without a byte
        assert time.monotonic() - start < 2
    assert [(r.fault, r.method) for r in hub.requests("config.json")] == [("blackhole", "GET")]
    assert get_session().get(f"{hub.url}/Org/Model/resolve/main/config.json").content == CONFIG
    with pytest.raises(ValueError):
        hub.faults.add("*", "blackhole")  # unbounded: refused


def test_fault_trickle(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/model.safetensors"
    # A body slower than its time limit: headers at once, ~512 bytes a second, then the connection ends.
    hub.faults.add("*/model.safetensors", "trickle", rate_bps=512, seconds=1.5, count=1, methods=["GET"])
    start = time.monotonic()
    got = bytearray()
    with pytest.raises(httpx2.TransportError):
        with get_session().stream("GET", url, timeout=5) as response:
            assert response.status_code == 200 and time.monotonic() - start < 0.5
            for data in response.iter_raw():
                got += data
    assert 1.4 < time.monotonic() - start < 2.5
    assert 512 <= len(got) <= 1024 and bytes(got) == WEIGHTS[: len(got)]
    # Rate 0: headers, then silence.
    hub.faults.add("*/model.safetensors", "trickle", rate_bps=0, seconds=3, count=1, methods=["GET"])
    with get_session().stream("GET", url, timeout=0.5) as response:
        assert response.status_code == 200
        with pytest.raises(httpx2.ReadTimeout):
            response.read()
    # A body that fits its time is whole; HEAD passes through untouched.
    hub.faults.add("*/config.json", "trickle", rate_bps=100, seconds=5, count=1)
    config_url = f"{hub.url}/Org/Model/resolve/main/config.json"
    assert get_session().head(config_url).status_code == 200
    start = time.monotonic()
    assert get_session().get(config_url).content == CONFIG
    assert time.monotonic() - start >= 0.2
    assert [r.fault for r in hub.requests("config.json", method="GET")] == ["trickle"]


def test_fault_ignore_range(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/model.safetensors"
    hub.faults.add("*/model.safetensors", "ignore_range", count=1)
    assert get_session().get(url).content == WEIGHTS  # no Range: passes through, not counted
    full = get_session().get(url, headers={"Range": "bytes=100-199"})
    assert full.status_code == 200 and full.content == WEIGHTS  # as a proxy that drops Range
    ranged = get_session().get(url, headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206 and ranged.content == WEIGHTS[100:200]
    assert [r.fault for r in hub.requests("model.safetensors", method="GET")] == [None, "ignore_range", None]


def test_fault_rate_is_seeded(hub: HubEmulator, repo: str) -> None:
    url = f"{hub.url}/Org/Model/resolve/main/config.json"

    def statuses() -> list[int]:
        hub.faults.clear()
        hub.faults.seed(42)
        hub.faults.add("*/config.json", "status", status=500, rate=0.5, methods=["HEAD"])
        return [get_session().head(url).status_code for _ in range(20)]

    first = statuses()
    assert first == statuses() and {500, 200} == set(first)


# -- accounting and remote control -------------------------------------------------------------------


def test_bytes_served_accounting(hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)
    assert hub.bytes_served("model.safetensors") == len(WEIGHTS)
    assert hub.bytes_served() == len(WEIGHTS)  # HEAD and API bodies are not downloads
    hf_hub_download("Org/Model", "model.safetensors", cache_dir=hf_cache)  # cached: HEAD only
    assert hub.bytes_served() == len(WEIGHTS)
    hub.reset_stats()
    assert hub.bytes_served() == 0 and hub.requests() == []


def test_http_control_api(hub: HubEmulator, repo: str) -> None:
    client = EmulatorClient(hub.url)
    url = f"{hub.url}/Org/Model/resolve/main/config.json"
    client.faults_add("*/config.json", "status", status=500, count=1, methods=["GET"])
    assert get_session().get(url).status_code == 500
    assert get_session().get(url).content == CONFIG
    assert client.bytes_served("config.json") == len(CONFIG)
    assert [r.status for r in client.requests("config.json", method="GET")] == [500, 200]
    client.faults_add("*/config.json", "status", status=500)
    client.faults_clear()
    client.reset_stats()
    assert get_session().get(url).status_code == 200
    assert len(client.requests()) == 1


def test_state_persists_across_restart(hub: HubEmulator, repo: str) -> None:
    with HubEmulator(hub.root) as other:
        url = f"{other.url}/api/models/org/model"
        assert get_session().get(url).json()["sha"] == repo
    # Stopped means stopped, even for the client's pooled keep-alive connection.
    with pytest.raises(httpx2.TransportError):
        get_session().get(url)


# -- sample data and the command line ----------------------------------------------------------------


def test_sample_data(hub: HubEmulator, hf_cache: Path) -> None:
    from safetensors.numpy import load_file

    neff = build_neff_bucket(hub)
    api = HfApi()
    listed = {e.path: e.size for e in api.list_bucket_tree(neff["bucket_id"], recursive=True)}
    assert listed == neff["files"]
    for module in neff["complete"]:
        assert {f"{module}/model.neff", f"{module}/model.done"} <= set(listed)
    for module in neff["poisoned"]:
        assert f"{module}/model.log" in listed and f"{module}/model.neff" not in listed
    assert all(any(p.startswith(m + "/") and p.endswith(".lock") for p in listed) for m in neff["locked"])

    model = build_sharded_model_repo(hub)
    folder = Path(snapshot_download(model["repo_id"], cache_dir=hf_cache))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and folder.name == model["commit"]
    tensors = {name: t for shard in shards for name, t in load_file(folder / shard).items()}
    assert set(tensors) == set(index["weight_map"])
    assert sum(t.nbytes for t in tensors.values()) == index["metadata"]["total_size"]


def test_command_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hffs_neuron.testing.hub_emulator",
            "--root",
            str(tmp_path),
            "--sample",
            "--page-size",
            "3",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        r = get_session().get(f"{url}/api/buckets/aws-neuron/optimum-neuron-cache/tree", params={"recursive": True})
        assert r.status_code == 200 and len(r.json()) == 3 and 'rel="next"' in r.headers["Link"]
        assert get_session().get(f"{url}/api/models/hffs-test/tiny-sharded").json()["id"] == "HFFS-Test/Tiny-Sharded"
        assert [q.path for q in EmulatorClient(url).requests("/api/models/")] == ["/api/models/hffs-test/tiny-sharded"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
