"""Impossible sizes (issue 24): a size from a bucket listing, a repo tree or the bucket event feed that is
not an integer in [0, 2^50) drops its entry, with one log line naming the path; the rest is served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub._bucket_live_follow import BucketFileChange

from hffs_neuron.errors import RemoteNotFound
from hffs_neuron.remote import Bucket, HubHttp, HubRepo
from hffs_neuron.store.blobstore import BlobStore
from hffs_neuron.store.metacache import MetadataCache
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.views.neff import NeffView
from hffs_neuron.views.neff_follow import EventFollow

MODULE = "neuronxcc-1/MODULE_a"
IMPOSSIBLE = {"negative.neff": -1, "huge.neff": 2**60, "text.neff": "abc", "bool.neff": True, "float.neff": 1.5}
XET_HASH = "ab" * 32


@pytest.fixture
def http(hub: HubEmulator) -> Iterator[HubHttp]:
    client = HubHttp(hub.url, "", operation_timeout=8)
    yield client
    client.close()


def dropped_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


def test_bucket_listing_drops_impossible_sizes_once(
    hub: HubEmulator, http: HubHttp, caplog: pytest.LogCaptureFixture
) -> None:
    hub.add_bucket("org/sizes", {f"{MODULE}/model.neff": b"NEFF"})
    largest = {"type": "file", "path": f"{MODULE}/largest.neff", "size": 2**50 - 1, "xetHash": XET_HASH}
    hub.add_listing_override(
        "org/sizes",
        [{"type": "file", "path": f"{MODULE}/{n}", "size": s, "xetHash": XET_HASH} for n, s in IMPOSSIBLE.items()]
        + [largest],
    )
    bucket = Bucket(http, "org/sizes")
    with caplog.at_level(logging.WARNING, logger="hffs_neuron"):
        for _ in range(2):  # a listing reloaded after its TTL logs nothing new
            listed = {e.name: e.size for e in bucket.list(MODULE)}
            assert listed == {"model.neff": 4, "largest.neff": 2**50 - 1}
        for name in IMPOSSIBLE:
            assert len(dropped_lines(caplog, f"{MODULE}/{name}")) == 1, name
            with pytest.raises(RemoteNotFound):  # paths-info of it: dropped as well
                bucket.stat(f"{MODULE}/{name}")


def test_repo_tree_drops_impossible_sizes(hub: HubEmulator, http: HubHttp, caplog: pytest.LogCaptureFixture) -> None:
    hub.add_repo("Org/Sizes", {"config.json": b"{}"})
    items = [{"type": "file", "path": n, "oid": "1" * 40, "size": s} for n, s in IMPOSSIBLE.items()]
    items.append({"type": "file", "path": "lfs.bin", "oid": "2" * 40, "size": 10, "lfs": {"oid": "3" * 64, "size": -5}})
    hub.add_listing_override("Org/Sizes", items, repo_type="model")
    with caplog.at_level(logging.WARNING, logger="hffs_neuron"):
        repo = HubRepo(http, "model", "Org/Sizes")
        assert [e.path for e in repo.files()] == ["config.json"]
    for name in [*IMPOSSIBLE, "lfs.bin"]:
        assert len(dropped_lines(caplog, f"'{name}'")) == 1, name


def test_event_with_impossible_size_is_dropped(
    hub: HubEmulator, http: HubHttp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes as the feed delivers them to the follower (huggingface_hub passes sizes through as sent)."""
    hub.add_bucket("org/feed", {f"{MODULE}/model.neff": b"NEFF"})
    store = BlobStore(tmp_path / "blobs")
    view = NeffView(Bucket(http, "org/feed"), store, MetadataCache(), tmp_path / "layer")
    follow = EventFollow(view, view.remote, hub.url, lambda _path: None)
    try:
        assert set(dict(view.readdir(MODULE))) == {"model.neff"}
        changes = [BucketFileChange(f"{MODULE}/{n}", "add", size=s, xet_hash=XET_HASH) for n, s in IMPOSSIBLE.items()]
        changes.append(BucketFileChange(f"{MODULE}/model.done", "add", size=0, xet_hash="0" * 64))
        with caplog.at_level(logging.WARNING, logger="hffs_neuron"):
            follow._on_changes(changes)
        assert set(dict(view.readdir(MODULE))) == {"model.neff", "model.done"}
        for name in IMPOSSIBLE:
            assert len(dropped_lines(caplog, f"{MODULE}/{name}")) == 1, name
    finally:
        follow.close()
        view.close()
        store.close()
