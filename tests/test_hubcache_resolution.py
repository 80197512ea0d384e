"""Hub-cache view: what it asks the Hub, how often, and whose access it relies on.

- commits resolved while other callers list `trees/`, `refs/`, `snapshots/` and `blobs/`: never EIO;
- huggingface_hub's own temp names are never looked up as revisions (a real tag ending in `.tmp` is);
- a blob of a gated repo is served only to a mount whose own token has access, whether the bytes are
  in the blob store shared with another mount or in a shared backing directory;
- lookups of unknown names are bounded per mount: over the bound EAGAIN, at once, and not remembered.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.errors import Throttled
from hffs_neuron.remote import AdmissionLimiter
from hffs_neuron.testing.hub_emulator import HubEmulator

# -- concurrent resolution and listing ---------------------------------------------------------------

RESOLVER = r"""
import os, random, sys
repo, commits = sys.argv[1], sys.argv[2].split(",")
random.shuffle(commits)
for commit in commits:
    os.stat(os.path.join(repo, "snapshots", commit))
"""

LISTER = r"""
import os, sys
repo, total = sys.argv[1], int(sys.argv[2])
for _ in range(2000):
    trees = os.listdir(os.path.join(repo, "trees"))
    for sub in ("refs", "snapshots", "blobs"):
        os.listdir(os.path.join(repo, sub))
    if len(trees) == total:
        break
print(len(trees))
"""


@pytest.mark.timeout(240)
def test_listing_while_commits_are_resolved_never_fails(hub: HubEmulator, mounts: Mounts) -> None:
    commits = [hub.add_repo("Org/Many", {f"file{i}.txt": f"{i}\n" for i in range(50)})]
    for n in range(30):
        commits.append(hub.add_repo("Org/Many", {f"extra/{n}.txt": f"extra {n}\n"}, parent="main"))
    handle = mounts("hub-cache", max_resolutions_per_s=0)
    repo = str(Path(handle.mountpoint) / "models--Org--Many")
    env = dict(os.environ)
    resolvers = [[sys.executable, "-c", RESOLVER, repo, ",".join(commits)] for _ in range(4)]
    listers = [[sys.executable, "-c", LISTER, repo, str(len(commits))] for _ in range(4)]
    run_parallel(resolvers + listers, env=env, timeout=180)  # each exits 0: no listing failed
    assert sorted(os.listdir(Path(repo) / "trees")) == sorted(f"{c}.json" for c in commits)
    for k in random.sample(range(len(commits)), 3):
        tree = json.loads((Path(repo) / "trees" / f"{commits[k]}.json").read_text())
        expected = {f"file{i}.txt" for i in range(50)} | {f"extra/{n}.txt" for n in range(k)}
        assert set(tree["files"]) == expected


# -- huggingface_hub's temp names --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_hf_temp_names_are_never_looked_up(hub: HubEmulator, mounts: Mounts) -> None:
    first = hub.add_repo("Org/Refs", {"config.json": b'{"v": 1}'})
    tag = hub.add_repo("Org/Refs", {"config.json": b'{"tag": 1}'}, revision="release.tmp", parent="main")
    handle = mounts("hub-cache")
    refs = Path(handle.mountpoint) / "models--Org--Refs" / "refs"
    assert (refs / "main").read_text() == first
    second = hub.add_repo("Org/Refs", {"config.json": b'{"v": 2}'}, parent="main")  # main moves on
    hub.reset_stats()

    # A real client (online) records the new commit of main: refs/main.<8 hex>.tmp, then a rename.
    script = (
        "from huggingface_hub import hf_hub_download; print(open(hf_hub_download('Org/Refs', 'config.json')).read())"
    )
    env = dict(os.environ, HF_HUB_CACHE=handle.mountpoint)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == '{"v": 2}'
    assert (refs / "main").read_text() == second
    for name in ("main.0123abcd.tmp", "v2.deadbeef.tmp", ".main.0123abcd.new", ".hidden"):
        with pytest.raises(FileNotFoundError):
            os.stat(refs / name)
    asked = [r.path for r in hub.requests("/revision/")]
    assert not [path for path in asked if not path.endswith(f"/revision/{second}")], asked

    # A tag that merely ends in ".tmp" is a revision like any other.
    assert (refs / "release.tmp").read_text() == tag
    with pytest.raises(FileNotFoundError):
        os.stat(refs / "nothing.tmp")
    asked = sorted(r.path.rsplit("/", 1)[-1] for r in hub.requests("/revision/") if r.path.endswith(".tmp"))
    assert asked == ["nothing.tmp", "release.tmp"]

    # The tree cache's temp file (tempfile.mkstemp(dir=trees, suffix=".tmp")) costs no request either.
    hub.reset_stats()
    with pytest.raises(FileNotFoundError):
        os.stat(refs.parent / "trees" / "tmpk2j3h4g5.tmp")
    assert hub.requests("/api/") == []


# -- gated content and this mount's own identity -----------------------------------------------------


def read_errno(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno
    return None


@pytest.mark.timeout(180)
def test_gated_blobs_need_this_mounts_own_access(
    hub: HubEmulator, mounts: Mounts, hub_token: str, tmp_path: Path
) -> None:
    weights = os.urandom(64 * 1024)
    commit = hub.add_repo("Org/Gated", {"config.json": b"{}", "model.safetensors": weights}, gated=True)
    etag = hashlib.sha256(weights).hexdigest()
    folder = "models--Org--Gated"

    for name in ("b1", "b2"):
        (tmp_path / name).mkdir()
    # Two mounts on one cache dir: the one with access fetches the blob into the shared store...
    authorized = mounts("hub-cache", name="auth", cache="shared", token=hub_token, backing=str(tmp_path / "b1"))
    assert (Path(authorized.mountpoint) / folder / "snapshots" / commit / "model.safetensors").read_bytes() == weights
    # ...the other, without a token, must not get it from there.
    anonymous = mounts("hub-cache", name="anon", cache="shared", backing=str(tmp_path / "b2"))
    repo = Path(anonymous.mountpoint) / folder
    assert read_errno(repo / "snapshots" / commit / "model.safetensors") == errno.EACCES
    assert read_errno(repo / "blobs" / etag) == errno.EACCES
    assert os.stat(repo / "blobs" / etag).st_size == len(weights)  # metadata stays public
    assert hub.bytes_served("/model.safetensors") == len(weights)  # one transfer, by the authorized mount

    # A shared backing directory that already holds the blob, as huggingface_hub leaves it.
    backing = tmp_path / "shared-backing" / folder
    (backing / "blobs").mkdir(parents=True)
    (backing / "blobs" / etag).write_bytes(weights)
    (backing / "snapshots" / commit).mkdir(parents=True)
    (backing / "snapshots" / commit / "model.safetensors").symlink_to(f"../../blobs/{etag}")
    (backing / "refs").mkdir()
    (backing / "refs" / "main").write_text(commit)
    shared = str(tmp_path / "shared-backing")
    outsider = mounts("hub-cache", name="outsider", cache="c3", backing=shared)
    repo = Path(outsider.mountpoint) / folder
    assert read_errno(repo / "snapshots" / commit / "model.safetensors") == errno.EACCES
    assert read_errno(repo / "blobs" / etag) == errno.EACCES
    insider = mounts("hub-cache", name="insider", cache="c4", backing=shared, token=hub_token)
    assert (Path(insider.mountpoint) / folder / "snapshots" / commit / "model.safetensors").read_bytes() == weights


@pytest.mark.timeout(120)
def test_public_blobs_in_a_shared_backing_are_served_without_a_token(
    hub: HubEmulator, mounts: Mounts, tmp_path: Path
) -> None:
    data = b"public bytes\n"
    commit = hub.add_repo("Org/Open", {"notes.txt": data})
    backing = tmp_path / "backing" / "models--Org--Open"
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    (backing / "blobs").mkdir(parents=True)
    (backing / "blobs" / blob).write_bytes(data)
    handle = mounts("hub-cache", backing=str(tmp_path / "backing"))
    hub.reset_stats()
    assert (Path(handle.mountpoint) / "models--Org--Open" / "snapshots" / commit / "notes.txt").read_bytes() == data
    assert hub.bytes_served() == 0  # served from the backing: no probe, no fetch


# -- bounded lookups ---------------------------------------------------------------------------------


def stat_errno(path: Path) -> int | None:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return None


@pytest.mark.timeout(120)
def test_a_burst_of_unknown_repo_lookups_is_bounded(hub: HubEmulator, mounts: Mounts) -> None:
    hub.add_repo("x/real", {"config.json": b"{}"})
    rate = 0.5  # one lookup, then one more every 2 s
    handle = mounts("hub-cache", max_resolutions_per_s=rate)
    root = Path(handle.mountpoint)
    hub.reset_stats()
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stat_errno, [root / f"models--x--{uuid.uuid4().hex}" for _ in range(100)]))
    real = stat_errno(root / "models--x--real")  # over the bound too: EAGAIN, not "not found"
    elapsed = time.monotonic() - started
    upstream = len(hub.requests("/api/models/x/"))
    assert upstream <= 1 + rate * elapsed, (upstream, elapsed)
    assert set(results) <= {errno.ENOENT, errno.EAGAIN}
    assert results.count(errno.EAGAIN) >= 100 - upstream
    if real == errno.EAGAIN:  # (unless 2 s passed: then it was looked up and found)
        time.sleep(1 / rate + 0.2)
    assert stat_errno(root / "models--x--real") is None  # the refusal was not remembered as a miss
    assert (root / "models--x--real" / "refs" / "main").exists()


def test_admission_limiter_bounds_concurrency_and_rate() -> None:
    limiter = AdmissionLimiter(rate=0, concurrency=2, what="lookups")
    with limiter.admit(), limiter.admit():
        with pytest.raises(Throttled, match="already in progress"), limiter.admit():
            pass
    with limiter.admit():  # slots come back
        pass
    limiter = AdmissionLimiter(rate=2, concurrency=8, what="lookups")
    for _ in range(2):
        with limiter.admit():
            pass
    with pytest.raises(Throttled, match="per second"), limiter.admit():
        pass
    time.sleep(0.6)
    with limiter.admit():  # refilled at 2 per second
        pass
    assert limiter.refused == 1


@pytest.mark.timeout(60)
def test_lookup_bound_three_ways(hub: HubEmulator, runtime_env: dict[str, str], tmp_path: Path) -> None:
    """`--max-resolutions-per-s`, fstab `max_resolutions_per_s=` and `HFFS_MAX_RESOLUTIONS_PER_S`."""
    from hffs_neuron.runtime import read_state
    from mountctl.cli import mount_helper_argv

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mountctl = [sys.executable, "-m", "mountctl"]
    args = ["mount", "hub-cache", str(mountpoint), "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run([*mountctl, *args, "--max-resolutions-per-s", "7"], env=runtime_env, capture_output=True)
    assert result.returncode == 0, result.stderr
    try:
        assert read_state(str(mountpoint))["options"]["max_resolutions_per_s"] == 7
    finally:
        subprocess.run([*mountctl, "umount", str(mountpoint)], env=runtime_env, check=True, timeout=60)
    bad = subprocess.run([*mountctl, *args, "--max-resolutions-per-s", "-1"], env=runtime_env, capture_output=True)
    assert bad.returncode == 2 and b"max-resolutions-per-s" in bad.stderr

    fstab, _ = mount_helper_argv(["hub-cache", str(mountpoint), "-o", "max_resolutions_per_s=7,_netdev"])
    assert fstab[fstab.index("--max-resolutions-per-s") + 1] == "7"

    env = dict(runtime_env, HFFS_MAX_RESOLUTIONS_PER_S="7")
    code = "from hffs_neuron.config import MountConfig; print(MountConfig('hub-cache', '/m').max_resolutions_per_s)"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "7.0"
