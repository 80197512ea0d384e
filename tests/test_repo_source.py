"""The NEFF view over a model repo (the optimum-neuron cache layout, `hf://ORG/NAME`), through real mounts.

The same rules as over a bucket (tests/test_neff_view.py): poison hidden, the compiler's pattern from
several processes, the model area (here the registry) read-only, verification of LFS and plain git
files; plus what only a repo has: the pinned commit, the followed branch, and `hf://` parsing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Mounts
from test_cli import Cli, cli  # noqa: F401 - the `cli` fixture
from test_neff_view import _run_workers

from hffs_neuron.errors import RemoteAccessDenied, UsageError
from hffs_neuron.mount import status
from hffs_neuron.publish import push
from hffs_neuron.runtime import read_states
from hffs_neuron.sources import parse_source
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_repo

pytestmark = pytest.mark.timeout(120)

REPO = "aws-neuron/optimum-neuron-cache"
SOURCE = f"hf://{REPO}"
VERSION = "neuronxcc-2.21.18209.0+043b1bf7"


@pytest.fixture
def repo(hub: HubEmulator) -> dict[str, Any]:
    return build_neff_repo(hub, REPO)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _errno_of(fn: Any) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


# -- sources ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("org/cache", "org/cache", "bucket"),
        ("neff:org/cache", "org/cache", "bucket"),
        ("hf://buckets/org/cache", "org/cache", "bucket"),
        ("hf://buckets/org/cache/trn1/", "hf://buckets/org/cache/trn1", "bucket"),
        ("hf://aws-neuron/optimum-neuron-cache", "hf://aws-neuron/optimum-neuron-cache", "model"),
        ("hf://aws-neuron/optimum-neuron-cache@main", "hf://aws-neuron/optimum-neuron-cache", "model"),
        ("hf://org/cache@refs%2Fpr%2F3", "hf://org/cache@refs%2Fpr%2F3", "model"),
        ("hf://datasets/org/cache@v1.0", "hf://datasets/org/cache@v1.0", "dataset"),
    ],
)
def test_sources_parse_to_one_canonical_form(text: str, canonical: str, kind: str) -> None:
    source = parse_source(text)
    assert (source.canonical, source.kind) == (canonical, kind)
    assert parse_source(source.canonical) == source  # the canonical form parses to the same source


@pytest.mark.parametrize(
    "text",
    [
        "hf://org",
        "hf://org/cache/extra",
        "hf://spaces/org/app",
        "hf://models/org/cache",
        "hf://org/cache@",
        "hf://org/cache@../x",
        "hf://buckets/org",
        "hf://buckets/org/cache@v1",
        "org/cache@v1",
        "hf:/org/cache",
        "s3://bucket/cache",
        "org/ca che",
        "",
    ],
)
def test_bad_sources_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_source(text)
    message = str(info.value)
    assert "\n" not in message and ("expected" in message or "invalid" in message)


def test_prefix_belongs_to_buckets() -> None:
    assert parse_source("org/cache", "trn1").canonical == "hf://buckets/org/cache/trn1"
    assert parse_source("hf://buckets/org/cache/trn1", "trn1").prefix == "trn1"
    with pytest.raises(UsageError, match="give one"):
        parse_source("hf://buckets/org/cache/trn1", "trn2")
    with pytest.raises(UsageError, match="bucket sources only"):
        parse_source("hf://org/cache", "trn1")


# -- the read path ------------------------------------------------------------------------------------------
def test_layout_poison_and_verified_reads(hub: HubEmulator, repo: dict, mounts: Mounts) -> None:
    handle = mounts("neff", SOURCE)
    mp = Path(handle.mountpoint)
    assert sorted(os.listdir(mp)) == sorted(repo["compiler_versions"])
    for version in repo["compiler_versions"]:
        expected = {m.split("/", 1)[1] for m in repo["complete"] + repo["locked"] if m.startswith(version + "/")}
        assert set(os.listdir(mp / version)) == expected  # poison, the registry and the model area hidden
    for module in repo["poisoned"]:
        assert not os.path.exists(mp / module)
    for module in repo["locked"]:
        assert sorted(os.listdir(mp / module)) == ["compile_flags.json", "model.hlo_module.pb"]
    assert hub.bytes_served() == 0  # listing fetched nothing
    for module in repo["complete"]:
        for name in ("model.neff", "compile_flags.json"):  # an LFS file (sha256) and a plain git file (blob id)
            data = repo["data"][f"{module}/{name}"]
            assert os.path.getsize(mp / module / name) == len(data)
            assert (mp / module / name).read_bytes() == data
    assert hub.requests("/tree") and not hub.requests("/api/buckets")


def test_a_corrupted_transfer_is_never_shown(hub: HubEmulator, repo: dict, mounts: Mounts) -> None:
    mp = Path(mounts("neff", SOURCE).mountpoint)
    module = repo["complete"][1]
    for name in ("model.neff", "compile_flags.json"):
        rule = hub.faults.add(f"*{module}/{name}", "corrupt")
        assert _errno_of(lambda name=name: (mp / module / name).read_bytes()) == errno.EIO
        hub.faults.remove(rule)
    for name in ("model.neff", "compile_flags.json"):
        assert (mp / module / name).read_bytes() == repo["data"][f"{module}/{name}"]


def test_registry_is_read_only_model_area(repo: dict, mounts: Mounts) -> None:
    mp = Path(mounts("neff", SOURCE, show_model_area=True).mountpoint)
    entry = mp / repo["registry_files"][0]
    assert entry.read_bytes() == repo["data"][repo["registry_files"][0]]
    assert "0_REGISTRY" in os.listdir(mp / VERSION)
    assert _errno_of(lambda: open(entry, "r+b")) == errno.EROFS
    assert _errno_of(lambda: (entry.parent / "x.json").write_bytes(b"{}")) == errno.EROFS
    (mp / VERSION / "MODULE_1+00000001").mkdir()  # the flat area stays writable


def test_compiler_pattern_over_a_repo(hub: HubEmulator, repo: dict, mounts: Mounts, tmp_path: Path) -> None:
    mp = Path(mounts("neff", SOURCE).mountpoint)
    new = [f"{VERSION}/MODULE_{i}0000000000000000000+cafe{i:04x}" for i in range(2)]
    modules = repo["complete"] + repo["poisoned"] + repo["locked"] + new
    workers, neff_size = 4, 200_000
    order = [modules[w % len(modules) :] + modules[: w % len(modules)] for w in range(workers)]
    results = _run_workers(mp, {"order": order, "neff_size": neff_size}, workers, tmp_path)
    payloads = {_sha((f"neff of worker {w};".encode() * 100_000)[:neff_size]) for w in range(workers)}
    for module in repo["complete"]:
        remote = repo["data"][f"{module}/model.neff"]
        assert {tuple(r[module]) for r in results} == {("hit", _sha(remote))}
        assert hub.bytes_served(f"{module}/model.neff") == len(remote)  # one transfer for all processes
    for module in repo["poisoned"] + repo["locked"] + new:
        states = [r[module][0] for r in results]
        assert states.count("compiled") == 1, states  # a miss, compiled once in the local layer
        assert _sha((mp / module / "model.neff").read_bytes()) in payloads


def test_repo_ids_are_case_insensitive_and_casing_keeps_one_layer(repo: dict, mounts: Mounts) -> None:
    handle = mounts("neff", "hf://AWS-Neuron/Optimum-Neuron-Cache")
    mp = Path(handle.mountpoint)
    local = mp / VERSION / "MODULE_2+00000002"
    local.mkdir()
    (local / "model.neff").write_bytes(b"mine")
    assert set(os.listdir(mp)) == set(repo["compiler_versions"])
    assert not os.path.exists(mp / repo["complete"][0] / "MODEL.NEFF")  # names inside stay exact
    mounts.unmount(handle)
    mp = Path(mounts("neff", SOURCE).mountpoint)  # the Hub's casing: the same repo, the same local layer
    assert (mp / VERSION / "MODULE_2+00000002" / "model.neff").read_bytes() == b"mine"


def test_pinned_commit_and_a_new_commit_within_the_ttl(hub: HubEmulator, repo: dict, mounts: Mounts) -> None:
    pinned = Path(mounts("neff", f"{SOURCE}@{repo['commit']}", name="pinned", cache="c1").mountpoint)
    following = Path(mounts("neff", SOURCE, metadata_ttl=2, negative_ttl=1, cache="c2").mountpoint)
    new = f"{VERSION}/MODULE_77777777777777777777+77777777"
    assert not os.path.exists(following / new)
    assert len(os.listdir(following / VERSION)) == 4
    neff = os.urandom(5000)
    commit = hub.add_repo(REPO, {f"{new}/model.neff": neff, f"{new}/model.done": b""}, parent="main")
    deadline = time.monotonic() + 2 + 1 + 5  # --metadata-ttl + --negative-ttl + slack
    while not os.path.exists(following / new / "model.done"):
        assert time.monotonic() < deadline, "the new commit's module did not show within the TTL"
        time.sleep(0.2)
    assert (following / new / "model.neff").read_bytes() == neff
    assert hub.requests("/refs")  # the branch's move was found by a ref check
    assert hub.requests(f"/tree/{commit}/{new}")  # and the module at the new commit
    assert not os.path.exists(pinned / new)  # a commit id stays pinned


@pytest.mark.timeout(240)
def test_ten_thousand_modules_in_a_repo_stay_within_the_request_bound(hub: HubEmulator, mounts: Mounts) -> None:
    names = {f"MODULE_{i:020d}+{i:08x}" for i in range(10_000)}
    hub.add_repo("org/big", {f"{VERSION}/{name}/model.neff": b"n" for name in names})
    hub.page_size = 1000
    mp = Path(mounts("neff", "hf://org/big").mountpoint)
    hub.reset_stats()
    assert set(os.listdir(mp / VERSION)) == names
    cold = len(hub.requests("/tree"))
    assert 0 < cold <= 11  # the NEFF view's bound over a bucket (tests/test_neff_view.py)
    assert set(os.listdir(mp / VERSION)) == names
    assert len(hub.requests("/tree")) == cold
    assert hub.bytes_served() == 0


# -- publishing to a repo -------------------------------------------------------------------------------------
def _compile(mp: Path, name: str, neff: bytes) -> str:
    """A module as the compiler writes it through the mount (plain create + write, the marker last)."""
    module = mp / VERSION / name
    module.mkdir()
    for fname, data in (("model.hlo_module.pb", b"hlo" * 100), ("compile_flags.json", b"[]"), ("model.neff", neff)):
        (module / fname).write_bytes(data)
    (module / "model.done").write_bytes(b"")
    return f"{VERSION}/{name}"


def _state_of(mountpoint: Path) -> dict:
    (state,) = [s for s in read_states() if s.get("mountpoint") == os.path.realpath(mountpoint)]
    return state


def test_push_to_a_repo_commits_files_then_done_markers(
    hub: HubEmulator, repo: dict, mounts: Mounts, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    mp = Path(mounts("neff", SOURCE, token=hub_token, commit_interval=1).mountpoint)
    mine = [_compile(mp, f"MODULE_{i}1111111111111111111+aaaaaaa{i}", os.urandom(20_000 + i)) for i in range(3)]
    first = len(hub.commits.log)
    plan = push(_state_of(mp))
    assert sorted(u.module for u in plan.upload) == sorted(mine), plan.skipped
    commits = hub.commits.log[first:]
    assert len(commits) == 2  # all modules in one commit, their done markers in the next
    (_, _, added), (_, _, done) = commits
    assert sorted(added) == sorted(
        f"{m}/{n}" for m in mine for n in ("compile_flags.json", "model.hlo_module.pb", "model.neff")
    )
    assert sorted(done) == sorted(f"{m}/model.done" for m in mine)
    assert len(hub.requests("/commit/main", method="POST")) == 2
    # A fresh mount of the repo serves them, LFS (model.neff) and plain git files (compile_flags.json) alike.
    fresh = Path(mounts("neff", SOURCE, name="fresh", cache="fresh-cache").mountpoint)
    for module in mine:
        for name in ("model.neff", "compile_flags.json", "model.done"):
            assert (fresh / module / name).read_bytes() == (mp / module / name).read_bytes()
    # Already published: compared by LFS sha256 and git blob ids, nothing is committed again.
    again = push(_state_of(mp))
    assert again.upload == [] and all("already published" in dict(again.skipped)[m] for m in mine)
    assert len(hub.commits.log) == first + 2


def test_a_repo_module_with_other_content_is_a_conflict(
    hub: HubEmulator, repo: dict, mounts: Mounts, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    mp = Path(mounts("neff", SOURCE, token=hub_token, commit_interval=0).mountpoint)
    module = _compile(mp, "MODULE_91111111111111111111+aaaaaaa9", b"neff" * 10)
    # Another node publishes the same module with other flags (a plain git file) meanwhile.
    hub.add_repo(REPO, {f"{module}/compile_flags.json": b'["other"]'}, parent="main")
    first = len(hub.commits.log)
    plan = push(_state_of(mp))
    assert plan.upload == [] and "conflict" in dict(plan.skipped)[module]
    assert len(hub.commits.log) == first


def test_publish_to_a_repo_coalesces_commits_within_the_interval(
    hub: HubEmulator, repo: dict, mounts: Mounts, hub_token: str
) -> None:
    mp = Path(mounts("neff", SOURCE, token=hub_token, publish=True, commit_interval=3).mountpoint)
    first = len(hub.commits.log)
    mine = [_compile(mp, f"MODULE_{i}2222222222222222222+bbbbbbb{i}", os.urandom(5000)) for i in range(2)]
    time.sleep(1.5)  # the first round commits what is complete by then ...
    mine.append(_compile(mp, "MODULE_52222222222222222222+bbbbbbb5", os.urandom(5000)))  # ... this waits
    deadline = time.monotonic() + 30
    while status(str(mp))[0]["publish"]["published"] < 3:
        assert time.monotonic() < deadline, status(str(mp))[0]["publish"]
        time.sleep(0.2)
    commits = hub.commits.log[first:]
    assert len(commits) == 3, commits
    # Every marker in a later commit than its NEFF, and the commits at least the interval apart.
    for module in mine:
        neff_at = next(i for i, (_, _, paths) in enumerate(commits) if f"{module}/model.neff" in paths)
        done_at = next(i for i, (_, _, paths) in enumerate(commits) if f"{module}/model.done" in paths)
        assert done_at > neff_at
    times = [r.time for r in hub.requests("/commit/main", method="POST")]
    assert all(b - a >= 2.5 for a, b in zip(times, times[1:], strict=False)), times


def test_no_write_access_is_one_line_at_mount_and_in_push(
    hub: HubEmulator, repo: dict, mounts: Mounts, hub_token: str
) -> None:
    with pytest.raises(RemoteAccessDenied) as info:
        mounts("neff", SOURCE, publish=True)
    assert "no write access to model" in str(info.value) and "\n" not in str(info.value)
    mp = Path(mounts("neff", SOURCE, name="ro").mountpoint)
    _compile(mp, "MODULE_81111111111111111111+aaaaaaa8", b"n")
    with pytest.raises(RemoteAccessDenied, match="no write access"):
        push(_state_of(mp))


def test_mountctl_mounts_a_repo_source_and_refuses_bad_forms(hub: HubEmulator, repo: dict, cli: Cli) -> None:  # noqa: F811
    mp = cli.mountpoint()
    cli.ok("mount", "neff", f"{SOURCE}@main", str(mp), "--commit-interval", "5s")
    state = cli.state(mp)
    assert (state["source"], state["follow"], state["options"]["commit_interval"]) == (SOURCE, "probe", 5.0)
    assert sorted(os.listdir(mp)) == sorted(repo["compiler_versions"])
    for bad in ("hf://spaces/org/app", f"hf://{REPO}/extra", "hf://buckets/org"):
        line = cli.fails(2, "mount", "neff", bad, str(cli.mountpoint()))
        assert "expected" in line
    cli.ok("umount", str(mp))
