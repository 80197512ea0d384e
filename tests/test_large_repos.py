"""Repos of any size (issue 31), through real hub-cache mounts over the emulator's real HTTP.

Opening one file of a 50,000-file dataset lists only that file's directory (request count from the
emulator's accounting); a Hub that pages 50 entries a second still serves a file whose directory takes
longer than `--timeout` to list, and a whole walk; `snapshot_download` offline over the mount, which
reads `trees/<commit>.json` (the one whole-snapshot listing), finds every file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.remote import HubHttp, HubRepo
from hffs_neuron.testing.hub_emulator import HubEmulator

PER_DIR = 1000


def dataset(count: int, per_dir: int = PER_DIR) -> dict[str, str]:
    """`count` small JSON rows, `per_dir` to a directory, as a `datasets` repo lays them out."""
    files = {f"data/part-{i // per_dir:03d}/row-{i:06d}.json": json.dumps({"row": i}) for i in range(count)}
    files["README.md"] = "# rows\n"
    return files


def snapshot_of(mountpoint: str, folder: str) -> Path:
    repo = Path(mountpoint) / folder
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def walk(root: Path) -> dict[str, int]:
    """Every file below `root` with its size (through the symlink, as loaders see it)."""
    return {
        os.path.relpath(os.path.join(top, name), root): os.stat(os.path.join(top, name)).st_size
        for top, _dirs, names in os.walk(root)
        for name in names
    }


def tree_requests(hub: HubEmulator) -> list[str]:
    return [f"{r.path}?{r.query}" for r in hub.requests("/tree/")]


@pytest.mark.timeout(120)
def test_first_file_of_a_50000_file_dataset_lists_only_its_directory(hub: HubEmulator, mounts: Mounts) -> None:
    files = dataset(50_000)
    hub.add_repo("Org/Rows", files, repo_type="dataset")
    hub.page_size = 250  # the file's directory arrives in 4 pages
    snapshot = snapshot_of(mounts("hub-cache").mountpoint, "datasets--Org--Rows")
    hub.reset_stats()

    name = "data/part-031/row-031416.json"
    assert (snapshot / name).read_text() == files[name]
    listings = tree_requests(hub)
    assert len(listings) == 4, listings
    assert all("/tree/" in r and r.split("?")[0].endswith("/data/part-031") for r in listings), listings
    assert not [r for r in listings if "recursive=true" in r]
    # Directories on the way are asked one by one (paths-info), never by listing their parents.
    assert len(hub.requests("/paths-info/")) <= 3
    assert len(hub.requests("/api/")) <= 4 + 3

    # Every file of the listed directory shows with its final size, from that listing alone, before a
    # byte of any other file is fetched.
    sizes = {n: os.stat(snapshot / "data/part-031" / n).st_size for n in os.listdir(snapshot / "data/part-031")}
    assert len(sizes) == PER_DIR
    assert all(size == len(files[f"data/part-031/{n}"]) for n, size in sizes.items())
    assert len(tree_requests(hub)) == 4
    # The entries' own attributes (what readdirplus handed the kernel with the names) are the symlinks'.
    links = [snapshot / "data/part-031" / n for n in sorted(sizes)[:50]]
    assert all(os.lstat(p).st_size == len(os.readlink(p)) and os.path.islink(p) for p in links)
    assert [r.path for r in hub.requests("/resolve/")] == [r.path for r in hub.requests(name.split("/")[-1])]


@pytest.mark.timeout(120)
def test_a_hub_paging_50_entries_a_second_serves_a_file_and_a_whole_walk(hub: HubEmulator, mounts: Mounts) -> None:
    """Each page has its own deadline: a directory of 6 pages (6 s) lists under `--timeout 5`."""
    files = {f"big/row-{i:04d}.json": json.dumps({"row": i}) for i in range(300)}
    files.update({f"small/row-{i:04d}.json": json.dumps({"row": i}) for i in range(60)})
    files["README.md"] = "# slow\n"
    hub.add_repo("Org/Slow", files, repo_type="dataset")
    snapshot = snapshot_of(mounts("hub-cache", timeout=5).mountpoint, "datasets--Org--Slow")
    hub.page_size, hub.page_latency_s = 50, 1.0
    hub.reset_stats()

    started = time.monotonic()
    assert (snapshot / "big/row-0123.json").read_text() == files["big/row-0123.json"]
    assert time.monotonic() - started > 5  # longer than --timeout: only per-page deadlines allow it
    assert len(tree_requests(hub)) == 6

    assert walk(snapshot) == {path: len(data) for path, data in files.items()}
    # The walk listed the root and `small` (2 pages); `big` was held from the first read.
    assert len(tree_requests(hub)) == 6 + 1 + 2
    assert not [r for r in tree_requests(hub) if "recursive=true" in r]


@pytest.mark.timeout(120)
def test_a_neff_version_directory_paged_slowly_lists_under_a_shorter_timeout(hub: HubEmulator, mounts: Mounts) -> None:
    """Buckets too: a version directory of 250 modules in 5 pages of 1 s each lists under `--timeout 4`."""
    from hffs_neuron.testing.sample_data import COMPILER_VERSIONS

    version = COMPILER_VERSIONS[0]
    modules = [f"MODULE_{i:020d}+{i:08x}" for i in range(250)]
    hub.add_bucket("org/slow-neff", {f"{version}/{m}/model.done": b"" for m in modules})
    node = Path(mounts("neff", "org/slow-neff", timeout=4).mountpoint)
    hub.page_size, hub.page_latency_s = 50, 1.0
    started = time.monotonic()
    assert sorted(os.listdir(node / version)) == modules
    assert time.monotonic() - started > 4  # longer than --timeout: only per-page deadlines allow it
    assert len([r for r in tree_requests(hub) if version in r]) == 5


CLIENT = r"""
import os, sys
from huggingface_hub import snapshot_download
root = snapshot_download(sys.argv[1], repo_type="dataset")
print(sum(len(names) for _top, _dirs, names in os.walk(root)))
"""


@pytest.mark.timeout(120)
def test_snapshot_download_offline_over_the_mount_finds_every_file(hub: HubEmulator, mounts: Mounts) -> None:
    files = dataset(5_000)
    hub.add_repo("Org/Offline", files, repo_type="dataset")
    mountpoint = mounts("hub-cache").mountpoint
    hub.reset_stats()
    env = dict(os.environ, HF_HUB_CACHE=mountpoint, HF_HUB_OFFLINE="1")
    env.pop("HF_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, "Org/Offline"], env=env, capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) == len(files)
    # trees/<commit>.json is the one whole listing: recursive, streamed once (6 pages of 1,000).
    listings = tree_requests(hub)
    assert len(listings) == 6 and all("recursive=true" in r for r in listings), listings
    assert not hub.requests("/resolve/")  # offline clients read nothing to find their files
    # `blobs/` shows every file's blob with its size, from that same listing.
    blobs = Path(mountpoint) / "datasets--Org--Offline" / "blobs"
    sizes = sorted(os.stat(blobs / name).st_size for name in os.listdir(blobs))
    assert sizes == sorted(len(data) for data in files.values())
    assert len(tree_requests(hub)) == 6


def test_one_recursive_listing_fills_every_directory(hub: HubEmulator) -> None:
    """`files()` (the whole tree, e.g. for trees/<commit>.json) leaves every directory's listing held,
    directories the listing leaves out included: a walk after it asks nothing more."""
    hub.add_repo("Org/Tree", {"x/y/z.txt": "1", "top.txt": "2", "x/w.txt": "3"})
    implied = {"type": "file", "path": "only/implied/f.txt", "oid": "1" * 40, "size": 1}
    hub.add_listing_override("Org/Tree", [implied], repo_type="model")
    http = HubHttp(hub.url, "", operation_timeout=10)
    try:
        repo = HubRepo(http, "model", "Org/Tree")
        assert sorted(e.path for e in repo.files()) == ["only/implied/f.txt", "top.txt", "x/w.txt", "x/y/z.txt"]
        listed = len(tree_requests(hub))
        shown = {d: sorted((e.name, e.is_dir) for e in repo.list(d)) for d in ("", "x", "x/y", "only", "only/implied")}
        assert shown == {
            "": [("only", True), ("top.txt", False), ("x", True)],
            "x": [("w.txt", False), ("y", True)],
            "x/y": [("z.txt", False)],
            "only": [("implied", True)],
            "only/implied": [("f.txt", False)],
        }
        assert len(tree_requests(hub)) == listed
    finally:
        http.close()
