"""Publish-on-completion (`mount neff --publish`): local modules go to the bucket (or repo) once the compiler
is done.

Fed by the NEFF view's write events (a written file closed, a rename, an unlink: `notify(path)`), each
module is looked at again a second after its last event (DEBOUNCE_S), or at once (SETTLE_S) after an event
that can make it complete: its `model.done` closed or renamed into place, a lock or a held deleted file
(`.fuse_hidden*`) removed. A finished, trusted one (the rules `push` uses, `publish.publishable_files`) is
uploaded unless the bucket already holds the same content; uploads run in one long-lived worker process
(`upload_worker.UploadWorker`), killed and replaced when its I/O stalls. A module
the bucket holds with other content, or that another node published first with other bytes, is a
conflict: reported, never uploaded again by this mount. Untrusted modules (written by a user outside
`--publish-from`) stay local and are listed in status. Pending work is derived from the local layer at
start, so it survives a restart. Transient failures retry with backoff, a bounded number of times, and
no upload starts before a `Retry-After` the Hub sent with a failure has passed;
permanent ones (no write access, bucket gone) are logged once with the fix, shown in status, and stop
further uploads until the next mount.

To a repo, each round is one commit (`publish.commit_round`), at most one per `commit_interval`: modules
that complete meanwhile wait and go together; a module's `model.done` goes in the commit after its other
files.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants, publish, supervision
from .errors import RemoteAccessDenied, RemoteNotFound
from .remote.repo import RepoTree
from .upload_worker import UploadWorker, retry_after
from .views.neff import MODULE_PREFIX, VERSION_PREFIX, is_lock_name

if TYPE_CHECKING:
    from .publish import NeffRemote
    from .remote.base import Digest, RemoteEntry

logger = logging.getLogger(__name__)

DEBOUNCE_S = 1.0
# After an event that can complete a module (see `_completes`): long enough to take the compiler's next
# step along (libneuronxla closes model.done, then removes its lock), short against an upload round.
SETTLE_S = 0.05
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0
MAX_ATTEMPTS = 8
_JOIN_TIMEOUT = 5.0


class PermanentError(Exception):
    """An upload failure that retrying cannot fix; `bucket_wide` ones stop all further uploads."""

    def __init__(self, reason: str, *, bucket_wide: bool):
        super().__init__(reason)
        self.bucket_wide = bucket_wide


def classify(exc: BaseException, name: str) -> PermanentError | None:
    """The permanent failure `exc` stands for, or None if it is worth retrying (`name`: `bucket ORG/NAME`,
    `model ORG/NAME`, ...)."""
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RemoteAccessDenied) or status in (401, 403):
        return PermanentError(
            f"no write access to {name} ({exc}); remount with a token that can write to it "
            "(--token-file / HF_TOKEN): pending modules are published at start",
            bucket_wide=True,
        )
    if isinstance(exc, RemoteNotFound) or status == 404:
        return PermanentError(
            f"{name} not found ({exc}); was it deleted or renamed? Mount an existing one",
            bucket_wide=True,
        )
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):
        return PermanentError(f"the Hub refused the upload (HTTP {status}): {exc}", bucket_wide=False)
    return None


class NeffPublisher:
    """A queue of local modules to publish, worked by one thread (uploads are serialized)."""

    def __init__(
        self,
        upper: str | Path,
        bucket: NeffRemote,
        checks: publish.Checks,
        *,
        api: Any = None,
        debounce: float = DEBOUNCE_S,
        stall_timeout: float = constants.OPERATION_TIMEOUT,
        commit_interval: float = constants.COMMIT_INTERVAL,
    ):
        """`api`: an HfApi to upload with in this process; None (the daemon): an upload worker process,
        killed and replaced when no byte moved for `stall_timeout` seconds in a call (`UploadWorker`).
        `bucket`: the bucket or repo; to a repo, at most one commit per `commit_interval` seconds."""
        self.upper = Path(upper)
        self.stall_timeout = stall_timeout
        self.bucket = bucket
        self.commit_interval = commit_interval if isinstance(bucket, RepoTree) else 0.0
        # Monotonic time before which no round starts: a repo's commit interval, a Retry-After.
        self._next_round = 0.0
        self.checks = checks
        self.debounce = debounce
        self._worker = UploadWorker() if api is None else None
        self._api = api or self._worker
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}  # module -> monotonic time to look at it
        self._attempts: dict[str, int] = {}
        self._published: dict[str, float] = {}  # module -> when it was found published (wall time)
        self._failed: dict[str, str] = {}  # module -> reason
        self._untrusted: dict[str, tuple[int, int]] = {}  # module -> (uid, files touched)
        self._conflicts: dict[str, str] = {}  # module -> what differs: never uploaded again by this mount
        self._replaced: dict[str, dict[str, Digest]] = {}  # published module -> {file: digest} the feed reported
        self._blocked: str | None = None  # a bucket-wide permanent failure
        self._stop = False
        self._thread = supervision.thread("hffs-publish", self._run)

    # -- interface --------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue every module of the local layer (what is already in the bucket is skipped), then work."""
        with self._cond:
            for module in publish.local_modules(self.upper):
                self._due.setdefault(module, 0.0)
        if self._worker is not None:
            self._worker.start()  # it loads huggingface_hub and hf_xet before the first module is done
        self._thread.start()

    def notify(self, path: str) -> None:
        """The local layer changed at mount-relative `path`: look at its module after the debounce."""
        parts = path.split("/")
        if len(parts) < 2 or not parts[0].startswith(VERSION_PREFIX) or not parts[1].startswith(MODULE_PREFIX):
            return
        module = f"{parts[0]}/{parts[1]}"
        wait = SETTLE_S if len(parts) == 3 and _completes(parts[2]) else self.debounce
        with self._cond:
            self._due[module] = time.monotonic() + min(wait, self.debounce)
            self._attempts.pop(module, None)
            self._cond.notify()

    def remote_changed(self, path: str, entry: RemoteEntry) -> None:
        """The event feed reports file `path` added or changed upstream. If it belongs to a module this
        mount published, look at its content in the next round: another node's copy of the same module
        that lands after our re-list (both checked before either uploaded) replaces ours unseen by it."""
        module, name = posixpath.split(path)
        if entry.digest is None:
            return
        with self._cond:
            if module in self._published:
                self._replaced.setdefault(module, {})[name] = entry.digest
                self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {
                "mode": "on-completion",
                "published": len(self._published),
                "pending": len(self._due),
                "failed": [{"module": m, "reason": r} for m, r in sorted(self._failed.items())],
                "untrusted": [
                    {"module": m, "uid": uid, "count": count} for m, (uid, count) in sorted(self._untrusted.items())
                ],
                "conflicts": [{"module": m, "reason": r} for m, r in sorted(self._conflicts.items())],
            }

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(_JOIN_TIMEOUT)  # an upload in flight is bounded by its stall timeout
        if self._worker is not None:
            self._worker.close()  # a call still in flight fails: the module is published at the next start

    # -- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                due, replaced = self._take_due(), self._take_replaced()
                while not due and not replaced and not self._stop:
                    self._cond.wait(self._wait_time())
                    due, replaced = self._take_due(), self._take_replaced()
                if self._stop:
                    return
            with supervision.one_round("publish round"):  # a bad round must not end publishing
                self._check_replaced(replaced)
                self._publish(due)

    def _take_due(self) -> list[str]:
        now = time.monotonic()
        if now < self._next_round:
            return []
        due = sorted(m for m, t in self._due.items() if t <= now)
        for module in due:
            del self._due[module]
        return due

    def _take_replaced(self) -> dict[str, dict[str, Digest]]:
        replaced, self._replaced = self._replaced, {}
        return replaced

    def _check_replaced(self, replaced: dict[str, dict[str, Digest]]) -> None:
        """Published modules the feed reported files of: a conflict where the bucket's copy of a file we
        published (and still hold) is not ours. Our own upload's events match and cost no request."""
        for module, theirs in replaced.items():
            with self._cond:
                published_at = self._published.get(module)
            ours = [name for name in theirs if _is_regular_file(self.upper / module / name)]
            if published_at is None or _changed_since(self.upper / module, ours, published_at):
                continue  # our copy changed after it was published: its own events publish it again
            try:
                differ = publish.differing(self.upper, module, ours, theirs, self.checks.hashes)
            except OSError:  # our copy changed meanwhile: its own events bring it back
                continue
            if differ:
                where = publish.remote_name(self.bucket)
                reason = (
                    f"another copy of {module} replaced ours after it was published ({differ[0]} differs in {where})"
                )
                self._conflict(module, f"conflict: {reason}")
                with self._cond:
                    self._published.pop(module, None)

    def _wait_time(self) -> float | None:
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic(), self._next_round - time.monotonic())

    def _publish(self, modules: list[str]) -> None:
        ready: list[publish.Upload] = []
        for module in modules:
            try:
                upload = self._prepare(module)
            except Exception as exc:  # noqa: BLE001 - the bucket check failed: retry or report
                self._failure([module], exc)
                continue
            if upload is not None:
                ready.append(upload)
        if not ready:
            return
        held: set[str] = set()  # modules whose marker (or all of it) goes in the next commit
        try:
            if isinstance(self.bucket, RepoTree):
                self._next_round = time.monotonic() + self.commit_interval
                changed, waiting, later = publish.commit_round(
                    self._api, self.bucket, self.upper, ready, stall_timeout=self.stall_timeout
                )
                held = {u.module for u in waiting + later}
                self._requeue(sorted(held))
            else:
                changed = publish.publish_modules(
                    self._api, self.bucket, self.upper, ready, stall_timeout=self.stall_timeout
                )
            for upload in ready:
                if upload.module in changed or upload.module in held:
                    continue
                if conflict := publish.lost_race(self.bucket, upload, self.upper, self.checks.hashes):
                    self._conflict(upload.module, conflict)
                    changed[upload.module] = conflict
        except Exception as exc:  # noqa: BLE001 - classified: retried with backoff or reported
            self._failure([u.module for u in ready], exc)
            return
        for upload in ready:
            if upload.module in changed:  # a file swapped or changed meanwhile: its next event brings it back
                logger.warning("not publishing %s: %s", upload.module, changed[upload.module])
                continue
            if upload.module in held:
                continue
            logger.info("published %s (%d files)", upload.module, len(upload.files))
            self._done(upload.module)

    def _requeue(self, modules: list[str]) -> None:
        """Modules to look at again in the next round (a repo's next commit)."""
        with self._cond:
            for module in modules:
                self._due.setdefault(module, 0.0)
            self._cond.notify()

    def _prepare(self, module: str) -> publish.Upload | None:
        """The upload `module` needs now, or None (not finished, refused, a conflict, or already there)."""
        local = publish.publishable_files(self.upper, module, self.checks)
        with self._cond:
            known = self._untrusted.pop(module, None)
            if local.untrusted is not None:
                self._untrusted[module] = local.untrusted
                if known is None:
                    logger.warning("not publishing %s: %s", module, local.reason)
        if local.reason is not None:
            if local.refused and local.untrusted is None:
                if self._failed.get(module) != local.reason:
                    logger.error("not publishing %s: %s", module, local.reason)
                self._fail(module, local.reason)
            return None  # not finished (yet): its next event brings it back
        if module in self._conflicts:
            return None
        if self._blocked is not None:
            self._fail(module, self._blocked)
            return None
        upload = publish.prepare(self.bucket, self.upper, module, local, self.checks.hashes)
        if isinstance(upload, str):
            self._conflict(module, upload)
            return None
        if upload is None:
            self._done(module)
        return upload

    def _conflict(self, module: str, reason: str) -> None:
        logger.error("not publishing %s: %s; the local copy stays local", module, reason)
        with self._cond:
            self._conflicts[module] = reason
            self._failed.pop(module, None)

    def _done(self, module: str) -> None:
        with self._cond:
            self._published[module] = time.time()
            self._failed.pop(module, None)
            self._attempts.pop(module, None)

    def _fail(self, module: str, reason: str) -> None:
        with self._cond:
            self._failed[module] = reason
            self._published.pop(module, None)

    def _failure(self, modules: list[str], exc: BaseException) -> None:
        permanent = classify(exc, publish.remote_name(self.bucket))
        if permanent is not None:
            if permanent.bucket_wide:
                if self._blocked is None:
                    logger.error("publishing stopped: %s", permanent)
                self._blocked = str(permanent)
            else:
                logger.error("not publishing %s: %s", ", ".join(modules), permanent)
            for module in modules:
                self._fail(module, str(permanent))
            return
        with self._cond:
            told = retry_after(exc)
            if told is not None:  # the Hub's wait holds for every module: it limits the token, not one file
                self._next_round = max(self._next_round, time.monotonic() + told)
            for module in modules:
                attempt = self._attempts.get(module, 0) + 1
                if attempt >= MAX_ATTEMPTS:
                    self._attempts.pop(module, None)
                    reason = f"gave up after {attempt} attempts: {exc}"
                    logger.error("not publishing %s: %s (its next change retries)", module, reason)
                    self._failed[module] = reason
                    continue
                self._attempts[module] = attempt
                wait = max(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)), told or 0.0)
                logger.warning("publishing %s failed (%s); retry %d in %.0f s", module, exc, attempt, wait)
                self._due.setdefault(module, time.monotonic() + wait)


def _completes(name: str) -> bool:
    """Whether an event on a module's file `name` can make the module complete: its done marker written or
    renamed into place, a lock or a held deleted file (what libfuse keeps as `.fuse_hidden*`) removed."""
    return name == publish.DONE_MARKER or is_lock_name(name) or name.startswith(publish.FUSE_HIDDEN_PREFIX)


def _changed_since(directory: Path, names: list[str], when: float) -> bool:
    """Whether any of the files `names` in `directory` changed (ctime, which no user can set back) after
    wall time `when`."""
    for name in names:
        try:
            if os.lstat(directory / name).st_ctime > when:
                return True
        except OSError:
            return True
    return False


def _is_regular_file(path: Path) -> bool:
    """A regular file, not through a symlink (the layer's files are hashed through fds that follow none)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
