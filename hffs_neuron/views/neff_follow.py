"""Event mode: the bucket's event feed keeps the NEFF view's cached listings current.

huggingface_hub's `BucketFollower` owns the stream (`GET /api/buckets/{id}/events`: resume points,
reconnects with capped backoff, and its own end when the feed is not served or keeps failing before it
is ready). Each batch of changes edits the cached listings of the affected directories (a module another
node published shows in its version directory without a relist of 10,000 modules) and drops the
kernel's cached attributes of the changed paths. While no session is live (feed not served, stream
broken, between reconnects) the view falls back to TTL + probes: `mode()` says which is active.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from huggingface_hub._bucket_live_follow import BucketEventsUnavailable, BucketFileChange, BucketFollower

from .. import supervision
from ..remote.base import RemoteEntry
from ..remote.bucket import Bucket
from .neff import NeffView

logger = logging.getLogger(__name__)

MAX_FAILED_SESSIONS = 8  # sessions in a row ending in errors (backoff 10 s doubling to 80 s: ~8 minutes)


class _Follower(BucketFollower):
    """`subscribed` here means "the current session is live" (the library's: "some session was"), so a
    broken stream falls back to probes until the next session is ready. Sessions failing with errors are
    retried with the library's capped backoff, at most `MAX_FAILED_SESSIONS` times in a row: then the
    mount stays in probe mode (the library itself retries such errors forever)."""

    failures = 0
    closing = False

    def _follow_once(self) -> bool:
        try:
            healthy = super()._follow_once()
        except BucketEventsUnavailable:
            raise
        except Exception as exc:
            self.failures += 1
            if self.failures >= MAX_FAILED_SESSIONS:
                logger.warning("bucket %s: event feed failed %d times (%s)", self.bucket_id, self.failures, exc)
                self.stop()
            raise
        finally:
            self.subscribed = False
        if healthy:
            self.failures = 0
        return healthy

    def run(self) -> None:
        try:
            with supervision.watched("hffs-follow"):
                super().run()
        finally:
            if not self.closing:
                logger.info("bucket %s: not following its event feed; probe mode (TTL + probes)", self.bucket_id)


class EventFollow:
    def __init__(
        self,
        view: NeffView,
        bucket: Bucket,
        endpoint: str,
        invalidate: Callable[[str], None],
        on_change: Callable[[str, RemoteEntry], None] | None = None,
    ):
        """`invalidate(path)` drops the kernel's caches of a path; `on_change(path, entry)` hears of every
        file added or changed upstream (the publisher: another copy replacing one it published)."""
        self.view = view
        self.bucket = bucket
        self.invalidate = invalidate
        self.on_change = on_change
        self.applied = 0  # file changes applied to cached listings
        self._closed = False
        self._started = False  # the first reconcile (before the first session) has nothing to drop
        self._follower = _Follower(
            endpoint=endpoint,
            bucket_id=bucket.bucket_id,
            token=None,  # HF_TOKEN of the daemon's environment, as every request of the mount
            on_changes=self._on_changes,
            on_reconcile=self._on_reconcile,
            is_alive=lambda: not self._closed,
        )

    def start(self) -> None:
        self._follower.start()

    def close(self) -> None:
        self._closed = True
        self._follower.closing = True
        self._follower.stop()

    def live(self) -> bool:
        return self._follower.is_alive() and self._follower.subscribed

    def mode(self) -> str:
        """`follow` of the status: "events" while a session is live, else "probe"."""
        return "events" if self.live() else "probe"

    def _on_changes(self, changes: list[BucketFileChange]) -> None:
        affected: set[str] = set()
        for change in changes:
            path = self.bucket.mount_path(change.path)
            if not path:
                continue
            if change.op == "delete":
                affected.update(self.view.apply_remote_change(path, None))
                continue
            mtime = change.mtime or change.uploaded_at
            try:
                entry = self.bucket.file_entry(
                    path, change.size or 0, change.xet_hash, mtime.timestamp() if mtime else None
                )
            except ValueError as exc:
                logger.warning("bucket event for %s ignored: %s", path, exc)
                continue
            partial = change.size is None or change.xet_hash is None  # an update names what changed only
            affected.update(self.view.apply_remote_change(path, entry, partial=partial))
            if self.on_change is not None and not partial:
                self.on_change(path, entry)
        self.applied += len(changes)
        for path in sorted(affected, key=len, reverse=True):  # files before their directories
            self.invalidate(path)
        logger.debug("bucket events: %d changes applied", len(changes))

    def _on_reconcile(self) -> None:
        """No usable resume point: what is cached may have missed changes. Not at the start: listings
        loaded since the mount came up are as fresh as the resume point the follower just fetched."""
        if not self._started:
            self._started = True
            return
        with supervision.one_round("dropping listings for the event feed"):  # raising would end the library's thread
            self.view.forget_listings()
            self.invalidate("")
