"""Event mode (issue 16 part 2): the bucket's event feed keeps a node's cached listings current, so a
module another node publishes shows within about a second, without relisting its version directory; a
deletion disappears the same way. Without the feed the node falls back to TTL + probes (status says
which). Two "nodes" would be two daemons; here the other node is the bucket itself, written through
`HfApi.batch_bucket_files` (Xet, against the emulator) or straight into the emulator's bucket directory.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from conftest import Mounts
from huggingface_hub import HfApi

from hffs_neuron.mount import status
from hffs_neuron.testing.emulator import events as events_module
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import COMPILER_VERSIONS, build_neff_bucket

pytestmark = pytest.mark.timeout(120)

VERSION = COMPILER_VERSIONS[0]
NEFF = os.urandom(200_000)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `predicate` until true; returns the seconds it took (fails the test after `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def follow_mode(mp: Path) -> str:
    (state,) = status(mp)
    return state["follow"]


def readable(path: Path) -> bool:
    try:
        return path.read_bytes() == NEFF
    except FileNotFoundError:
        return False


def gone(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def module_files(name: str) -> dict[str, bytes]:
    base = f"{VERSION}/{name}"
    return {
        f"{base}/model.hlo_module.pb": b"hlo " + name.encode(),
        f"{base}/model.neff": NEFF,
        f"{base}/model.done": b"",
    }


def test_event_mode_shows_new_and_deleted_modules_in_seconds(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    hub.bucket_events.enabled = True
    node_b = Path(mounts("neff", bucket_id, name="b", cache="cache-b").mountpoint)
    wait_for(lambda: follow_mode(node_b) == "events", 10, "event mode")
    listed = set(os.listdir(node_b / VERSION))  # node B has listed the version directory
    uploaded, written = "MODULE_uploaded+0000000a", "MODULE_written+0000000b"
    assert uploaded not in listed and not (node_b / VERSION / uploaded / "model.done").exists()
    assert not (node_b / VERSION / written / "model.neff").exists()
    hub.reset_stats()

    # Another node publishes through the Hub API (Xet upload, batch route).
    api = HfApi(endpoint=hub.url)
    api.batch_bucket_files(bucket_id, add=[(data, path) for path, data in module_files(uploaded).items()])
    seconds = wait_for(lambda: readable(node_b / VERSION / uploaded / "model.neff"), 10, "the uploaded module")
    assert seconds <= 2.0, f"node B read the uploaded module {seconds:.1f} s after it was published"
    assert (node_b / VERSION / uploaded / "model.done").exists()
    assert uploaded in os.listdir(node_b / VERSION)

    # A file written straight into the bucket (found by the emulator's directory poll).
    bucket_dir = hub.bucket_dir(bucket_id)
    for path, data in module_files(written).items():
        (bucket_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (bucket_dir / path).write_bytes(data)
    seconds = wait_for(lambda: readable(node_b / VERSION / written / "model.neff"), 10, "the written module")
    assert seconds <= 2.0, f"node B read the written module {seconds:.1f} s after it appeared"

    # The version directory was never listed again: the feed edited the cached listing.
    assert [r for r in hub.requests("/tree/") if r.path.rstrip("/").endswith(f"/tree/{VERSION}")] == []

    # A deletion disappears, kernel caches included (node B has the file's entry cached).
    api.batch_bucket_files(bucket_id, delete=list(module_files(uploaded)))
    seconds = wait_for(lambda: gone(node_b / VERSION / uploaded / "model.neff"), 10, "the deletion")
    assert seconds <= 2.0, f"the deleted module stayed {seconds:.1f} s on node B"
    wait_for(lambda: gone(node_b / VERSION / uploaded), 2, "the emptied module directory")
    with pytest.raises(OSError) as raised:
        (node_b / VERSION / uploaded / "model.neff").read_bytes()
    assert raised.value.errno == errno.ENOENT
    assert uploaded not in os.listdir(node_b / VERSION)
    assert follow_mode(node_b) == "events"


def test_a_module_shows_at_once_to_a_compiler_that_just_missed_it(hub: HubEmulator, mounts: Mounts) -> None:
    """A compiler polling `model.done` of a module another node is publishing leaves a "not found" in the
    kernel (up to a second). The feed's change must drop it, not wait it out: the module shows to the
    poller as soon as the daemon has applied the change."""
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    bucket_dir = hub.bucket_dir(bucket_id)
    (bucket_dir / "marker.txt").write_bytes(b"1")
    hub.bucket_events.enabled = True
    node = Path(mounts("neff", bucket_id).mountpoint)
    wait_for(lambda: follow_mode(node) == "events", 10, "event mode")
    assert os.stat(node / "marker.txt").st_size == 1  # cached by the kernel (attributes kept 60 s)
    name = "MODULE_polled+0000000c"
    done = node / VERSION / name / "model.done"
    assert not done.exists()  # the kernel now holds a "not found" for the module's name

    for path, data in module_files(name).items():
        (bucket_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (bucket_dir / path).write_bytes(data)
    (bucket_dir / "marker.txt").write_bytes(b"22")  # after the module: its change is applied last
    wait_for(lambda: os.stat(node / "marker.txt").st_size == 2, 10, "the feed's change of marker.txt")
    assert done.exists(), "the kernel still hid the module after the daemon applied its arrival"
    assert (node / VERSION / name / "model.neff").read_bytes() == NEFF


def test_without_the_feed_the_node_falls_back_to_probes(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)
    bucket_id = bucket["bucket_id"]
    hub.bucket_events.enabled = True
    negative_ttl = 3.0
    node_b = Path(mounts("neff", bucket_id, name="b", cache="cache-b", negative_ttl=negative_ttl).mountpoint)
    wait_for(lambda: follow_mode(node_b) == "events", 10, "event mode")
    os.listdir(node_b / VERSION)

    hub.bucket_events.enabled = False  # the Hub stops serving the feed: sessions end, new ones get 404
    wait_for(lambda: follow_mode(node_b) == "probe", 10, "probe mode")
    name = "MODULE_probed+0000000c"
    assert not (node_b / VERSION / name / "model.done").exists()
    bucket_dir = hub.bucket_dir(bucket_id)
    for path, data in module_files(name).items():
        (bucket_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (bucket_dir / path).write_bytes(data)
    seconds = wait_for(lambda: readable(node_b / VERSION / name / "model.neff"), 15, "the module by probes", 0.2)
    # --negative-ttl + 1 s, and a second of margin for a loaded 2-core machine.
    assert seconds <= negative_ttl + 2.0, f"node B saw the module {seconds:.1f} s after it appeared"
    assert follow_mode(node_b) == "probe"


def test_feed_not_served_means_probe_mode(hub: HubEmulator, mounts: Mounts) -> None:
    bucket = build_neff_bucket(hub)  # the emulator's feed is off: /events answers 404
    node = Path(mounts("neff", bucket["bucket_id"]).mountpoint)
    time.sleep(1.0)
    assert follow_mode(node) == "probe"
    assert [r.status for r in hub.requests("/events")] == [404]
    node_off = Path(mounts("neff", bucket["bucket_id"], name="off", cache="cache-off", follow_events=False).mountpoint)
    hub.bucket_events.enabled = True
    time.sleep(1.0)
    assert follow_mode(node_off) == "probe"
    assert len(hub.requests("/events")) == 1  # --no-follow-events never asks


def test_changes_edit_cached_listings_under_a_prefix(hub: HubEmulator, tmp_path: Path) -> None:
    """The view without FUSE: a mount of a prefix applies the changes below it (and only those), a deleted
    module's emptied directory goes from its version's listing, and the changed paths are invalidated."""
    from hffs_neuron.remote.bucket import Bucket
    from hffs_neuron.remote.http import HubHttp
    from hffs_neuron.store.blobstore import BlobStore
    from hffs_neuron.store.metacache import MetadataCache
    from hffs_neuron.views.neff import NeffView
    from hffs_neuron.views.neff_follow import EventFollow

    old = f"trn1/{VERSION}/MODULE_old+00000001/model.neff"
    bucket_dir = hub.add_bucket("org/events", {old: b"n", f"trn1/{VERSION}/MODULE_old+00000001/model.done": b""})
    hub.bucket_events.enabled = True
    http = HubHttp(hub.url)
    store = BlobStore(tmp_path / "blobs")
    view = NeffView(Bucket(http, "org/events", "trn1"), store, MetadataCache(), tmp_path / "layer")
    invalidated: list[str] = []
    follow = EventFollow(view, view.remote, hub.url, invalidated.append)
    view.events_live = follow.live
    follow.start()
    try:
        wait_for(follow.live, 10, "a live session")
        assert dict(view.readdir(VERSION)).keys() == {"MODULE_old+00000001"}
        new = f"{VERSION}/MODULE_new+00000002"
        for name in ("model.neff", "model.done"):
            (bucket_dir / "trn1" / new).mkdir(parents=True, exist_ok=True)
            (bucket_dir / "trn1" / new / name).write_bytes(b"new")
        (bucket_dir / "other").mkdir()
        (bucket_dir / "other" / "outside.neff").write_bytes(b"x")  # outside the prefix: ignored
        hub.reset_stats()
        wait_for(lambda: "MODULE_new+00000002" in dict(view.readdir(VERSION)), 5, "the new module listed")
        assert view.getattr(f"{new}/model.neff")["st_size"] == 3
        assert f"{new}/model.neff" in invalidated and VERSION in invalidated and "" in invalidated
        assert "other" not in dict(view.readdir(""))
        # Nothing was listed: not the version directory, nor the new module (its listing came from the
        # feed: a directory the cached listing lacked is new, so the feed holds all of it).
        assert hub.requests("/tree/") == []
        assert dict(view.readdir(new)).keys() == {"model.neff", "model.done"}
        assert hub.requests("/tree/") == []

        (bucket_dir / old).unlink()
        (bucket_dir / "trn1" / VERSION / "MODULE_old+00000001" / "model.done").unlink()
        wait_for(lambda: "MODULE_old+00000001" not in dict(view.readdir(VERSION)), 5, "the deleted module gone")
        with pytest.raises(OSError) as raised:
            view.getattr(f"{VERSION}/MODULE_old+00000001/model.neff")
        assert raised.value.errno == errno.ENOENT
        assert follow.mode() == "events"
    finally:
        follow.close()
        view.close()
        store.close()
        http.close()


class EventSession:
    """A raw session of the emulator's feed, read line by line (its wire format)."""

    def __init__(self, hub: HubEmulator, bucket_id: str, query: str = "") -> None:
        url = urlsplit(hub.url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)  # 10 s per read at most
        headers = {"Accept": "text/event-stream"}
        self.conn.request("GET", f"/api/buckets/{bucket_id}/events{query}", headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200 and self.response.getheader("Content-Type") == "text/event-stream"

    def until(self, *names: str) -> list[tuple[str, dict]]:
        """The next events, up to and including the first one named in `names`."""
        events, name = [], ""
        while True:
            raw = self.response.fp.readline()
            assert raw, "the session ended"
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
                if name in names:
                    return events

    def close(self) -> None:
        self.conn.close()


def read_events(hub: HubEmulator, bucket_id: str, query: str = "") -> list[tuple[str, dict]]:
    """The events of one session up to its `ready` (or `reset`)."""
    session = EventSession(hub, bucket_id, query)
    try:
        return session.until("ready", "reset")
    finally:
        session.close()


def test_feed_serves_many_sessions_with_one_scan_per_poll(hub: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet follows one bucket: 16 live sessions all get each change, and the bucket's directory is
    scanned once per poll interval, not once per session."""
    directory = hub.add_bucket("org/fleet", {"a/one": b"1"})
    hub.bucket_events.enabled = True
    scans: list[float] = []
    snapshot = events_module._snapshot
    monkeypatch.setattr(events_module, "_snapshot", lambda d: scans.append(time.monotonic()) or snapshot(d))
    sessions = [EventSession(hub, "org/fleet") for _ in range(16)]
    try:
        for session in sessions:
            assert session.until("ready") == [("ready", {})]
        scans.clear()
        time.sleep(2.0)  # idle: every session polls
        assert len(scans) <= 2.0 / events_module.POLL_INTERVAL + 3, f"{len(scans)} scans in 2 s for 16 sessions"
        (directory / "a" / "two").write_bytes(b"22")
        batches = [session.until("changes") for session in sessions]
        assert {json.dumps(b, sort_keys=True) for b in batches} == {json.dumps(batches[0], sort_keys=True)}
        ((_name, payload),) = batches[0]
        assert [(c["path"], c["op"], c["size"]) for c in payload["changes"]] == [("a/two", "add", 2)]
    finally:
        for session in sessions:
            session.close()


def test_feed_replays_from_a_cursor_or_an_instant(hub: HubEmulator) -> None:
    directory = hub.add_bucket("org/replay", {"a/one": b"1"})
    hub.bucket_events.enabled = True
    assert read_events(hub, "org/replay") == [("ready", {})]  # nothing changed since following began
    (directory / "a" / "two").write_bytes(b"22")
    (directory / "a" / "one").unlink()
    (ready,) = read_events(hub, "org/replay")  # live only: the changes are before this session
    cursor = ready[1]["cursor"]
    replayed = read_events(hub, "org/replay", "?cursor=0")
    assert [name for name, _ in replayed] == ["changes", "ready"]
    changes = {c["path"]: c for c in replayed[0][1]["changes"]}
    assert changes["a/one"] == {"path": "a/one", "op": "delete"}
    assert changes["a/two"]["op"] == "add" and changes["a/two"]["size"] == 2 and len(changes["a/two"]["xetHash"]) == 64
    assert replayed[0][1]["cursor"] == cursor == replayed[1][1]["cursor"]
    assert read_events(hub, "org/replay", f"?cursor={cursor}") == [("ready", {"cursor": cursor})]
    assert [n for n, _ in read_events(hub, "org/replay", "?since=2000-01-01T00:00:00Z")] == ["changes", "ready"]
    assert {r.status for r in hub.requests("/events")} == {200}
    hub.bucket_events.enabled = False
    response = httpx2.get(f"{hub.url}/api/buckets/org/replay/events", timeout=10)
    assert response.status_code == 404  # switched off: not served


def test_overlapping_scans_report_only_what_the_bucket_did(hub: HubEmulator) -> None:
    """Uploads of several nodes at once each scan the bucket (and sessions poll it meanwhile): whatever
    the overlap, the feed reports no change the bucket did not make (a file that was never deleted
    reported deleted hides it on every node until its listing expires) and ends on the bucket's files."""
    directory = hub.add_bucket("org/race", {"a/zero": b"0"})
    hub.bucket_events.enabled = True
    assert read_events(hub, "org/race") == [("ready", {})]

    def uploader(k: int) -> None:
        for i in range(60):
            (directory / "a" / f"n{k}-{i}").write_bytes(os.urandom(20_000 + i))
            hub.bucket_events.scan(directory)

    threads = [threading.Thread(target=uploader, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    hub.bucket_events.scan(directory)
    changes = [c for name, payload in read_events(hub, "org/race", "?cursor=0")[:-1] for c in payload["changes"]]
    assert [c["path"] for c in changes if c["op"] == "delete"] == []
    assert {c["path"] for c in changes} | {"a/zero"} == {f"a/{p.name}" for p in (directory / "a").iterdir()}
