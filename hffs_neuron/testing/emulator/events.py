"""The bucket event feed: ``GET /api/buckets/{id}/events`` (server-sent events), as huggingface_hub's
``BucketFollower`` reads it.

Events: ``changes`` (``{cursor, changes: [{path, op, size, xetHash, mtime, uploadedAt}]}``, op ``add``,
``update`` or ``delete``), ``ready`` (``{cursor?}``: replay done, live from here), ``reset`` (the resume
point is older than the replay buffer) and ``reconnect`` (``{cursor}``: the server ends the session).
A session resumes strictly after ``?cursor=``, or replays the changes since ``?since=<ISO8601>``.

Changes are found by comparing snapshots of a bucket's directory (size, mtime): a write through the
batch route is recorded at once, a file written straight into the directory within one poll (while a
client follows). However many sessions follow a bucket (a fleet: one per node), its directory is
scanned at most once per poll interval, and each batch of changes is hashed once for all of them.
Off by default (most tests exercise probe mode): ``hub.bucket_events.enabled = True`` serves it; switching
it off ends open sessions, and new ones get 404.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hffs_neuron.testing.emulator.protocol import NOT_FOUND, EmulatorHub, HubError, Request, Response, iso

POLL_INTERVAL = 0.2  # seconds between directory scans while a client follows
KEEPALIVE = 5.0  # seconds between keep-alive comments (the Hub pings every ~30 s; shorter frees threads sooner)
SESSION = 300.0  # a session ends with `reconnect` after this long, as the Hub's pods rotate
REPLAY_BATCHES = 10_000  # change batches kept for resuming; older cursors get `reset`


@dataclass
class _Feed:
    snapshot: dict[str, tuple[int, int]]  # path -> (size, mtime_ns)
    batches: deque = field(default_factory=lambda: deque(maxlen=REPLAY_BATCHES))  # (seq, time, changes)
    seq: int = 0
    updated: float = field(default_factory=time.time)
    polled: float = field(default_factory=time.monotonic)  # when a session's poll last scanned it


class BucketEvents:
    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub
        self.enabled = False
        self._cond = threading.Condition()
        # One scan at a time, from its snapshot to its batch: two overlapping scans (a batch upload and a
        # session's poll) could otherwise record a change out of order, or take back a file another just
        # added (the older snapshot stored last), and the feed would end on a state the bucket is not in.
        self._scanning = threading.Lock()
        self._feeds: dict[Path, _Feed] = {}

    def clear(self) -> None:
        with self._cond:
            self._feeds.clear()
            self.enabled = False
            self._cond.notify_all()

    def updated_at(self, directory: Path) -> str:
        """The bucket's ``updatedAt``: its last recorded change (the resume point of a reconcile)."""
        with self._cond:
            feed = self._feeds.get(directory)
        return iso(feed.updated if feed else directory.stat().st_mtime)

    def scan(self, directory: Path, *, poll: bool = False) -> None:
        """Record what changed in `directory` since the last scan (nothing before the first one).

        `poll`: a following session's idle poll, skipped if another session's poll scanned within the
        poll interval (N sessions cost one scan per interval, not N).
        """
        if poll:
            with self._cond:
                feed = self._feeds.get(directory)
                if feed is None or time.monotonic() - feed.polled < POLL_INTERVAL:
                    return
                feed.polled = time.monotonic()
        with self._scanning:
            snapshot = _snapshot(directory)
            with self._cond:
                feed = self._feeds.get(directory)
                if feed is None:
                    self._feeds[directory] = _Feed(snapshot)
                    return
                changes = []
                for path, (size, mtime_ns) in snapshot.items():
                    old = feed.snapshot.get(path)
                    if old != (size, mtime_ns):
                        changes.append((path, "add" if old is None else "update"))
                changes += [(path, "delete") for path in feed.snapshot.keys() - snapshot.keys()]
                feed.snapshot = snapshot
                if not changes:
                    return
            items = [self._item(directory, path, op) for path, op in sorted(changes)]  # sessions keep serving
            with self._cond:
                feed.seq += 1
                feed.updated = time.time()
                feed.batches.append((feed.seq, feed.updated, items))
                self._cond.notify_all()

    def _item(self, directory: Path, path: str, op: str) -> dict[str, Any]:
        if op == "delete":
            return {"path": path, "op": op}
        target = directory / path
        try:
            st = target.stat()
            xet_hash = self.hub.buckets.content_hash(target, st)
        except OSError:  # gone again meanwhile: the next scan reports the deletion
            return {"path": path, "op": op}
        return {
            "path": path,
            "op": op,
            "size": st.st_size,
            "xetHash": xet_hash,
            "mtime": iso(st.st_mtime),
            "uploadedAt": iso(st.st_mtime),
        }

    def route(self, directory: Path, req: Request) -> Response:
        """``GET /api/buckets/{id}/events``."""
        if not self.enabled:
            raise HubError(404, None, NOT_FOUND)
        self.scan(directory)  # the baseline of a bucket nobody followed yet
        cursor, since = req.param("cursor"), req.param("since")
        with self._cond:
            feed = self._feeds[directory]
            oldest = feed.batches[0][0] if feed.batches else feed.seq + 1
            if cursor:
                if not cursor.isdigit() or int(cursor) > feed.seq:
                    raise HubError(400, None, f"invalid cursor {cursor!r}")
                after = int(cursor)
                stale = after + 1 < oldest and after < feed.seq
            elif since:
                try:
                    instant = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    raise HubError(400, None, f"invalid since {since!r}") from None
                after = max((seq for seq, at, _ in feed.batches if at < instant), default=oldest - 1)
                stale = False
            else:
                after, stale = feed.seq, False
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return Response(200, headers, stream=self._session(directory, after, stale))

    def _session(self, directory: Path, after: int, stale: bool) -> Iterator[bytes]:
        if stale:
            yield _event("reset", {"reason": "cursor older than the replay buffer"})
            return
        feed = self._feeds.get(directory)
        if feed is None:  # the emulator was reset meanwhile
            return
        with self._cond:
            replay = [b for b in feed.batches if b[0] > after]
        for seq, _at, items in replay:
            yield _event("changes", {"cursor": str(seq), "changes": items})
            after = seq
        yield _event("ready", {"cursor": str(after)} if after else {})
        started = pinged = time.monotonic()
        stop = self.hub.stop_event
        while not stop.is_set():
            if not self.enabled or self._feeds.get(directory) is not feed:
                return  # switched off or reset: the client's next request learns why
            if time.monotonic() - started > SESSION:
                yield _event("reconnect", {"cursor": str(after)})
                return
            with self._cond:
                fresh = [b for b in feed.batches if b[0] > after]
                if not fresh:
                    self._cond.wait(POLL_INTERVAL)
            for seq, _at, items in fresh:
                yield _event("changes", {"cursor": str(seq), "changes": items})
                after = seq
            if not fresh:
                self.scan(directory, poll=True)
                if time.monotonic() - pinged > KEEPALIVE:
                    pinged = time.monotonic()
                    yield b": ping\n\n"


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            out[os.path.relpath(full, directory).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return out


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()
