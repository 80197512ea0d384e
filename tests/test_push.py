"""Publishing compiled modules from a NEFF mount back to its bucket (`hffs_neuron.publish.push`).

Real mount, real huggingface_hub client, real uploads: `HfApi.batch_bucket_files` -> hf_xet -> the
emulator's Xet CAS and batch route (`RecordingApi` only records each call around the real one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import Mounts
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from hffs_neuron.neff_publisher import NeffPublisher
from hffs_neuron.publish import UPLOAD_BATCH_FILES, Upload, additions, publish_modules, push
from hffs_neuron.publish_checks import Checks, HashCache, TrustedWriters
from hffs_neuron.remote.bucket import Bucket
from hffs_neuron.remote.http import HubHttp
from hffs_neuron.runtime import read_states
from hffs_neuron.store.verify import xet_hash
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket
from hffs_neuron.upload_worker import UploadFailed, UploadWorker, retry_after

pytestmark = pytest.mark.timeout(120)

VERSION = "neuronxcc-2.21.18209.0+043b1bf7"
MountFn = Callable[..., Path]


def _open_files() -> list[str]:
    """What each fd of this process refers to (hf_xet's own sockets come and go: callers filter)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


class RecordingApi(HfApi):
    """A real HfApi that records each bucket upload call (and the fds open meanwhile) around the real one."""

    def __init__(self, hub: HubEmulator, **kwargs: Any):
        super().__init__(endpoint=hub.url, **kwargs)
        self.hub = hub
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []
        self.fds_during_calls: list[list[str]] = []  # what each fd of this process opened while each call ran
        self.uploaded: dict[str, bytes] = {}  # destination -> bytes read from the source given

    def batch_bucket_files(self, bucket_id: str, *, add: Any = None, copy: Any = None, delete: Any = None, **_: Any):
        assert not copy and not delete  # push only ever adds
        add = [(str(src), dest) for src, dest in add or []]
        self.fds_during_calls.append(_open_files())
        self.calls.append((bucket_id, add))
        result = super().batch_bucket_files(bucket_id, add=add, **_)
        root = self.hub.bucket_dir(bucket_id)
        for _src, dest in add:
            self.uploaded[dest] = (root / dest).read_bytes()
        return result


@pytest.fixture
def mount_neff(mounts: Mounts) -> MountFn:
    """`mount_neff(bucket_id, name="mnt", cache="cache", **options)` -> mountpoint. Push reads the
    mount's state in the runtime dir (`runtime_env`), which `mounts` gives the daemon too."""

    def do_mount(bucket_id: str, name: str = "mnt", cache: str = "cache", **options: Any) -> Path:
        return Path(mounts("neff", bucket_id, name=name, cache=cache, **options).mountpoint)

    return do_mount


def _state_of(mountpoint: Path) -> dict:
    states = [s for s in read_states() if s.get("mountpoint") == os.path.realpath(mountpoint)]
    assert len(states) == 1, read_states()
    return states[0]


def _write_module(root: Path, name: str, files: dict[str, bytes]) -> str:
    """Create a module through the mount, as the compiler does (plain create + write)."""
    module = root / VERSION / name
    module.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (module / fname).write_bytes(data)
    return f"{VERSION}/{name}"


def _local_modules(mp: Path) -> dict[str, str]:
    """Modules in every state a compile cache can hold; returns {kind: module path}."""
    hlo, flags = os.urandom(3000), b'["--target=trn1"]'
    return {
        "complete": _write_module(
            mp,
            "MODULE_11111111111111111111+aaaaaaaa",
            {
                "model.hlo_module.pb": hlo,
                "compile_flags.json": flags,
                "model.neff": os.urandom(70_000),
                "model.done": b"",
            },
        ),
        "incomplete": _write_module(
            mp, "MODULE_22222222222222222222+bbbbbbbb", {"model.hlo_module.pb": hlo, "model.neff": b"partial"}
        ),
        "locked": _write_module(
            mp,
            "MODULE_33333333333333333333+cccccccc",
            {"model.neff": b"n", "model.done": b"", "model.hlo_module.pb.lock": b""},
        ),
        "failed": _write_module(
            mp, "MODULE_44444444444444444444+dddddddd", {"model.hlo_module.pb": hlo, "model.log": b"ERROR\n"}
        ),
    }


def test_push_selects_complete_modules_and_is_idempotent(hub: HubEmulator, mount_neff: MountFn) -> None:
    bucket = build_neff_bucket(hub)
    mp = mount_neff(bucket["bucket_id"])
    with open(mp / "lock", "w"):  # the compiler's root lock: never published
        pass
    modules = _local_modules(mp)
    # A complete module that also kept a log of warnings: published, minus the log.
    noisy = _write_module(
        mp, "MODULE_55555555555555555555+eeeeeeee", {"model.neff": b"neff5", "model.done": b"", "model.log": b"warn\n"}
    )
    state = _state_of(mp)
    api = RecordingApi(hub)

    plan = push(state, dry_run=True, api=api)
    assert api.calls == []  # dry run uploads nothing
    assert sorted(u.module for u in plan.upload) == sorted([modules["complete"], noisy])
    skipped = dict(plan.skipped)
    assert "lock" in skipped[modules["locked"]]
    assert "failed" in skipped[modules["failed"]]
    assert "incomplete" in skipped[modules["incomplete"]]
    assert modules["complete"] not in skipped

    plan = push(state, api=api)
    # Two calls: every other file first, the done markers only once those succeeded.
    assert len(api.calls) == 2
    assert {bucket_id for bucket_id, _ in api.calls} == {bucket["bucket_id"]}
    assert all(not dest.endswith("/model.done") for _, dest in api.calls[0][1])
    assert all(dest.endswith("/model.done") for _, dest in api.calls[1][1])
    added = api.calls[0][1] + api.calls[1][1]
    destinations = sorted(dest for _, dest in added)
    expected = [
        f"{modules['complete']}/{n}" for n in ("compile_flags.json", "model.done", "model.hlo_module.pb", "model.neff")
    ] + [f"{noisy}/model.done", f"{noisy}/model.neff"]
    assert destinations == sorted(expected)
    for dest in destinations:
        assert dest != "lock" and not dest.endswith(".lock") and not dest.endswith("model.log")
    # The bytes uploaded are the bytes the mount shows.
    for dest in destinations:
        assert api.uploaded[dest] == (mp / dest).read_bytes()

    again = push(state, api=api)
    assert len(api.calls) == 2  # nothing new: no upload call at all
    assert again.upload == []
    assert "already published" in dict(again.skipped)[modules["complete"]]
    assert "already published" in dict(again.skipped)[noisy]


def test_pushed_modules_are_served_to_a_fresh_mount(hub: HubEmulator, mount_neff: MountFn) -> None:
    bucket = build_neff_bucket(hub)
    mp = mount_neff(bucket["bucket_id"])
    modules = _local_modules(mp)
    neff = (mp / modules["complete"] / "model.neff").read_bytes()
    push(_state_of(mp), api=RecordingApi(hub))
    hub.reset_stats()

    other = mount_neff(bucket["bucket_id"], name="mnt2", cache="cache2")  # a second machine: empty cache
    assert (other / modules["complete"] / "model.done").exists()
    assert (other / modules["complete"] / "model.neff").read_bytes() == neff
    assert hub.bytes_served(f"{modules['complete']}/model.neff") == len(neff)
    for kind in ("incomplete", "locked", "failed"):
        assert not os.path.exists(other / modules[kind]), kind


def test_push_with_prefix(hub: HubEmulator, mount_neff: MountFn) -> None:
    hub.add_bucket("org/shared", {"team-a/README": b"team a cache"})
    mp = mount_neff("org/shared", prefix="team-a")
    module = _write_module(mp, "MODULE_66666666666666666666+ffffffff", {"model.neff": b"neff6", "model.done": b""})
    api = RecordingApi(hub)
    push(_state_of(mp), api=api)
    assert [dest for _, add in api.calls for _, dest in add] == [
        f"team-a/{module}/model.neff",
        f"team-a/{module}/model.done",
    ]
    assert (hub.bucket_dir("org/shared") / "team-a" / module / "model.neff").read_bytes() == b"neff6"
    assert push(_state_of(mp), api=api).upload == []


def test_mountctl_push_dry_run(hub: HubEmulator, mount_neff: MountFn, runtime_env: dict[str, str]) -> None:
    bucket = build_neff_bucket(hub)
    mp = mount_neff(bucket["bucket_id"])
    modules = _local_modules(mp)
    mountctl = Path(sys.executable).parent / "mountctl"
    result = subprocess.run(
        [str(mountctl), "push", str(mp), "--dry-run"], capture_output=True, text=True, env=runtime_env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"would push {modules['complete']} (4 files)" in result.stdout
    for kind in ("incomplete", "locked", "failed"):
        assert f"skipped {modules[kind]}:" in result.stdout
    before = set(hub.bucket_dir(bucket["bucket_id"]).rglob("*"))
    assert not any(modules["complete"] in str(p) for p in before)  # dry run published nothing

    # For real, in a subprocess: HfApi.batch_bucket_files -> hf_xet -> the emulator; read back elsewhere.
    result = subprocess.run(
        [str(mountctl), "push", str(mp)], capture_output=True, text=True, env=runtime_env, timeout=90
    )
    assert result.returncode == 0, result.stderr
    neff = (mp / modules["complete"] / "model.neff").read_bytes()
    assert (hub.bucket_dir(bucket["bucket_id"]) / modules["complete"] / "model.neff").read_bytes() == neff
    other = mount_neff(bucket["bucket_id"], name="other", cache="other-cache")
    assert (other / modules["complete"] / "model.neff").read_bytes() == neff


def _layer_upper(mp: Path) -> Path:
    return Path(_state_of(mp)["layer_dir"]) / "upper"


def test_push_publishes_regular_files_only(
    hub: HubEmulator, mount_neff: MountFn, tmp_path: Path, runtime_env: dict[str, str]
) -> None:
    """A client plants symlinks (to a root-only file, to a directory) in a complete module and in place of
    a module: push never follows them, uploads only regular files and says why each was skipped."""
    bucket = build_neff_bucket(hub)
    mp = mount_neff(bucket["bucket_id"])
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    module = _write_module(mp, "MODULE_77777777777777777777+12121212", {"model.neff": b"neff7", "model.done": b""})
    os.symlink(secret, mp / module / "wrapped_neff.hlo")  # through the mount, as a client would
    os.symlink("/etc", mp / module / "extra")
    # A whole "module" that is a symlink to a directory holding a complete module elsewhere.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("model.neff", "model.done"):
        (elsewhere / name).write_bytes(b"not from this cache")
    os.symlink(elsewhere, _layer_upper(mp) / VERSION / "MODULE_88888888888888888888+34343434")
    # A module whose model.neff is only a symlink is not complete.
    fake = _write_module(mp, "MODULE_99999999999999999999+56565656", {"model.done": b""})
    os.symlink(secret, mp / fake / "model.neff")
    assert os.path.islink(_layer_upper(mp) / module / "wrapped_neff.hlo")  # the layer keeps it a symlink

    mountctl = Path(sys.executable).parent / "mountctl"
    result = subprocess.run(
        [str(mountctl), "push", str(mp), "--dry-run"], capture_output=True, text=True, env=runtime_env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"would push {module} (2 files)" in result.stdout
    assert f"skipped {module}/wrapped_neff.hlo: a symlink (never followed)" in result.stdout
    assert f"skipped {module}/extra: a symlink (never followed)" in result.stdout
    assert f"skipped {VERSION}/MODULE_88888888888888888888+34343434: a symlink (never followed)" in result.stdout
    assert f"skipped {fake}: incomplete" in result.stdout

    api = RecordingApi(hub)
    push(_state_of(mp), api=api)
    assert sorted(api.uploaded) == [f"{module}/model.done", f"{module}/model.neff"]
    assert not any(data == secret.read_bytes() for data in api.uploaded.values())
    published = [p for p in hub.bucket_dir(bucket["bucket_id"]).rglob("*") if p.is_file()]
    assert not any(b"root's secret" in p.read_bytes() or b"not from this cache" in p.read_bytes() for p in published)


def test_push_skips_held_deleted_locks_and_scratch_files(hub: HubEmulator, mount_neff: MountFn) -> None:
    """A compiler's lock deleted while still held becomes `.fuse_hidden*`: the module is still in progress.
    Copy-up temp files are never published."""
    bucket = build_neff_bucket(hub)
    mp = mount_neff(bucket["bucket_id"])
    files = {"model.neff": b"neff", "model.done": b"", "model.hlo_module.pb.lock": b""}
    held = _write_module(mp, "MODULE_12121212121212121212+aaaa0000", files)
    lock = open(mp / held / "model.hlo_module.pb.lock", "rb")  # noqa: SIM115 - held across the push
    try:
        os.unlink(mp / held / "model.hlo_module.pb.lock")  # libfuse hides it instead: the holder keeps it
        hidden = [n for n in os.listdir(_layer_upper(mp) / held) if n.startswith(".fuse_hidden")]
        done = _write_module(mp, "MODULE_34343434343434343434+bbbb0000", {"model.neff": b"n2", "model.done": b""})
        # A leftover copy-up temp next to its target, as a crash would leave it.
        (_layer_upper(mp) / done / "model.neff.hffs-copyup.123.456").write_bytes(b"partial")

        plan = push(_state_of(mp), dry_run=True, api=RecordingApi(hub))
        skipped = dict(plan.skipped)
        if hidden:  # (a mount with hard_remove drops the name instead: nothing is left to see)
            assert "in progress" in skipped[held], plan
        (files_of_done,) = [u.files for u in plan.upload if u.module == done]
        assert sorted(Path(local).name for local, _ in files_of_done) == ["model.done", "model.neff"]
        assert not any(".fuse_hidden" in k or "hffs-copyup" in k for k in skipped)
    finally:
        lock.close()


def test_upload_opens_files_without_following_symlinks(tmp_path: Path) -> None:
    """Between the plan and the upload a client may swap a file or a module directory for a symlink: the
    upload's opens refuse it (ELOOP / ENOTDIR) instead of reading the link's target."""
    from hffs_neuron.publish import _open_module_files

    upper = tmp_path / "upper"
    module = upper / VERSION / "MODULE_1"
    module.mkdir(parents=True)
    (module / "model.neff").write_bytes(b"neff")
    (tmp_path / "secret").write_bytes(b"secret")
    open_fds = len(os.listdir("/proc/self/fd"))
    fds = _open_module_files(upper, f"{VERSION}/MODULE_1", ["model.neff"])
    try:
        assert Path(f"/proc/self/fd/{fds[0]}").read_bytes() == b"neff"  # what the upload reads
    finally:
        os.close(fds[0])
    (module / "model.done").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError):
        _open_module_files(upper, f"{VERSION}/MODULE_1", ["model.neff", "model.done"])
    (upper / VERSION / "MODULE_2").symlink_to(module)
    with pytest.raises(OSError):
        _open_module_files(upper, f"{VERSION}/MODULE_2", ["model.neff"])
    assert len(os.listdir("/proc/self/fd")) == open_fds  # failed opens leave no fd behind


def test_publish_modules_bounds_fds_and_sends_markers_after_the_rest(hub: HubEmulator, tmp_path: Path) -> None:
    """40 modules (80 files) and one of 40 files go in calls of at most UPLOAD_BATCH_FILES files, each batch's
    done markers in a call after its other files (the large module's after all its chunks); no more fds are
    held during a call than it uploads, none afterwards."""
    bucket = Bucket(HubHttp(hub.url), build_neff_bucket(hub)["bucket_id"])
    upper = tmp_path / "upper"
    modules = []
    for i in range(41):
        rel = f"{VERSION}/MODULE_{i:020d}+{i:08x}"
        (upper / rel).mkdir(parents=True)
        (upper / rel / "model.neff").write_bytes(b"neff %d" % i)
        (upper / rel / "model.done").write_bytes(b"")
        extra = [f"part{n}.bin" for n in range(38)] if i == 40 else []
        for name in extra:
            (upper / rel / name).write_bytes(name.encode())
        modules.append(Upload(rel, additions(bucket, upper, rel, ["model.done", "model.neff", *extra])))
    api = RecordingApi(hub)

    def layer_fds(files: list[str]) -> int:  # hf_xet's sockets and runtime fds come and go: not counted
        return sum(f.startswith(str(upper)) for f in files)

    assert layer_fds(_open_files()) == 0
    assert publish_modules(api, bucket, upper, modules) == {}  # nothing changed since the check

    assert layer_fds(_open_files()) == 0
    sent = [[dest for _, dest in add] for _, add in api.calls]
    assert all(0 < len(call) <= UPLOAD_BATCH_FILES for call in sent)
    for call, files in zip(sent, api.fds_during_calls, strict=True):
        assert layer_fds(files) <= len(call) + 1  # (+1: the listing's own fd)
    position = {dest: n for n, call in enumerate(sent) for dest in call}
    assert len(position) == 40 * 2 + 40
    for upload in modules:
        rel = upload.module
        assert all(
            position[dest] < position[f"{rel}/model.done"] for _, dest in upload.files if dest != f"{rel}/model.done"
        )
    markers = [sum(d.endswith("/model.done") for d in call) for call in sent]
    assert all(n in (0, len(call)) for n, call in zip(markers, sent, strict=True))  # markers never mixed in
    assert api.uploaded[f"{modules[39].module}/model.neff"] == b"neff 39"


def test_local_hashes_survive_a_restart_and_follow_changes(tmp_path: Path) -> None:
    """The publish hash cache: a file already hashed is not hashed again after a restart (its device,
    inode, size and mtime are unchanged); a rewritten file is."""
    neff = tmp_path / "model.neff"
    neff.write_bytes(b"first compile")
    log = tmp_path / "publish-hashes.jsonl"

    def hashed(cache: HashCache) -> str:
        fd = os.open(neff, os.O_RDONLY)
        try:
            return cache.hash_of(f"{VERSION}/MODULE_1/model.neff", fd)
        finally:
            os.close(fd)

    first = HashCache(tmp_path)
    digest = hashed(first)
    first.save()
    assert digest == xet_hash(neff) and len(log.read_text().splitlines()) == 1
    restarted = HashCache(tmp_path)
    assert hashed(restarted) == digest
    restarted.save()
    assert len(log.read_text().splitlines()) == 1  # known: not hashed again
    neff.write_bytes(b"second compile")
    assert hashed(restarted) == xet_hash(neff) != digest
    restarted.save()
    assert len(log.read_text().splitlines()) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_upload_worker_serves_calls_through_the_fds_and_is_replaced_after_a_stall(
    hub: HubEmulator, tmp_path: Path
) -> None:
    """One worker process serves call after call; it reads the files through the fds it is given (a file
    unlinked after it was opened is still uploaded, with the bytes of that open file); a call whose I/O
    stalls fails within its stall timeout, its worker is killed, and the next call starts a new one."""
    bucket_dir = hub.add_bucket("org/worker")
    worker = UploadWorker()

    def upload(name: str, data: bytes, stall_timeout: float = 30.0) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            path.unlink()  # only the fd leads to these bytes now
            path.write_bytes(b"another file in its place")
            worker.call(hub.url, {"bucket_id": "org/worker"}, [(fd, f"w/{name}")], stall_timeout)
        finally:
            os.close(fd)

    try:
        upload("one.bin", b"first" * 1000)
        first = worker.pid
        upload("two.bin", b"second" * 1000)
        assert worker.pid == first and worker.started == 1  # one process for both calls
        assert (bucket_dir / "w/one.bin").read_bytes() == b"first" * 1000
        assert (bucket_dir / "w/two.bin").read_bytes() == b"second" * 1000

        hub.faults.add("/api/buckets/*/batch", "stall", seconds=60, count=1, methods=("POST",))
        started = time.monotonic()
        with pytest.raises(UploadFailed, match="stalled"):
            upload("three.bin", b"third" * 1000, stall_timeout=1.0)
        assert time.monotonic() - started < 10
        assert worker.pid is None and not _alive(first)  # killed and reaped
        upload("three.bin", b"third" * 1000)
        assert worker.started == 2 and worker.pid != first
        assert (bucket_dir / "w/three.bin").read_bytes() == b"third" * 1000
        last = worker.pid
    finally:
        worker.close()
    assert last is not None and not _alive(last)


def test_upload_worker_reports_status_and_retry_after(hub: HubEmulator, tmp_path: Path) -> None:
    """A call the Hub keeps refusing (huggingface_hub's own retries spent) fails with the HTTP status and
    the seconds `Retry-After` asked for; the worker stays and serves the next call."""
    hub.add_bucket("org/limited")
    hub.faults.add("/api/buckets/*/batch", "status", status=429, retry_after=0, methods=("POST",))
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    worker = UploadWorker()
    try:
        with pytest.raises(UploadFailed) as info:
            worker.call(hub.url, {"bucket_id": "org/limited"}, [(fd, "f.bin")], 30.0)
        assert info.value.status == 429 and info.value.retry_after == 0.0
        first = worker.pid
        hub.faults.clear()
        worker.call(hub.url, {"bucket_id": "org/limited"}, [(fd, "f.bin")], 30.0)
        assert worker.pid == first
    finally:
        worker.close()
        os.close(fd)
    assert retry_after(UploadFailed("x", 503, 12.0)) == 12.0
    assert retry_after(ValueError("no response")) is None


def test_publisher_looks_at_a_module_at_once_when_it_may_be_complete(hub: HubEmulator, tmp_path: Path) -> None:
    """The debounce (30 s here) holds back a module after a write; closing its done marker or removing its
    lock has it looked at at once: a compile's burst (lock, files, done, unlock) is one upload round."""
    bucket = Bucket(HubHttp(hub.url), build_neff_bucket(hub)["bucket_id"])
    upper = tmp_path / "layer" / "upper"
    upper.mkdir(parents=True)
    checks = Checks.for_layer(upper, TrustedWriters.parse(os.getuid(), ()), writing=frozenset)
    api = RecordingApi(hub)
    publisher = NeffPublisher(upper, bucket, checks, api=api, debounce=30.0)
    publisher.start()

    def write(module: str, name: str, data: bytes = b"") -> None:
        (upper / module).mkdir(parents=True, exist_ok=True)
        (upper / module / name).write_bytes(data)
        publisher.notify(f"{module}/{name}")

    try:
        one, two = f"{VERSION}/MODULE_1+1", f"{VERSION}/MODULE_2+2"
        write(one, "model.hlo_module.pb.lock")
        write(one, "model.hlo_module.pb", b"hlo")
        write(one, "model.neff", b"neff")
        write(one, "model.done")  # looked at at once: still locked
        write(two, "model.done")
        write(two, "model.neff", b"neff 2")  # complete, but a plain write: the debounce holds it back
        time.sleep(1.5)
        assert api.calls == []
        (upper / one / "model.hlo_module.pb.lock").unlink()
        publisher.notify(f"{one}/model.hlo_module.pb.lock")
        _wait(lambda: len(api.calls) == 2, 15, "the module published")
        sent = [sorted(dest for _, dest in add) for _, add in api.calls]
        assert sent == [[f"{one}/model.hlo_module.pb", f"{one}/model.neff"], [f"{one}/model.done"]]
        time.sleep(1.0)
        assert len(api.calls) == 2 and publisher.stats()["pending"] == 1  # the second module still waits
    finally:
        publisher.close()


class RefusedOnce(RecordingApi):
    """The first upload call is refused with 429 and `Retry-After: 3` (huggingface_hub's own retries spent)."""

    refused_at: float | None = None
    sent_at: list[float]

    def batch_bucket_files(self, bucket_id: str, **kwargs: Any):
        if self.refused_at is None:
            self.refused_at = time.monotonic()
            request = httpx2.Request("POST", f"{self.hub.url}/api/buckets/{bucket_id}/batch")
            response = httpx2.Response(429, request=request, headers={"Retry-After": "3"})
            raise HfHubHTTPError("429 Too Many Requests", response=response)
        self.sent_at = getattr(self, "sent_at", []) + [time.monotonic()]
        return super().batch_bucket_files(bucket_id, **kwargs)


def test_retry_after_holds_back_every_upload(hub: HubEmulator, tmp_path: Path) -> None:
    """A call refused with `Retry-After: 3`: neither its module nor one completed meanwhile is uploaded
    before those 3 s have passed (the publisher's own first backoff is 1 s, a new module goes at once)."""
    bucket = Bucket(HubHttp(hub.url), build_neff_bucket(hub)["bucket_id"])
    upper = tmp_path / "layer" / "upper"
    upper.mkdir(parents=True)
    checks = Checks.for_layer(upper, TrustedWriters.parse(os.getuid(), ()), writing=frozenset)
    api = RefusedOnce(hub)
    publisher = NeffPublisher(upper, bucket, checks, api=api)
    publisher.start()

    def complete(module: str) -> None:
        (upper / module).mkdir(parents=True)
        (upper / module / "model.neff").write_bytes(module.encode())
        (upper / module / "model.done").write_bytes(b"")
        publisher.notify(f"{module}/model.done")

    try:
        one, two = f"{VERSION}/MODULE_1+1", f"{VERSION}/MODULE_2+2"
        complete(one)
        _wait(lambda: api.refused_at is not None, 10, "the refused call")
        complete(two)
        _wait(lambda: publisher.stats()["published"] == 2, 20, "both modules published")
        assert api.refused_at is not None and min(api.sent_at) - api.refused_at >= 3.0
        assert {dest for _, add in api.calls for _, dest in add} == {
            f"{m}/{n}" for m in (one, two) for n in ("model.neff", "model.done")
        }
    finally:
        publisher.close()
