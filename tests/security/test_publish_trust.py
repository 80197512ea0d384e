"""Fleet trust (issue 24): nothing untrusted, unfinished or unbounded reaches the shared compile cache.

`--publish` uploads with the owner's token whatever the mount's users compile, for every node of the fleet
to load. These tests play the other local user of an `--allow-other --publish` mount (a real second user,
as in `test_shared_host`) and the compiler that finishes a module in an unusual order, against the
emulator's bucket: what must never be published is not, and what must be published is, once, with the
final bytes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts, OtherUser, _as
from test_fleet import state_of, wait_for
from test_shared_host import COMPILER

from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

pytestmark = pytest.mark.timeout(180)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"
# Longer than the publisher's debounce (1 s) and a check round: what was not published by then is not.
SETTLE = 3.0


def _module(name: str) -> str:
    return f"{VERSION}/MODULE_{name}+aaaaaaaa"


def _in_bucket(hub: HubEmulator, bucket_id: str, path: str) -> bool:
    return (hub.bucket_dir(bucket_id) / path).exists()


def _compile_as_owner(mp: Path, module: str, neff: bytes) -> None:
    target = mp / module
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.hlo_module.pb").write_bytes(b"hlo")
    (target / "model.neff").write_bytes(neff)
    (target / "model.done").write_bytes(b"")


def _publish(state: dict) -> dict:
    return state["publish"]


def _push(mp: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mountctl", "push", str(mp), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_another_users_module_is_never_published(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser, runtime_env: dict[str, str]
) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    mp = Path(shared_mounts("neff", bucket_id, allow_other=True, publish=True).mountpoint)
    theirs, ours, rewritten = _module("1" * 20), _module("2" * 20), _module("3" * 20)

    result = other_user.python(COMPILER, str(mp), str(mp / theirs))
    assert result.returncode == 0, result.stderr
    # A world-writable NEFF of the owner's, rewritten by the other user, is not the owner's any more.
    _compile_as_owner(mp, rewritten, b"owner's neff")
    os.chmod(mp / rewritten / "model.neff", 0o666)
    assert _as(other_user, "write", mp / rewritten / "model.neff", "evil", "r+b") == "ok"
    _compile_as_owner(mp, ours, b"owner's neff")

    wait_for(lambda: _in_bucket(hub, bucket_id, f"{ours}/model.done"), 20, "the owner's module in the bucket")
    time.sleep(SETTLE)
    assert not _in_bucket(hub, bucket_id, f"{theirs}/model.neff")
    assert not _in_bucket(hub, bucket_id, f"{rewritten}/model.neff")
    untrusted = {u["module"]: u for u in _publish(state_of(mp))["untrusted"]}
    assert set(untrusted) == {theirs, rewritten}
    assert untrusted[theirs]["uid"] == untrusted[rewritten]["uid"] == other_user.uid
    # Locally the module works for everyone, like a local compile cache directory.
    assert (mp / theirs / "model.neff").read_bytes() == b"neff by the other user"

    # `push` keeps the same rule; --include-untrusted overrides it and says so.
    dry = _push(mp, "--dry-run", env=runtime_env)
    assert dry.returncode == 0, dry.stderr
    assert f"skipped {theirs}: untrusted: uid {other_user.uid}" in dry.stdout
    included = _push(mp, "--dry-run", "--include-untrusted", env=runtime_env)
    assert f"would push {theirs} (" in included.stdout and "included by --include-untrusted" in included.stdout
    assert not _in_bucket(hub, bucket_id, f"{theirs}/model.neff")


def test_publish_from_a_group_trusts_its_members(
    hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser
) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    group = f"@{other_user.gid}"  # useradd's own group for the user
    mp = Path(shared_mounts("neff", bucket_id, allow_other=True, publish=True, publish_from=[group]).mountpoint)
    theirs = _module("4" * 20)
    result = other_user.python(COMPILER, str(mp), str(mp / theirs))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: _in_bucket(hub, bucket_id, f"{theirs}/model.done"), 20, "the trusted user's module")
    assert (hub.bucket_dir(bucket_id) / theirs / "model.neff").read_bytes() == b"neff by the other user"
    assert _publish(state_of(mp))["untrusted"] == []


def test_another_user_cannot_take_over_a_module(hub: HubEmulator, shared_mounts: Mounts, other_user: OtherUser) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(shared_mounts("neff", bucket["bucket_id"], allow_other=True).mountpoint)
    remote = mp / bucket["complete"][0]
    # A module directory the other user makes first is the owner's (sticky, open to all) all the same.
    early = mp / _module("5" * 20)
    assert _as(other_user, "makedirs", early) == "ok"
    assert (os.stat(early).st_uid, stat.S_IMODE(os.stat(early).st_mode)) == (os.getuid(), 0o1777)
    # Their own directory renamed to a module name becomes the owner's too.
    own = mp / "scratch"
    assert _as(other_user, "mkdir", own) == "ok"
    assert os.stat(own).st_uid == other_user.uid
    renamed = mp / _module("6" * 20)
    assert _as(other_user, "rename", own, renamed) == "ok"
    assert (os.stat(renamed).st_uid, stat.S_IMODE(os.stat(renamed).st_mode)) == (os.getuid(), 0o1777)
    # The bucket's files and modules, and the owner's, stay out of their reach.
    assert _as(other_user, "unlink", remote / "model.neff") in ("EPERM", "EACCES")
    assert _as(other_user, "rename", remote / "model.neff", remote / "x") in ("EPERM", "EACCES")
    assert _as(other_user, "rename", remote, mp / _module("7" * 20)) in ("EPERM", "EACCES")
    assert _as(other_user, "rmdir", early) in ("EPERM", "EACCES")
    assert _as(other_user, "write", remote / "model.neff", "evil") == "EACCES"
    assert (remote / "model.neff").exists() and early.is_dir()
    # What they create themselves they may still remove.
    assert _as(other_user, "write", early / "scratch", "x") == "ok"
    assert _as(other_user, "unlink", early / "scratch") == "ok"


def test_neff_open_when_done_closes_is_published_once_with_final_bytes(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    mp = Path(mounts("neff", bucket_id, publish=True).mountpoint)
    module = _module("8" * 20)
    final = os.urandom(200_000)
    (mp / module).mkdir(parents=True)
    with open(mp / module / "model.neff", "wb") as neff:
        neff.truncate(len(final))  # preallocated: the right size long before the right bytes
        neff.write(final[:1000])
        neff.flush()
        (mp / module / "model.done").write_bytes(b"")
        time.sleep(SETTLE)
        assert not _in_bucket(hub, bucket_id, f"{module}/model.neff")  # still open for writing
        assert _publish(state_of(mp))["published"] == 0
        neff.write(final[1000:])
    # Written after model.done: not finished until the marker is written again.
    time.sleep(SETTLE)
    assert not _in_bucket(hub, bucket_id, f"{module}/model.neff")
    (mp / module / "model.done").write_bytes(b"")
    wait_for(lambda: _in_bucket(hub, bucket_id, f"{module}/model.done"), 20, "the finished module")
    assert (hub.bucket_dir(bucket_id) / module / "model.neff").read_bytes() == final
    uploads = [r for r in hub.requests("/batch", method="POST")]
    time.sleep(SETTLE)
    assert len(hub.requests("/batch", method="POST")) == len(uploads)  # once


def test_oversized_sparse_and_conflicting_modules_are_refused(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    mp = Path(mounts("neff", bucket_id, publish=True).mountpoint)
    many, sparse, good = _module("9" * 20), _module("a" * 20), _module("b" * 20)
    (mp / many).mkdir(parents=True)
    for i in range(300):
        (mp / many / f"part{i}.bin").write_bytes(b"x")
    _compile_as_owner(mp, many, b"neff")
    (mp / sparse).mkdir(parents=True)
    with open(mp / sparse / "model.neff", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of nothing
    (mp / sparse / "model.done").write_bytes(b"")
    # A module the bucket already holds, compiled again here with other bytes: a conflict, not an overwrite.
    existing = bucket["complete"][0]
    original = (hub.bucket_dir(bucket_id) / existing / "model.neff").read_bytes()
    (mp / existing / "model.neff").write_bytes(b"another compile's neff")
    (mp / existing / "model.done").write_bytes(b"")
    _compile_as_owner(mp, good, b"good neff")

    wait_for(lambda: _in_bucket(hub, bucket_id, f"{good}/model.done"), 20, "the good module")
    wait_for(lambda: len(_publish(state_of(mp))["failed"]) == 2, 10, "two refused modules in status")
    wait_for(lambda: _publish(state_of(mp))["conflicts"], 10, "the conflict in status")
    publish = _publish(state_of(mp))
    failed = {f["module"]: f["reason"] for f in publish["failed"]}
    assert "303 files, more than the 64" in failed[many]
    assert "sparse" in failed[sparse]
    assert [c["module"] for c in publish["conflicts"]] == [existing]
    assert not _in_bucket(hub, bucket_id, many) and not _in_bucket(hub, bucket_id, sparse)
    assert (hub.bucket_dir(bucket_id) / existing / "model.neff").read_bytes() == original
    # The daemon keeps serving.
    assert (mp / good / "model.neff").read_bytes() == b"good neff"


def _upload_workers(daemon: int) -> list[int]:
    """Pids of the daemon's upload worker processes (its children running hffs_neuron.upload_worker)."""
    workers = []
    for task in Path(f"/proc/{daemon}/task").iterdir():
        try:  # a thread or a child may end while this looks
            children = (task / "children").read_text().split()
            workers += [p for p in children if b"upload_worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        except FileNotFoundError:
            continue
    return [int(pid) for pid in workers]


def test_a_stalled_upload_is_stopped_and_retried(hub: HubEmulator, mounts: Mounts) -> None:
    """The bucket accepts the upload's batch call and never answers: the upload worker (started with the
    mount) is killed once no byte moved for --timeout, a new one takes its place, and the retry publishes
    the module; no worker is left behind."""
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    hub.faults.add("/api/buckets/*/batch", "stall", seconds=120, count=1, methods=("POST",))
    mp = Path(mounts("neff", bucket_id, publish=True, timeout=3).mountpoint)
    daemon = state_of(mp)["pid"]
    wait_for(lambda: len(_upload_workers(daemon)) == 1, 10, "the upload worker")
    (stalled,) = _upload_workers(daemon)
    module = _module("c" * 20)
    _compile_as_owner(mp, module, b"neff after a stall")
    wait_for(lambda: _in_bucket(hub, bucket_id, f"{module}/model.done"), 30, "the module after the stalled call")
    assert (hub.bucket_dir(bucket_id) / module / "model.neff").read_bytes() == b"neff after a stall"
    assert len(hub.requests("/batch", method="POST")) >= 2  # the stalled call, then the retry
    replacement = _upload_workers(daemon)
    assert len(replacement) == 1 and replacement != [stalled] and not Path(f"/proc/{stalled}").exists()
