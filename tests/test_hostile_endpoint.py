"""A hostile or broken Hub endpoint: endless `next` links, answers that never come, 206 answers for the
wrong range, malformed commit and object ids, names JSON allows but a filesystem cannot show.

The crafted answers come from a small HTTP server in this file (the emulator speaks the Hub correctly);
each test asserts what the user sees: an error within the deadline, bytes equal, entries dropped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.errors import HffsError, RemoteUnavailable
from hffs_neuron.remote import HubHttp, HubRepo, is_safe_path
from hffs_neuron.testing.hub_emulator import HubEmulator

SHA = "c0ffee" + "0" * 34
Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CraftedServer

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        self.server.authorizations.append(self.headers.get("Authorization"))
        self.server.route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_json(self, obj: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def stall(self) -> None:
        """Never answer (until the test ends)."""
        self.server.released.wait(120)
        self.close_connection = True


class CraftedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, route: Route):
        super().__init__(("127.0.0.1", 0), Handler)
        self.route = route
        self.seen: list[str] = []
        self.authorizations: list[str | None] = []
        self.released = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up (deadlines) reset connections: expected here, not worth a traceback


@pytest.fixture
def crafted() -> Iterator[Callable[[Route], CraftedServer]]:
    """`crafted(route) -> server`: serve every GET with `route(handler)` on a local port."""
    servers: list[CraftedServer] = []

    def start(route: Route) -> CraftedServer:
        server = CraftedServer(route)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.released.set()
        server.shutdown()
        server.server_close()


def endless_tree(server_url: Callable[[], str]) -> Route:
    """Repo `a/b` at SHA whose tree listing never ends: every page links to one more."""

    def route(h: Handler) -> None:
        if "/revision/" in h.path:
            h.send_json({"id": "a/b", "sha": SHA})
        elif f"/tree/{SHA}" in h.path:
            page = int(re.search(r"cursor=(\d+)", h.path).group(1)) if "cursor=" in h.path else 0
            link = f'<{server_url()}/api/models/a/b/tree/{SHA}?cursor={page + 1}>; rel="next"'
            h.send_json([{"type": "file", "path": f"f{page}", "oid": "1" * 40, "size": 1}], {"Link": link})
        else:
            h.send_error(404)

    return route


def client(url: str, token: str = "", **options: object) -> HubHttp:
    settings: dict = dict(connect_timeout=1, read_timeout=1, operation_timeout=3, max_retries=2)
    settings.update(options)
    return HubHttp(url, token, **settings)


# -- listings and waits: bounded ---------------------------------------------------------------------


def test_a_stalled_page_ends_the_listing_within_its_own_deadline(crafted: Callable[[Route], CraftedServer]) -> None:
    """Each page of a listing has its own deadline (issue 31): pages that keep coming are followed (up to
    the page cap, below), and the first page that stalls ends the listing within one deadline."""

    def route(h: Handler) -> None:
        if "cursor=3" in h.path:
            h.stall()
        else:
            endless_tree(lambda: server.url)(h)

    server = crafted(route)
    repo = HubRepo(client(server.url, operation_timeout=2), "model", "a/b")
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable, match="tree"):
        repo.files()
    assert time.monotonic() - started < 2 + 1.5  # the stalled page's deadline, not the listing's length
    assert len([p for p in server.seen if "cursor=3" in p]) >= 2  # the same page retried (its cursor kept)


def test_endless_next_links_stop_at_the_page_cap(crafted: Callable[[Route], CraftedServer]) -> None:
    server = crafted(endless_tree(lambda: server.url))
    repo = HubRepo(client(server.url, operation_timeout=60, max_listing_pages=5), "model", "a/b")
    with pytest.raises(HffsError, match="more than 5 pages"):
        repo.files()
    assert len([p for p in server.seen if "/tree/" in p]) == 5


def test_next_link_to_another_origin_never_gets_the_token(crafted: Callable[[Route], CraftedServer]) -> None:
    """Only the endpoint gets our token: a `next` link elsewhere is followed without it."""
    elsewhere = crafted(lambda h: h.send_json([{"type": "file", "path": "g.txt", "oid": "2" * 40, "size": 1}]))
    server = crafted(endless_tree(lambda: elsewhere.url))
    repo = HubRepo(client(server.url, token="hf_secret_token"), "model", "a/b")
    assert sorted(e.path for e in repo.files()) == ["f0", "g.txt"]
    assert server.authorizations and all(a == "Bearer hf_secret_token" for a in server.authorizations)
    assert elsewhere.authorizations == [None]


@pytest.mark.timeout(120)
def test_fuse_calls_return_an_error_within_the_deadline(
    crafted: Callable[[Route], CraftedServer], mounts: Mounts, tmp_path: Path
) -> None:
    """A listing that never ends and a repo lookup that is never answered: every FUSE call, including
    the ones waiting on the same metadata entry or the same tree, returns an error, none hangs."""
    deadline = 3.0

    def route(h: Handler) -> None:
        if "/api/models/slow/" in h.path.lower():
            h.stall()
        else:
            endless_tree(lambda: server.url)(h)

    server = crafted(route)
    # Each page has its own deadline (issue 31): what ends a listing whose pages keep coming is the page cap.
    env = dict(mounts.env, HFFS_MAX_LISTING_PAGES="20")
    handle = mounts("hub-cache", endpoint=server.url, timeout=deadline, log_file=str(tmp_path / "hub.log"), env=env)
    root = Path(handle.mountpoint)
    outcomes: dict[str, tuple[int | None, float]] = {}

    def call(name: str, fn: Callable[[], object]) -> None:
        started = time.monotonic()
        try:
            fn()
            outcomes[name] = (None, time.monotonic() - started)
        except OSError as exc:
            outcomes[name] = (exc.errno, time.monotonic() - started)

    calls = {
        # Two case variants of one never-answered repo: one resolves, the other waits on its entry.
        "stat slow": lambda: os.stat(root / "models--slow--repo"),
        "stat SLOW": lambda: os.stat(root / "models--SLOW--REPO"),
        # Two listings of one endless tree: one lists, the other waits for the tree.
        "ls snapshot": lambda: os.listdir(root / "models--a--b" / "snapshots" / SHA),
        "ls snapshot again": lambda: os.listdir(root / "models--A--B" / "snapshots" / SHA),
    }
    threads = [threading.Thread(target=call, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == sorted(calls), "a FUSE call hung"
    for name, (code, elapsed) in outcomes.items():
        assert code == errno.EIO, (name, code)
        # Each call costs at most two deadlines (a wait for the caller ahead of it, then its own try);
        # the kernel may run lookups in one directory one after another.
        assert elapsed < len(calls) * 2 * deadline + 5, (name, elapsed)


# -- ranges ------------------------------------------------------------------------------------------

DATA = bytes(range(256)) * 64  # 16 KiB, every offset distinguishable


def range_server(answers: list[str]) -> Route:
    """Serve DATA with Range; each request takes the next behaviour from `answers` (the last repeats):
    "ok", "shifted" (206 with the right length from another offset, as its Content-Range says) or
    "truncated" (the right headers, half the body, then the connection closes)."""
    lock = threading.Lock()

    def route(h: Handler) -> None:
        with lock:
            behaviour = answers.pop(0) if len(answers) > 1 else answers[0]
        first, last = (int(x) for x in re.match(r"bytes=(\d+)-(\d+)", h.headers["Range"]).groups())
        if behaviour == "shifted":
            first, last = first // 2, first // 2 + (last - first)  # same length, wrong place
        body = DATA[first : last + 1]
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if behaviour == "truncated":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
        else:
            h.wfile.write(body)

    return route


def fetch(http: HubHttp, url: str, start: int, end: int) -> tuple[bytes, set[int]]:
    """Bytes [start, end) as placed by the sink, and every offset the sink was handed."""
    buf = bytearray(end - start)
    offsets: set[int] = set()

    def sink(offset: int, data: bytes) -> None:
        offsets.add(offset)
        buf[offset - start : offset - start + len(data)] = data

    http.stream_range(url, start, end, sink, "read f.bin", time.monotonic() + 10)
    return bytes(buf), offsets


def test_206_for_the_wrong_range_is_never_written(crafted: Callable[[Route], CraftedServer]) -> None:
    server = crafted(range_server(["shifted"]))
    http = client(server.url, max_retries=2)
    written: list[int] = []
    with pytest.raises(RemoteUnavailable, match="206 answer for bytes"):
        http.stream_range(f"{server.url}/f.bin", 4096, 8192, lambda o, d: written.append(o), "read f.bin")
    assert written == []  # retried, and nothing of a wrong answer reached the file
    assert len(server.seen) == 3


def test_206_for_the_wrong_range_on_resume_is_retried(crafted: Callable[[Route], CraftedServer]) -> None:
    """First answer cut short; the resumed request is answered from the wrong offset; then correctly."""
    server = crafted(range_server(["truncated", "shifted", "ok"]))
    data, _ = fetch(client(server.url, max_retries=4), f"{server.url}/f.bin", 4096, 12288)
    assert data == DATA[4096:12288]
    assert len(server.seen) == 3


# -- ids and names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sha", ["../../../../etc", SHA.upper(), SHA[:39], SHA + "0", 42, None])
def test_malformed_commit_id_fails_the_resolution(crafted: Callable[[Route], CraftedServer], sha: object) -> None:
    server = crafted(lambda h: h.send_json({"id": "a/b", "sha": sha}))
    with pytest.raises(HffsError, match="invalid commit id"):
        HubRepo(client(server.url), "model", "a/b")


@pytest.mark.timeout(120)
def test_crafted_object_ids_never_become_symlink_targets(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    commit = hub.add_repo("Org/Crafted", {"ok.txt": b"fine\n"})
    hub.add_listing_override(
        "Org/Crafted",
        [
            {"type": "file", "path": "a.bin", "oid": "1" * 40, "size": 4, "lfs": {"oid": "../../../../etc/hostname"}},
            {"type": "file", "path": "b.txt", "oid": "../../../../etc/passwd", "size": 4},
            {"type": "file", "path": "c.txt", "oid": "A" * 40, "size": 4},
            {"type": "file", "path": "d.bin", "oid": "2" * 40, "size": 4, "lfs": {"oid": "a" * 63, "size": 4}},
            {"type": "file", "path": "e.txt", "oid": ["x"], "size": 4},
        ],
        repo_type="model",
    )
    log = tmp_path / "hub.log"
    handle = mounts("hub-cache", log_file=str(log))
    repo = Path(handle.mountpoint) / "models--Org--Crafted"
    snapshot = repo / "snapshots" / commit
    assert os.listdir(snapshot) == ["ok.txt"]
    assert (snapshot / "ok.txt").read_bytes() == b"fine\n"
    assert re.fullmatch(r"\.\./\.\./blobs/[0-9a-f]{40}", os.readlink(snapshot / "ok.txt"))
    assert all(re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name) for name in os.listdir(repo / "blobs"))
    assert "invalid" in log.read_text()


def test_lone_surrogate_is_not_a_safe_name() -> None:
    assert not is_safe_path("dir/bad\ud800name")
    assert not is_safe_path("\udcff")
    assert is_safe_path("dir/caf\u00e9")


@pytest.mark.timeout(120)
def test_lone_surrogate_drops_one_entry_and_serves_the_rest(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    commit = hub.add_repo("Org/Names", {"ok.txt": b"fine\n"})
    bad = {"type": "file", "path": "bad\ud800name.txt", "oid": "1" * 40, "size": 4}
    hub.add_listing_override("Org/Names", [bad], repo_type="model")
    hub.add_bucket("org/names", {"neuronxcc-1/MODULE_a/model.neff": b"NEFF", "neuronxcc-1/MODULE_a/model.done": b""})
    hub.add_listing_override(
        "org/names", [{"type": "file", "path": "neuronxcc-1/MODULE_a/x\udc80", "size": 1, "xetHash": "ab" * 32}]
    )
    log = tmp_path / "hub.log"
    hub_mount = mounts("hub-cache", name="hub", log_file=str(log))
    snapshot = Path(hub_mount.mountpoint) / "models--Org--Names" / "snapshots" / commit
    assert os.listdir(snapshot) == ["ok.txt"]
    assert (snapshot / "ok.txt").read_bytes() == b"fine\n"
    neff = mounts("neff", "org/names", name="neff", log_file=str(tmp_path / "neff.log"))
    module = Path(neff.mountpoint) / "neuronxcc-1" / "MODULE_a"
    assert sorted(os.listdir(module)) == ["model.done", "model.neff"]
    assert (module / "model.neff").read_bytes() == b"NEFF"
