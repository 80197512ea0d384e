"""The emulator speaking Xet, exercised end to end with the real huggingface_hub and hf_xet clients:
downloads of repo and bucket files through the CAS, bucket writes through ``batch_bucket_files``,
tokens, ranges, faults and accounting on CAS routes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import hf_xet
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import BucketBatchError, HfHubHTTPError
from huggingface_hub.utils import get_session

from hffs_neuron.testing.hub_emulator import HubEmulator

CONFIG = b'{"model_type": "llama"}'
# Random bytes then a long run of one byte: several chunks, some compressible.
WEIGHTS = os.urandom(3_000_000) + b"w" * 1_500_000


@pytest.fixture
def xet_hub(hub: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> HubEmulator:
    """The session emulator with Xet on, and huggingface_hub in this process using hf_xet."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub.xet = True
    return hub


@pytest.fixture
def repo(xet_hub: HubEmulator) -> str:
    return xet_hub.add_repo("Org/XetModel", {"config.json": CONFIG, "model.safetensors": WEIGHTS})


def _xet_hash(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "hash-me"
    path.write_bytes(data)
    return hf_xet.hash_files([str(path)])[0].hash


def _cas_get(hub: HubEmulator, route: str, token: str | None, **headers: str):  # noqa: ANN202
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return get_session().get(f"{hub.url}{route}", headers=headers)


# -- downloads ---------------------------------------------------------------------------------------


def test_hf_hub_download_takes_the_xet_path(xet_hub: HubEmulator, repo: str, hf_cache: Path, tmp_path: Path) -> None:
    weights_hash = _xet_hash(WEIGHTS, tmp_path)
    head = get_session().head(f"{xet_hub.url}/Org/XetModel/resolve/main/model.safetensors")
    assert head.headers["X-Xet-Hash"] == weights_hash
    assert head.links["xet-auth"]["url"] == f"{xet_hub.url}/api/models/Org/XetModel/xet-read-token/{repo}"
    assert "X-Xet-Hash" not in get_session().head(f"{xet_hub.url}/Org/XetModel/resolve/main/config.json").headers

    weights = hf_hub_download("Org/XetModel", "model.safetensors", cache_dir=hf_cache)
    config = hf_hub_download("Org/XetModel", "config.json", cache_dir=hf_cache)
    assert Path(weights).read_bytes() == WEIGHTS and Path(config).read_bytes() == CONFIG
    # The LFS file came through the CAS (xorb ranges), not resolve; the regular file over HTTP.
    cas_bytes = xet_hub.bytes_served(weights_hash)
    assert 0 < cas_bytes <= len(WEIGHTS) + 4096
    assert xet_hub.bytes_served("model.safetensors") == 0
    assert xet_hub.bytes_served("config.json") == len(CONFIG)
    # One transfer per blob: a second download is served from the cache.
    hf_hub_download("Org/XetModel", "model.safetensors", cache_dir=hf_cache)
    assert xet_hub.bytes_served(weights_hash) == cas_bytes


def test_snapshot_download_and_listings(xet_hub: HubEmulator, repo: str, hf_cache: Path, tmp_path: Path) -> None:
    folder = Path(snapshot_download("Org/XetModel", cache_dir=hf_cache))
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "config.json").read_bytes() == CONFIG
    files = {f.path: f for f in HfApi().list_repo_tree("Org/XetModel", recursive=True)}
    weights_hash = _xet_hash(WEIGHTS, tmp_path)
    assert files["model.safetensors"].xet_hash == weights_hash
    assert files["config.json"].xet_hash is None  # a regular git file
    # huggingface_hub 2.4 with xet keeps xet files once per cache, in its shared blob store.
    shared = hf_cache / "blobs" / weights_hash[:2] / weights_hash
    assert (hf_cache / "blobs" / ".huggingface-shared-blobs").exists() and shared.read_bytes() == WEIGHTS
    repo_blob = hf_cache / "models--Org--XetModel" / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    assert os.readlink(repo_blob) == f"../../blobs/{weights_hash[:2]}/{weights_hash}"


def test_gated_repo_token(xet_hub: HubEmulator, hub_token: str, hf_cache: Path) -> None:
    xet_hub.add_repo("Org/Gated", {"model.safetensors": WEIGHTS}, gated=True)
    route = "/api/models/Org/Gated/xet-read-token/main"
    assert _cas_get(xet_hub, route, None).status_code == 403
    granted = _cas_get(xet_hub, route, hub_token)
    assert granted.status_code == 200
    body = granted.json()
    assert body["casUrl"] == xet_hub.url and granted.headers["X-Xet-Access-Token"] == body["accessToken"]
    path = hf_hub_download("Org/Gated", "model.safetensors", cache_dir=hf_cache, token=hub_token)
    assert Path(path).read_bytes() == WEIGHTS


def test_cas_tokens_and_reconstruction_ranges(xet_hub: HubEmulator, repo: str, hf_cache: Path, tmp_path: Path) -> None:
    file_hash = _xet_hash(WEIGHTS, tmp_path)
    hf_hub_download("Org/XetModel", "model.safetensors", cache_dir=hf_cache)  # converts it
    route = f"/v1/reconstructions/{file_hash}"
    assert _cas_get(xet_hub, route, None).status_code == 401
    assert _cas_get(xet_hub, route, "xet_forged").status_code == 401
    read = _cas_get(xet_hub, "/api/models/Org/XetModel/xet-read-token/main", None).json()["accessToken"]
    write_denied = get_session().post(
        f"{xet_hub.url}/v1/shards", content=b"x", headers={"Authorization": f"Bearer {read}"}
    )
    assert write_denied.status_code == 403

    whole = _cas_get(xet_hub, route, read).json()
    assert whole["offset_into_first_range"] == 0
    assert sum(t["unpacked_length"] for t in whole["terms"]) == len(WEIGHTS)
    first, last = 3_100_000, 3_200_000
    part = _cas_get(xet_hub, route, read, Range=f"bytes={first}-{last}").json()
    covered = sum(t["unpacked_length"] for t in part["terms"])
    assert part["offset_into_first_range"] + (last - first + 1) <= covered < len(WEIGHTS)
    for term in part["terms"]:
        [info] = [i for i in part["fetch_info"][term["hash"]] if i["range"] == term["range"]]  # no duplicates
        data = get_session().get(
            info["url"], headers={"Range": f"bytes={info['url_range']['start']}-{info['url_range']['end']}"}
        )
        assert data.status_code == 206
        assert len(data.content) == info["url_range"]["end"] - info["url_range"]["start"] + 1
    assert _cas_get(xet_hub, route, read, Range=f"bytes={len(WEIGHTS)}-").status_code == 416

    # v2 (what hf_xet 1.8 asks first): the same terms, one multi-range URL per xorb.
    v2 = _cas_get(xet_hub, f"/v2/reconstructions/{file_hash}", read, Range=f"bytes={first}-{last}").json()
    assert (v2["offset_into_first_range"], v2["terms"]) == (part["offset_into_first_range"], part["terms"])
    [fetch] = v2["xorbs"][part["terms"][0]["hash"]]
    single = [
        get_session().get(fetch["url"], headers={"Range": f"bytes={r['bytes']['start']}-{r['bytes']['end']}"}).content
        for r in fetch["ranges"]
    ]
    # A multi-range request is answered as multipart/byteranges, parts in order.
    spans = [(0, 9), (20, 29)]
    multi = get_session().get(fetch["url"], headers={"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in spans)})
    assert multi.status_code == 206
    boundary = multi.headers["Content-Type"].split("boundary=")[1]
    parts = multi.content.split(f"--{boundary}".encode())[1:-1]
    whole_xorb = get_session().get(fetch["url"]).content
    assert len(whole_xorb) >= sum(len(x) for x in single)
    for (a, b), raw in zip(spans, parts, strict=True):
        head, _, data = raw.partition(b"\r\n\r\n")
        assert f"Content-Range: bytes {a}-{b}/{len(whole_xorb)}".encode() in head
        assert data == whole_xorb[a : b + 1] + b"\r\n"
    # The global dedupe query always misses, which is a valid answer.
    assert _cas_get(xet_hub, "/v1/chunks/default/" + "0" * 64, read).status_code == 404


def test_faults_apply_to_cas_routes(xet_hub: HubEmulator, repo: str, hf_cache: Path) -> None:
    xet_hub.faults.add("/v1/xorb-data/*", "status", status=503, count=1)
    xet_hub.faults.add("/v1/xorb-data/*", "truncate", count=1)
    xet_hub.faults.add("/v*/reconstructions/*", "status", status=500, count=1)
    path = hf_hub_download("Org/XetModel", "model.safetensors", cache_dir=hf_cache)
    assert Path(path).read_bytes() == WEIGHTS
    assert 503 in [r.status for r in xet_hub.requests("/v1/xorb-data/")]
    assert "truncate" in [r.fault for r in xet_hub.requests("/v1/xorb-data/")]
    assert 500 in [r.status for r in xet_hub.requests("/reconstructions/")]


def test_no_xet_serves_plain_http(hub: HubEmulator, hf_cache: Path) -> None:
    hub.xet = False  # what --no-xet / HubEmulator(xet=False) serve
    hub.add_repo("Org/Plain", {"model.safetensors": WEIGHTS})
    head = get_session().head(f"{hub.url}/Org/Plain/resolve/main/model.safetensors")
    assert head.status_code == 200 and "X-Xet-Hash" not in head.headers
    assert get_session().get(f"{hub.url}/api/models/Org/Plain/xet-read-token/main").status_code == 404
    assert get_session().get(f"{hub.url}/v1/reconstructions/{'1' * 64}").status_code == 404


# -- buckets -----------------------------------------------------------------------------------------


def test_bucket_writes_through_batch(xet_hub: HubEmulator, tmp_path: Path) -> None:
    api = HfApi()
    api.create_bucket("team/written")
    with pytest.raises(HfHubHTTPError):
        api.create_bucket("team/written")
    api.create_bucket("team/written", exist_ok=True)
    local = tmp_path / "neff.bin"
    local.write_bytes(WEIGHTS)
    api.batch_bucket_files(
        "team/written", add=[(str(local), "mod/model.neff"), (b"done", "mod/model.done"), (b"", "mod/empty")]
    )
    directory = xet_hub.bucket_dir("team/written")
    assert (directory / "mod/model.neff").read_bytes() == WEIGHTS
    assert (directory / "mod/model.done").read_bytes() == b"done"
    assert (directory / "mod/empty").read_bytes() == b""
    listed = {f.path: f for f in api.list_bucket_tree("team/written", recursive=True)}
    assert set(listed) == {"mod/model.neff", "mod/model.done", "mod/empty"}
    assert listed["mod/model.neff"].xet_hash == hf_xet.hash_files([str(local)])[0].hash

    api.batch_bucket_files(
        "team/written",
        copy=[("bucket", "team/written", listed["mod/model.neff"].xet_hash, "copy/model.neff")],
        delete=["mod/model.done"],
    )
    assert (directory / "copy/model.neff").read_bytes() == WEIGHTS
    assert not (directory / "mod/model.done").exists()
    with pytest.raises(BucketBatchError):
        api.batch_bucket_files("team/written", copy=[("bucket", "team/written", "ab" * 32, "nope")])

    out = tmp_path / "out"
    api.download_bucket_files(
        "team/written", files=[("copy/model.neff", str(out / "a")), ("mod/empty", str(out / "e"))]
    )
    assert (out / "a").read_bytes() == WEIGHTS and (out / "e").read_bytes() == b""


def test_placed_bucket_files_download_through_xet(xet_hub: HubEmulator, tmp_path: Path) -> None:
    directory = xet_hub.add_bucket("org/placed", {"a/first.bin": WEIGHTS})
    (directory / "late.bin").write_bytes(WEIGHTS[::-1])  # written after start: converted on demand
    head = get_session().head(f"{xet_hub.url}/buckets/org/placed/resolve/late.bin")
    assert head.links["xet-auth"]["url"] == f"{xet_hub.url}/api/buckets/org/placed/xet-read-token"
    out = tmp_path / "out"
    HfApi().download_bucket_files(
        "org/placed", files=[("a/first.bin", str(out / "first")), ("late.bin", str(out / "late"))]
    )
    assert (out / "first").read_bytes() == WEIGHTS and (out / "late").read_bytes() == WEIGHTS[::-1]
    assert xet_hub.bytes_served(head.headers["X-Xet-Hash"]) > 0
    assert xet_hub.bytes_served("/resolve/") == 0


def test_cas_survives_restart(xet_hub: HubEmulator, repo: str, hf_cache: Path, tmp_path: Path) -> None:
    hf_hub_download("Org/XetModel", "model.safetensors", cache_dir=hf_cache)
    file_hash = _xet_hash(WEIGHTS, tmp_path)
    with HubEmulator(xet_hub.root, xet=True) as other:
        grant = other.cas.issue_token("read")
        answer = _cas_get(other, f"/v1/reconstructions/{file_hash}", str(grant["accessToken"]))
        assert answer.status_code == 200
        assert sum(t["unpacked_length"] for t in answer.json()["terms"]) == len(WEIGHTS)


def test_short_lived_tokens_are_refreshed(xet_hub: HubEmulator, tmp_path: Path) -> None:
    # Tokens that expire at once: hf_xet must go back to the Hub's token route during the download.
    with HubEmulator(tmp_path / "hub", xet_token_ttl=1) as short:
        short.add_repo("Org/Short", {"model.safetensors": WEIGHTS})
        path = hf_hub_download("Org/Short", "model.safetensors", cache_dir=tmp_path / "c", endpoint=short.url)
        assert Path(path).read_bytes() == WEIGHTS
        assert len(short.requests("/xet-read-token/")) >= 2


def test_prepare_xet_converts_everything_up_front(xet_hub: HubEmulator, hf_cache: Path, tmp_path: Path) -> None:
    fresh = [os.urandom(200_000) for _ in range(3)]
    xet_hub.add_repo("Org/Fresh", {"a.safetensors": fresh[0], "small.json": b"{}"})
    xet_hub.add_bucket("org/fresh", {"x/b.neff": fresh[1], "c.bin": fresh[2], "empty": b""})
    hashes = [_xet_hash(data, tmp_path) for data in fresh]
    assert not any(xet_hub.cas.has_file(h) for h in hashes)
    assert xet_hub.prepare_xet() == 3  # the LFS file and the two non-empty bucket files
    assert all(xet_hub.cas.has_file(h) for h in hashes)
    assert xet_hub.prepare_xet() == 0
    path = hf_hub_download("Org/Fresh", "a.safetensors", cache_dir=hf_cache)
    assert Path(path).read_bytes() == fresh[0]


@pytest.mark.parametrize("flag", ["--xet", "--no-xet"])
def test_command_line_switch(tmp_path: Path, flag: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hffs_neuron.testing.hub_emulator", "--root", str(tmp_path), "--sample", flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[1]
        files = get_session().get(f"{url}/api/models/hffs-test/tiny-sharded/tree/main").json()
        weights = next(f["path"] for f in files if f["path"].endswith(".safetensors"))
        head = get_session().head(f"{url}/hffs-test/tiny-sharded/resolve/main/{weights}")
        assert head.status_code == 200 and ("X-Xet-Hash" in head.headers) == (flag == "--xet")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
