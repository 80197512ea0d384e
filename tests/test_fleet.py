"""The NEFF view as a fleet-wide compile cache: publish on completion, probe mode, verified bucket bytes.

Two "nodes" are two daemons with separate cache directories on one emulator. Uploads are real: the
daemons' `HfApi.batch_bucket_files` -> hf_xet -> the emulator's Xet CAS and batch route; upload failures are
emulator faults on the batch route (one test wraps the upload call to fail its second call only).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.errors import HffsError
from hffs_neuron.mount import status
from hffs_neuron.remote.bucket import Bucket
from hffs_neuron.remote.http import HubHttp
from hffs_neuron.store.blobstore import BlobStore
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import COMPILER_VERSIONS, build_neff_bucket
from hffs_neuron.views.neff_probe import NameProber

pytestmark = pytest.mark.timeout(180)

VERSION = COMPILER_VERSIONS[0]
SEAM = Path(__file__).parent / "upload_seam"
NEFF = os.urandom(700_000)
BODY = ("model.hlo_module.pb", "compile_flags.json", "model.neff")  # a module's files but its done marker


BATCH = "/api/buckets/*/batch"


@pytest.fixture
def seam_env(runtime_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Environment for the one daemon whose upload calls are logged (and the second one failed)."""
    env = dict(runtime_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SEAM), env.get("PYTHONPATH", "")) if p)
    env["HFFS_TEST_UPLOAD_LOG"] = str(tmp_path / "uploads.jsonl")
    return env


def uploads(env: dict[str, str]) -> list[list[str]]:
    """The destinations of each upload call the seam daemon made, in order."""
    log = Path(env["HFFS_TEST_UPLOAD_LOG"])
    return [json.loads(line)["add"] for line in log.read_text().splitlines()] if log.exists() else []


def batch_calls(hub: HubEmulator, settle: float = 5.0) -> list[int]:
    """The status of each `batch_bucket_files` call the emulator received, in order.

    A call is recorded when it arrives, with status 0 until it is answered (its files may already be
    in the bucket): wait up to `settle` seconds for the answers of calls still in flight.
    """
    deadline = time.monotonic() + settle
    while True:
        statuses = [r.status for r in hub.requests("/batch", method="POST")]
        if 0 not in statuses or time.monotonic() > deadline:
            return statuses
        time.sleep(0.05)


def bucket_files(hub: HubEmulator, bucket_id: str, module: str) -> set[str]:
    directory = hub.bucket_dir(bucket_id) / module
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def read_back_elsewhere(hub: HubEmulator, bucket_id: str, module: str, runtime_env: dict[str, str]) -> bytes:
    """The module's NEFF as `download_bucket_files` (hf_xet on, in another process) gets it."""
    env = {k: v for k, v in runtime_env.items() if k != "HF_HUB_DISABLE_XET"}
    target = Path(runtime_env["HFFS_RUNTIME_DIR"]).parent / "downloaded.neff"
    code = (
        "import sys; from huggingface_hub import download_bucket_files; "
        "download_bucket_files(sys.argv[1], [(sys.argv[2], sys.argv[3])])"
    )
    run_parallel([[sys.executable, "-c", code, bucket_id, f"{module}/model.neff", str(target)]], env=env, timeout=60)
    return target.read_bytes()


def compile_module(mp: Path, name: str, neff: bytes = NEFF, *, release_lock: bool = True) -> str:
    """Write a module through the mount in libneuronxla's order: lock, hlo + flags, neff, done, unlock."""
    module = mp / VERSION / name
    module.mkdir(parents=True, exist_ok=True)
    lock = module / "model.hlo_module.pb.lock"
    lock.write_bytes(b"")
    (module / "model.hlo_module.pb").write_bytes(b"hlo of " + name.encode())
    (module / "compile_flags.json").write_bytes(b'["--target=trn1"]')
    (module / "model.neff").write_bytes(neff)
    (module / "model.done").write_bytes(b"")
    if release_lock:
        lock.unlink()
    return f"{VERSION}/{name}"


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def state_of(mp: Path) -> dict:
    (state,) = status(mp)
    return state


def module_name(i: int) -> str:
    return f"MODULE_{i:020d}+{i:08x}"


def test_published_module_reaches_another_node_in_seconds(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    node_b = Path(mounts("neff", bucket["bucket_id"], name="b", cache="cache-b", negative_ttl=3).mountpoint)
    listed = set(os.listdir(node_b / VERSION))  # node B has listed the directory
    node_a = Path(mounts("neff", bucket["bucket_id"], name="a", cache="cache-a", publish=True).mountpoint)
    name = module_name(1)
    assert name not in listed and not (node_b / VERSION / name / "model.done").exists()  # B has looked it up

    module = compile_module(node_a, name)
    hub.reset_stats()  # from here on only node B lists (node A's publisher checks the one module)

    # The complete module lands in the bucket: every file but the marker in one call, the marker last.
    done = bucket_dir / module / "model.done"
    wait_for(done.exists, 15, "the module in the bucket")
    published_at = time.monotonic()
    assert batch_calls(hub) == [200, 200]  # every file but the marker, then the marker
    assert bucket_files(hub, bucket["bucket_id"], module) == {*BODY, "model.done"}
    assert (bucket_dir / module / "model.neff").read_bytes() == NEFF
    assert read_back_elsewhere(hub, bucket["bucket_id"], module, runtime_env) == NEFF
    assert not (bucket_dir / module / "model.hlo_module.pb.lock").exists()

    # Node B, polling like a waiting compiler, sees it within the negative TTL (3 s) + a margin for load.
    wait_for((node_b / module / "model.done").exists, 10, "model.done on node B", interval=0.2)
    seen_after = time.monotonic() - published_at
    assert (node_b / module / "model.neff").read_bytes() == NEFF
    assert seen_after <= 5.0, f"node B saw the module {seen_after:.1f} s after it was published"
    # Probes asked about the one module: the version directory was never listed again.
    version_listings = [r for r in hub.requests("/tree/") if r.path.rstrip("/").endswith(f"/tree/{VERSION}")]
    assert version_listings == []
    assert any(r.path.endswith(f"/tree/{module}") for r in hub.requests("/tree/"))

    wait_for(lambda: state_of(node_a)["publish"]["published"] == 1, 5, "status of node A")
    assert state_of(node_a)["publish"] == {
        "mode": "on-completion",
        "published": 1,
        "pending": 0,
        "failed": [],
        "untrusted": [],
        "conflicts": [],
    }
    assert state_of(node_b)["follow"] == "probe"
    assert state_of(node_b)["publish"]["mode"] == "off"


def test_poison_is_never_published(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True).mountpoint)
    with open(mp / "lock", "w"):  # the compiler's root lock
        pass
    failed = mp / VERSION / module_name(2)
    failed.mkdir(parents=True)
    (failed / "model.hlo_module.pb").write_bytes(b"hlo")
    (failed / "model.log").write_bytes(b"ERROR: compilation failed\n")
    locked = compile_module(mp, module_name(3), release_lock=False)  # its compiler still holds the lock
    no_done = mp / VERSION / module_name(4)
    no_done.mkdir()
    (no_done / "model.neff").write_bytes(b"neff without its done marker")
    # A complete module that kept a log of warnings, and a file deleted while still open (libfuse keeps it
    # as .fuse_hidden*: often a held lock) that holds it back until the holder lets go: then it is
    # published, without the log.
    noisy = compile_module(mp, module_name(5))
    (mp / noisy / "model.log").write_bytes(b"WARNING: something\n")
    hidden = mp / noisy / ".fuse_hidden0000000a00000001"
    hidden.write_bytes(b"x")
    time.sleep(2.5)  # debounce (1 s) and then some
    assert not (bucket_dir / noisy).exists()
    hidden.unlink()  # the last close: libfuse removes the hidden file

    wait_for((bucket_dir / noisy / "model.done").exists, 15, "the complete module in the bucket")
    time.sleep(2.5)  # debounce (1 s) and then some: whatever would be published has been
    assert bucket_files(hub, bucket["bucket_id"], noisy) == {*BODY, "model.done"}
    assert len(batch_calls(hub)) == 2  # nothing else was published
    for poison in (f"{VERSION}/{module_name(2)}", locked, f"{VERSION}/{module_name(4)}"):
        assert not (bucket_dir / poison).exists(), poison
    assert not (bucket_dir / "lock").exists()
    wait_for(lambda: state_of(mp)["publish"]["pending"] == 0, 5, "an empty queue")
    assert state_of(mp)["publish"]["published"] == 1


def test_permanent_failure_is_reported_once_and_pending_work_survives_a_remount(
    hub: HubEmulator, mounts: Mounts
) -> None:
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    hub.faults.add(BATCH, "status", status=403, methods=("POST",))
    handle = mounts("neff", bucket["bucket_id"], publish=True)
    mp = Path(handle.mountpoint)
    first = compile_module(mp, module_name(6))

    def failed() -> dict[str, str]:
        return {f["module"]: f["reason"] for f in state_of(mp)["publish"]["failed"]}

    wait_for(lambda: first in failed(), 15, "the failure in status")
    assert "write access" in failed()[first] and "token" in failed()[first]  # the fix is in the reason
    second = compile_module(mp, module_name(7))
    wait_for(lambda: second in failed(), 15, "the second module reported")
    time.sleep(2.5)
    assert batch_calls(hub) == [403]  # one refused call; never retried in a loop
    log = Path(state_of(mp)["log_file"]).read_text()
    assert log.count("publishing stopped") == 1
    mounts.unmount(handle)

    # Remounted with write access: pending work is derived from the local layer, both are published.
    hub.faults.clear()
    remounted = mounts("neff", bucket["bucket_id"], publish=True)
    for module in (first, second):
        wait_for((bucket_dir / module / "model.done").exists, 15, f"{module} in the bucket")
        assert (bucket_dir / module / "model.neff").read_bytes() == NEFF
    wait_for(lambda: state_of(Path(remounted.mountpoint))["publish"]["published"] == 2, 5, "status")
    assert state_of(Path(remounted.mountpoint))["publish"]["failed"] == []


def test_transient_failures_are_retried(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    hub.faults.add(BATCH, "status", status=503, count=2, methods=("POST",))
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True).mountpoint)
    module = compile_module(mp, module_name(8))
    wait_for((hub.bucket_dir(bucket["bucket_id"]) / module / "model.done").exists, 20, "the module in the bucket")
    assert batch_calls(hub) == [503, 503, 200, 200]  # two refused, then rest + marker
    assert (hub.bucket_dir(bucket["bucket_id"]) / module / "model.neff").read_bytes() == NEFF
    wait_for(lambda: state_of(mp)["publish"]["published"] == 1, 5, "status")
    assert state_of(mp)["publish"]["failed"] == []


def test_an_interrupted_publish_sends_only_what_is_missing(
    hub: HubEmulator, mounts: Mounts, seam_env: dict[str, str]
) -> None:
    bucket = build_neff_bucket(hub)
    env = dict(seam_env, HFFS_TEST_UPLOAD_FAIL="503@2")  # the done marker's call fails once
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True, env=env).mountpoint)
    module = compile_module(mp, module_name(11))
    wait_for((hub.bucket_dir(bucket["bucket_id"]) / module / "model.done").exists, 20, "the module in the bucket")
    assert uploads(env) == [sorted(f"{module}/{n}" for n in BODY), [f"{module}/model.done"], [f"{module}/model.done"]]
    assert batch_calls(hub) == [200, 200]  # the failed call never reached the Hub
    assert (hub.bucket_dir(bucket["bucket_id"]) / module / "model.neff").read_bytes() == NEFF


def test_a_failed_upload_is_retried_no_sooner_than_retry_after_says(
    hub: HubEmulator, mounts: Mounts, seam_env: dict[str, str]
) -> None:
    """The Hub refuses the first call with `Retry-After: 4` (once huggingface_hub's own retries are spent):
    the publisher's retry waits those 4 s, not its own first backoff (1 s)."""
    bucket = build_neff_bucket(hub)
    env = dict(seam_env, HFFS_TEST_UPLOAD_FAIL="503@1:4")
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True, env=env).mountpoint)
    module = compile_module(mp, module_name(13))
    wait_for((hub.bucket_dir(bucket["bucket_id"]) / module / "model.done").exists, 25, "the module in the bucket")
    body = sorted(f"{module}/{n}" for n in BODY)
    assert uploads(env) == [body, body, [f"{module}/model.done"]]
    first, retry = (json.loads(line)["time"] for line in Path(env["HFFS_TEST_UPLOAD_LOG"]).read_text().splitlines()[:2])
    assert retry - first >= 4.0, f"retried after {retry - first:.2f} s"
    wait_for(lambda: state_of(mp)["publish"]["published"] == 1, 5, "status")


def test_publisher_uploads_regular_files_only(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    """A client plants a symlink to a root-only file in a module being compiled: the publisher (push's code)
    never follows it and publishes the module's regular files."""
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True).mountpoint)
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    name = module_name(12)
    (mp / VERSION / name).mkdir(parents=True)
    os.symlink(secret, mp / VERSION / name / "wrapped_neff.hlo")
    module = compile_module(mp, name)
    wait_for((bucket_dir / module / "model.done").exists, 15, "the module in the bucket")
    assert bucket_files(hub, bucket["bucket_id"], module) == {*BODY, "model.done"}
    assert len(batch_calls(hub)) == 2


def test_already_published_module_is_not_uploaded_again(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    mp = Path(mounts("neff", bucket["bucket_id"], publish=True).mountpoint)
    existing = bucket["complete"][0]
    # Touching a remote module's file copies it up into the local layer: same files and sizes as the bucket.
    os.utime(mp / existing / "model.neff")
    (mp / existing / "model.done").write_bytes(b"")
    wait_for(lambda: state_of(mp)["publish"]["published"] == 1, 10, "the module found published")
    assert batch_calls(hub) == []


COLD_READER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    module = sys.argv[1]
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(module, "model.done")):  # the compiler's cache check
        assert time.monotonic() < deadline, "model.done never appeared"
        time.sleep(0.05)
    with open(os.path.join(module, "model.neff"), "rb") as f:
        print(hashlib.sha256(f.read()).hexdigest())
    """
)


def test_eight_processes_find_a_remote_module_complete_on_a_cold_mount(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    bucket = build_neff_bucket(hub)
    module = bucket["complete"][2]  # the 1 MiB NEFF
    neff = (hub.bucket_dir(bucket["bucket_id"]) / module / "model.neff").read_bytes()
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    hub.reset_stats()
    argv = [sys.executable, "-c", COLD_READER, str(mp / module)]
    outputs = run_parallel([argv] * 8, env=runtime_env, timeout=90)
    assert [o.strip() for o in outputs] == [hashlib.sha256(neff).hexdigest()] * 8
    assert hub.bytes_served(f"{module}/model.neff") == len(neff)  # one transfer for all eight


def test_corrupted_bucket_bytes_are_refetched_or_refused(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    once, always = bucket["complete"][1], bucket["complete"][2]
    mp = Path(mounts("neff", bucket["bucket_id"]).mountpoint)

    hub.faults.add(f"*/{once}/model.neff", "corrupt", count=1)
    assert (mp / once / "model.neff").read_bytes() == (bucket_dir / once / "model.neff").read_bytes()

    hub.faults.add(f"*/{always}/model.neff", "corrupt")
    with pytest.raises(OSError) as info:
        (mp / always / "model.neff").read_bytes()
    assert info.value.errno == errno.EIO
    hub.faults.clear()
    assert (mp / always / "model.neff").read_bytes() == (bucket_dir / always / "model.neff").read_bytes()


def test_listing_without_xet_hash_is_size_checked_with_one_warning(
    hub: HubEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = hub.add_bucket("org/old", {"a/one.bin": b"1" * 1000, "a/two.bin": b"2" * 2000})
    hub.add_listing_override(
        "org/old", [{"type": "file", "path": p, "size": n} for p, n in (("a/one.bin", 1000), ("a/two.bin", 2000))]
    )
    http = HubHttp(hub.url)
    bucket = Bucket(http, "org/old")
    store = BlobStore(tmp_path / "store")
    try:
        with caplog.at_level(logging.WARNING):
            entries = {e.name: e for e in bucket.list("a")} | {e.name: e for e in bucket.list("a")}
        assert all(e.digest is None for e in entries.values())
        assert caplog.text.count("without a xetHash") == 1
        one = entries["one.bin"]
        assert store.materialize(f"old-{one.name}-{one.size}", bucket, one).read_bytes() == b"1" * 1000
        (directory / "a" / "two.bin").write_bytes(b"2" * 1999)  # shorter than listed: refused
        two = entries["two.bin"]
        with pytest.raises(HffsError) as info:
            store.materialize(f"old-{two.name}-{two.size}", bucket, two)
        assert info.value.errno == errno.EIO
    finally:
        store.close()
        http.close()


def test_probes_of_one_module_are_single_flight(hub: HubEmulator) -> None:
    bucket_dir = hub.add_bucket("org/probe", {f"{VERSION}/{module_name(1)}/model.neff": b"n"})
    http = HubHttp(hub.url)
    bucket = Bucket(http, "org/probe")
    prober = NameProber(bucket, negative_ttl=0.3)
    listing = {e.name: e for e in bucket.list(VERSION)}
    assert prober.listing(VERSION, listing) is listing
    assert not prober.probe(VERSION, module_name(9))  # the listing is fresh: no probe
    (bucket_dir / VERSION / module_name(9)).mkdir()
    (bucket_dir / VERSION / module_name(9) / "model.neff").write_bytes(b"n9")
    time.sleep(0.4)
    hub.reset_stats()
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(prober.probe(VERSION, module_name(9)))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hub.requests("/tree/")) == 1  # one probe for sixteen lookups
    assert all(results) and len(results) == 16
    assert module_name(9) in prober.listing(VERSION, listing)
    assert not prober.probe(VERSION, module_name(10))  # another name, probed once, absent
    assert not prober.probe(VERSION, module_name(10))  # and not probed again within the negative TTL
    assert len(hub.requests("/tree/")) == 2
    http.close()


def test_a_file_replaced_upstream_after_it_was_listed_opens_with_the_new_bytes(
    hub: HubEmulator, tmp_path: Path
) -> None:
    """Two nodes publishing one module at once: the second upload replaces the first's `model.neff` in the
    bucket while a third node still lists the first's. Its open finds the bytes do not match the listed
    hash, asks the bucket again and opens what is there now (no EIO for the waiting compiler)."""
    from hffs_neuron.store.metacache import MetadataCache
    from hffs_neuron.views.neff import NeffView

    neff = f"{VERSION}/{module_name(20)}/model.neff"
    first, second = os.urandom(50_000), os.urandom(60_000)
    bucket_dir = hub.add_bucket("org/replaced", {neff: first})
    http = HubHttp(hub.url)
    store = BlobStore(tmp_path / "blobs")
    view = NeffView(Bucket(http, "org/replaced"), store, MetadataCache(), tmp_path / "layer")
    try:
        assert view.getattr(neff)["st_size"] == len(first)  # listed with the first upload's hash
        (bucket_dir / neff).write_bytes(second)  # the second upload lands
        handle = view.virtual_open(neff, view.virtual_lookup(neff))
        try:
            assert os.pread(handle.fd, len(second) + 1, 0) == second
        finally:
            handle.release()
        assert view.getattr(neff)["st_size"] == len(second)  # the cached listing follows
        assert len(hub.requests("/paths-info")) == 1  # asked the bucket once
    finally:
        view.close()
        store.close()
        http.close()


def test_a_copy_that_replaces_ours_after_it_was_published_is_a_conflict(hub: HubEmulator, mounts: Mounts) -> None:
    """Two nodes compile one module and both find it absent; if the other node's upload lands after ours
    was uploaded and re-listed, the re-list cannot see it. The event feed does: the node whose bytes lost
    reports the conflict (and keeps its copy local), as when the re-list finds it."""
    from huggingface_hub import HfApi

    bucket_id = build_neff_bucket(hub)["bucket_id"]
    hub.bucket_events.enabled = True
    node = Path(mounts("neff", bucket_id, publish=True).mountpoint)
    wait_for(lambda: state_of(node)["follow"] == "events", 10, "event mode")
    name = module_name(7)
    module = compile_module(node, name)
    wait_for(lambda: state_of(node)["publish"]["published"] == 1, 15, "our copy published")
    assert state_of(node)["publish"]["conflicts"] == []

    theirs = os.urandom(len(NEFF))
    HfApi(endpoint=hub.url).batch_bucket_files(bucket_id, add=[(theirs, f"{module}/model.neff")])
    wait_for(lambda: state_of(node)["publish"]["conflicts"], 10, "the conflict reported")
    (conflict,) = state_of(node)["publish"]["conflicts"]
    assert conflict["module"] == module and "model.neff differs" in conflict["reason"], conflict
    assert state_of(node)["publish"]["published"] == 0
    assert (node / module / "model.neff").read_bytes() == NEFF  # our copy stays ours, locally
    assert (hub.bucket_dir(bucket_id) / module / "model.neff").read_bytes() == theirs  # never overwritten back


def test_a_module_caught_mid_publish_is_asked_about_again_soon(hub: HubEmulator, mounts: Mounts) -> None:
    """Probe mode: a module whose files are in the bucket but not yet its done marker (the publisher's
    second call) is being published; a compiler polling `model.done` must not wait a whole probe window
    (here 7 s: `--negative-ttl 8` less the kernel's second) for the marker that follows within a second."""
    bucket = build_neff_bucket(hub)
    bucket_dir = hub.bucket_dir(bucket["bucket_id"])
    node = Path(mounts("neff", bucket["bucket_id"], negative_ttl=8).mountpoint)
    os.listdir(node / VERSION)
    name = module_name(9)
    module = bucket_dir / VERSION / name
    module.mkdir(parents=True)
    (module / "model.neff").write_bytes(NEFF)
    done = node / VERSION / name / "model.done"
    wait_for((node / VERSION / name / "model.neff").exists, 15, "the module, by a probe", interval=0.05)
    assert not done.exists()  # found mid-publish
    (module / "model.done").write_bytes(b"")
    started = time.monotonic()
    wait_for(done.exists, 15, "the done marker", interval=0.05)
    assert time.monotonic() - started < 4.0, "the done marker waited for the whole probe window"
    assert (node / VERSION / name / "model.neff").read_bytes() == NEFF


def test_many_names_of_one_version_directory_are_asked_about_in_one_listing(hub: HubEmulator) -> None:
    """Probe mode with many waiting compilers (or a fleet's pollers): one listing of the version directory
    answers them all for a window, instead of one probe per name, and still finds what arrived."""
    bucket_dir = hub.add_bucket("org/batch", {f"{VERSION}/{module_name(1)}/model.neff": b"n"})
    http = HubHttp(hub.url)
    bucket = Bucket(http, "org/batch")
    prober = NameProber(bucket, negative_ttl=0.5)
    listing = {e.name: e for e in bucket.list(VERSION)}
    prober.listing(VERSION, listing)
    time.sleep(0.6)
    hub.reset_stats()
    waited = [module_name(i) for i in range(10, 30)]
    for _round in range(3):
        assert not any(prober.probe(VERSION, name) for name in waited)
        time.sleep(0.6)
    probes = [r.path for r in hub.requests("/tree/")]
    # The first names are probed one by one; from the fourth on, one listing a window answers every name.
    assert len(probes) <= 3 + 3, probes
    assert sum(p.rstrip("/").endswith(f"/tree/{VERSION}") for p in probes) >= 2, probes

    (bucket_dir / VERSION / waited[-1]).mkdir()
    (bucket_dir / VERSION / waited[-1] / "model.neff").write_bytes(b"new")
    assert prober.probe(VERSION, waited[-1])  # the next listing finds it
    assert waited[-1] in prober.listing(VERSION, listing)
    http.close()


def test_compilers_polling_one_directory_through_an_outage_each_get_eio_within_the_bound(
    hub: HubEmulator, mounts: Mounts
) -> None:
    """The kernel sends lookups in one directory one at a time (libfuse 3.14 never grants parallel
    lookups), so 8 compilers polling 8 modules of one version directory while the bucket's listings stall
    would wait 8 deadlines one after another. After one probe there failed, the others fail at once for a
    second: every caller gets EIO (never ENOENT) within `--timeout` + 2 s."""
    bucket = build_neff_bucket(hub)
    node = Path(mounts("neff", bucket["bucket_id"], timeout=3, negative_ttl=2).mountpoint)
    os.listdir(node / VERSION)
    time.sleep(2.2)  # the listing is older than the probe window: lookups of missing names ask the bucket
    hub.faults.add("/api/buckets/*/tree/*", "stall")
    answers: list[tuple[str, float]] = []

    def poll(i: int) -> None:
        started = time.monotonic()
        try:
            os.stat(node / VERSION / module_name(100 + i) / "model.done")
            answers.append(("found", time.monotonic() - started))
        except OSError as exc:
            answers.append((errno.errorcode[exc.errno], time.monotonic() - started))

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [what for what, _ in answers] == ["EIO"] * 8, answers
    assert max(seconds for _, seconds in answers) <= 3 + 2, answers
