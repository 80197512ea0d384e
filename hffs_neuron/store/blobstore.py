"""A shared on-disk store of complete, verified blobs, keyed by content identity.

Layout under the store root:

    blobs/<k[:2]>/<key>             complete, verified blobs (the only files ever served)
    tmp/<key>.<host>.<pid>.<rand>   one private temp file per writer, renamed into blobs/ when verified
    locks/<key>.lock                fcntl lock: shared while a blob is open in some process (never
                                    evicted then), exclusive for the moment of an eviction
    locks/<key>.claim               the one fetcher's claim, made with O_EXCL: "<host> <pid> <token>"

Correctness never depends on the lock: a writer only ever renames its own verified temp file into
place, so even where `flock` is a no-op (some network filesystems) nobody sees a partial blob. Nor does
single flight: a fetcher makes the key's claim file with `O_EXCL`, which works on those filesystems.
Another process waits while the claimant's temp file grows, and takes the fetch over when
it stops growing: for `timeout` once bytes arrived, for one attempt's time (a third of `timeout`) while
it is still empty (a fetch only queued, e.g. read-ahead), at once when the claimant is a dead process of
this host. Growth is the only sign of progress across processes: nothing else touches a temp file. A
queued read-ahead whose claim was taken over, or whose blob another process completed, stops before its
first byte. Temp names carry the host, so that several hosts can share one cache directory (a cluster
filesystem): start-up cleanup removes only this host's dead writers' files.

Transfers go through the daemon's one `TransferScheduler` (connection budget, priorities, read-ahead).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import constants
from ..errors import CacheFull, HffsError, IntegrityError, RangeIgnored, RemoteUnavailable
from ..proc import HOST, pid_alive
from ..remote.base import XET, Digest, Remote, RemoteEntry
from ..remote.xet import XetDownloader
from .scheduler import FOREGROUND, READ_AHEAD, ReadRange, Transfer, TransferScheduler
from .verify import verify_download

logger = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_LOCK_POLL = 0.05
# A temp file at its full size is being verified: hashing is allowed at least this rate (bytes/s; the
# xet hash runs at ~500 MB/s here, README "Known limits") before its claim may be taken over.
_VERIFY_FLOOR = 64 * 1024 * 1024
# Transfers of one blob tried before a size/hash mismatch is reported (as IntegrityError, EIO).
_VERIFY_ATTEMPTS = 2
# After the Xet path failed, HTTP Range gets what is left of the open's wait for bytes, and at least this
# long for its first byte (seconds): part of the 2 s a FUSE call may take beyond --timeout (README "Errors
# a reader can see"), so a Hub whose Xet and HTTP routes both stall costs one deadline, not two.
_FALLBACK_FIRST_BYTE = 1.0
# Temp files older than this are removed at start-up whatever host wrote them (seconds).
_TMP_MAX_AGE = 24 * 3600


def blob_key(content_id: str) -> str:
    """A file-name-safe store key for a content id (hex hashes pass through unchanged)."""
    if _SAFE_KEY.match(content_id):
        return content_id
    return "h" + hashlib.sha256(content_id.encode()).hexdigest()


def new_hasher(digest: Digest, size: int) -> hashlib._Hash:
    """A hash object that, fed the `size` content bytes, yields `digest.hexdigest` if they are right."""
    if digest.algo == "git-sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)  # git hashes a header, then the content
        return h
    return hashlib.new(digest.algo)


@dataclass
class FetchProgress:
    """An in-flight fetch, for status output and progress bars."""

    key: str
    name: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class _Fetch:
    """The one in-process fetch of a key that every other thread asking for it waits on."""

    future: Future
    progress: FetchProgress
    priority: int
    transfer: Transfer | None = None
    alive: float = field(default_factory=time.monotonic)  # the fetching thread's last sign of life
    moved: float | None = None  # when its transfers last brought bytes (monotonic; None: none yet)

    def __post_init__(self) -> None:
        # Started by read-ahead and not promoted by an open since: its failure is nobody's.
        self.read_ahead = self.priority == READ_AHEAD

    def beat(self) -> None:
        """The fetching thread is alive (threads of this process waiting for it check)."""
        self.alive = time.monotonic()


@dataclass
class StoreStats:
    hits: int = 0  # materialize() answered from a complete local blob
    misses: int = 0  # materialize() had to fetch (or wait for another process's fetch)
    fetches: int = 0  # upstream transfers this process made
    bytes_fetched: int = 0
    evictions: int = 0
    # Completed transfers and their bytes by path: "http" (Range) or "xet" (hf_xet, remote/xet.py).
    transfers: dict[str, list[int]] = field(default_factory=lambda: {"http": [0, 0], "xet": [0, 0]})


class BlobStore:
    """Complete blobs on local disk, fetched once across threads, processes and mounts."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        max_size: int | None = None,
        chunk_size: int = constants.CHUNK_SIZE,
        max_connections: int = constants.MAX_CONNECTIONS,
        parallel_threshold: int = constants.PARALLEL_THRESHOLD,
        timeout: float = constants.OPERATION_TIMEOUT,
        xet: XetDownloader | None = None,
    ):
        self.root = Path(root)
        self.xet = xet  # None: every transfer is an HTTP Range one
        self.max_size = max_size
        self.timeout = timeout
        self.scheduler = TransferScheduler(
            max_connections,
            chunk_size=max(1024 * 1024, chunk_size),
            parallel_threshold=parallel_threshold,
            timeout=timeout,
        )
        if xet is not None:  # hf_xet's session within the scheduler's Xet share of the connections
            xet.limit_connections(self.scheduler.xet_connections)
        for sub in ("blobs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, _Fetch] = {}  # key -> the one in-process fetch everyone waits on
        self._pins: dict[str, tuple[int, int]] = {}  # key -> (lock fd holding LOCK_SH, open count)
        self._clean_tmp()

    # -- paths ----------------------------------------------------------------------------------
    def blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key[:2] / key

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def has(self, key: str) -> bool:
        return self.blob_path(key).exists()

    # -- fetching -------------------------------------------------------------------------------
    def materialize(self, key: str, remote: Remote, entry: RemoteEntry, priority: int = FOREGROUND) -> Path:
        """Return the path of the complete, verified blob `key` holding `entry`'s bytes.

        Fetches it at most once however many threads and processes ask at the same time. A foreground
        call waits at most the store's `timeout` for the bytes to start arriving and for each further
        byte (queued time does not count); one that finds the blob being read ahead promotes that
        transfer to the front and waits for it, and retries itself if that read-ahead fails.
        """
        key = blob_key(key)
        path = self.blob_path(key)
        if priority == FOREGROUND:
            self.scheduler.cancel_read_ahead(key)
        for _ in range(2):
            if self._is_complete(path, entry.size):
                self._touch(path, priority)
                with self._lock:
                    self.stats.hits += 1
                return path
            with self._lock:
                self.stats.misses += 1
                fetch = self._inflight.get(key)
                leader = fetch is None
                if leader:
                    fetch = _Fetch(Future(), FetchProgress(key, entry.path, entry.size), priority)
                    self._inflight[key] = fetch
                elif priority < fetch.priority:
                    # Now the open's fetch: a failure from here on is the open's (answered, not retried
                    # with a second deadline).
                    fetch.priority = priority
                    fetch.read_ahead = False
                    if fetch.transfer is not None:
                        self.scheduler.promote(fetch.transfer)
            if not leader:
                try:
                    return self._wait(fetch, entry)
                except HffsError:
                    if not (fetch.read_ahead and priority == FOREGROUND):
                        raise
                    continue  # a read-ahead failed: nobody's error, this open fetches itself
            try:
                result = self._fetch_locked(key, remote, entry, fetch)
                fetch.future.set_result(result)
                return result
            except BaseException as exc:
                fetch.future.set_exception(exc)
                raise
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
        raise RemoteUnavailable(f"{entry.path}: read-ahead and open both failed")

    def _wait(self, fetch: _Fetch, entry: RemoteEntry) -> Path:
        """Wait for another thread's fetch; it enforces the deadlines, this only checks it is alive."""
        while True:
            try:
                return fetch.future.result(timeout=_LOCK_POLL * 5)
            except TimeoutError:
                if time.monotonic() - fetch.alive > self.timeout:
                    raise RemoteUnavailable(f"{entry.path}: the download it waits for stopped reporting") from None

    def prefetch(self, key: str, remote: Remote, entry: RemoteEntry) -> None:
        """Queue a read-ahead of `key` (nothing if it is complete or queued); failures are only logged."""
        key = blob_key(key)
        if not self._is_complete(self.blob_path(key), entry.size):
            self.scheduler.read_ahead(key, lambda: self.materialize(key, remote, entry, READ_AHEAD))

    def _fetch_locked(self, key: str, remote: Remote, entry: RemoteEntry, fetch: _Fetch) -> Path:
        path = self.blob_path(key)
        with self._claim(key, entry, fetch) as token:
            # Another process may have finished it while we waited for the lock.
            if self._is_complete(path, entry.size):
                self._touch(path, fetch.priority)
                return path
            self._make_room(entry)
            for attempt in range(_VERIFY_ATTEMPTS):
                try:
                    self._download(key, remote, entry, fetch, token)
                    break
                except IntegrityError as exc:
                    # Bytes damaged in transit are discarded; a fresh transfer usually succeeds.
                    if attempt + 1 == _VERIFY_ATTEMPTS:
                        raise
                    logger.warning("%s; fetching it again", exc)
                except Exception as exc:
                    # However the transfer path reported it (ENOSPC from a write, or wrapped by a range
                    # thread), a disk that filled up meanwhile is ENOSPC for the reader, not EIO.
                    full = isinstance(exc, RemoteUnavailable) and self._free_bytes() < entry.size
                    if full or getattr(exc, "errno", None) == errno.ENOSPC:
                        raise self._no_room(entry) from exc
                    raise
        self.evict_if_needed()
        return path

    # -- disk room (the cache disk may be smaller than the size limit, or shared) ---------------------
    def _free_bytes(self) -> int:
        st = os.statvfs(self.root / "tmp")
        return st.f_bavail * st.f_frsize

    def _make_room(self, entry: RemoteEntry) -> None:
        """Before a transfer: evict blobs not in use (least recently used first) until `entry` fits on
        the disk; raise CacheFull (ENOSPC) if it cannot fit.

        A size that can never fit (over the size limit, or over free space plus every blob not in use)
        fails before anything is evicted: one impossible listing must not empty the cache.
        """
        if self.max_size is not None and entry.size > self.max_size:
            raise self._no_room(entry, f"more than the cache size limit of {self.max_size} bytes")
        free = self._free_bytes()
        if free >= entry.size:
            return
        unused = [
            (path, st)
            for path, st in sorted(self.blobs(), key=lambda item: item[1].st_mtime)
            if self._lock_free(path.name)
        ]
        if free + sum(st.st_size for _, st in unused) < entry.size:
            raise self._no_room(entry, "more than free space plus every blob not in use")
        for path, _ in unused:
            if self._try_evict(path) and self._free_bytes() >= entry.size:
                return
        raise self._no_room(entry)

    def _no_room(self, entry: RemoteEntry, why: str = "") -> CacheFull:
        error = CacheFull(
            f"{entry.path}: no room in the cache directory {self.root}: needs {entry.size} bytes, "
            f"{self._free_bytes()} free ({why or 'blobs in use are never evicted'})"
        )
        logger.error("%s", error)
        return error

    def _claim_path(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.claim"

    @contextmanager
    def _claim(self, key: str, entry: RemoteEntry, fetch: _Fetch) -> Iterator[str]:
        """Be the one fetcher of `key` across processes and hosts; yields this fetch's claim token.

        The key's claim file is made with O_EXCL; while another process has it, wait as long as its
        temp file grows (module docstring), then replace it with ours. Returns early, claiming nothing,
        once the blob is complete. While claimed, the key's lock is held shared, like a pin: the new
        blob is not evicted before the caller pins it, and an exclusive lock would keep other processes'
        pins waiting once they took the fetch over.
        """
        claim = self._claim_path(key)
        token = f"{HOST} {os.getpid()} {secrets.token_hex(8)}"
        mine = False
        fd = -1
        try:
            seen, since = None, time.monotonic()
            while True:
                if _create_claim(claim, token):
                    mine = True
                    break
                fetch.beat()
                if self._is_complete(self.blob_path(key), entry.size):
                    break
                now = time.monotonic()
                mark = self._tmp_progress(key)
                if mark != seen:
                    seen, since = mark, now
                elif now - since > self._takeover_after(mark, entry.size) or _claimant_dead(claim):
                    logger.info("%s: taking over a stalled fetch of another process", entry.path)
                    _remove_claim(claim, None)
                    if _create_claim(claim, token):
                        mine = True
                        break
                    seen, since = None, now  # someone else took it over first: watch theirs
                time.sleep(_LOCK_POLL)
            if mine:
                fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                # Only an eviction's moment holds it exclusively.
                _flock_by(fd, fcntl.LOCK_SH, time.monotonic() + self.timeout, f"{entry.path}: lock busy")
            yield token
        finally:
            if mine:
                _remove_claim(claim, token)
            if fd >= 0:
                os.close(fd)

    def _takeover_after(self, mark: tuple, size: int) -> float:
        """How long a claimant's temp files may stay as they are (`mark`) before its fetch is taken over."""
        written = max((m[1] for m in mark), default=0)
        if not written:  # nothing arrived yet: queued, or its server stalls; one attempt's time
            return self.timeout * constants.ATTEMPT_TIMEOUT_FRACTION
        if written >= size:  # complete, being verified
            return self.timeout + size / _VERIFY_FLOOR
        return self.timeout

    def _superseded(self, key: str, size: int, token: str) -> bool:
        """Whether a queued read-ahead need not start: the blob is complete, or its claim was taken over."""
        if self._is_complete(self.blob_path(key), size):
            return True
        try:
            return self._claim_path(key).read_text() != token
        except FileNotFoundError:
            return True

    def _tmp_progress(self, key: str) -> tuple:
        """What grows while some writer (any process, any host) fills a temp file of `key`: its bytes."""
        marks = []
        for tmp in (self.root / "tmp").glob(f"{key}.*"):
            try:
                st = tmp.stat()
            except FileNotFoundError:
                continue
            marks.append((tmp.name, st.st_size, st.st_blocks))
        return tuple(sorted(marks))

    def _tmp_name(self, key: str) -> str:
        return f"{key}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}"

    def _download(self, key: str, remote: Remote, entry: RemoteEntry, fetch: _Fetch, token: str) -> None:
        """One transfer into a private temp file, verified and renamed: over Xet where the file has a xet
        hash (and the path is on), else, or after any Xet failure, over HTTP Range into a fresh temp file.
        Both go through the scheduler; only the reader of byte ranges differs."""
        started = time.monotonic()
        start_by = None  # the scheduler's own: --timeout from the transfer's start
        source = self.xet.source(remote, entry) if self.xet is not None else None
        if source is not None:
            reader = self.xet.reader(source, entry)
            read = self._unless_superseded(key, entry, fetch, token, reader.read)
            try:
                self._download_by(key, entry, fetch, "xet", read, constants.XET_PIECE_SIZE, reader.close)
                return
            except (CacheFull, _Superseded):
                raise
            except Exception as exc:
                if getattr(exc, "errno", None) == errno.ENOSPC or self._free_bytes() < entry.size:
                    raise
                self.xet.fell_back(entry, exc)
                waiting_since = fetch.moved if fetch.moved is not None else started
                start_by = max(waiting_since + self.timeout, time.monotonic() + _FALLBACK_FIRST_BYTE)

        def read_range(start: int, end: int, sink: Callable[[int, bytes], None], deadline: float) -> None:
            remote.read_range(entry, start, end, sink, deadline)

        read = self._unless_superseded(key, entry, fetch, token, read_range)
        try:
            self._download_by(key, entry, fetch, "http", read, start_by=start_by)
        except RangeIgnored as exc:  # a proxy that drops Range: pieces cannot work, one stream can
            logger.info("%s: %s; fetching it as one stream", entry.path, exc)
            self._download_by(key, entry, fetch, "http", read, one_stream=True)

    def _unless_superseded(self, key: str, entry: RemoteEntry, fetch: _Fetch, token: str, read: ReadRange) -> ReadRange:
        """`read`, which a read-ahead (not promoted by an open) starts only if it is still needed: a queued
        read-ahead may wait long, and meanwhile another process may fetch the blob or take its claim."""

        def checked(start: int, end: int, sink: Callable[[int, bytes], None], deadline: float) -> None:
            if fetch.priority == READ_AHEAD and self._superseded(key, entry.size, token):
                raise _Superseded(f"{entry.path}: fetched or claimed by another process meanwhile")
            read(start, end, sink, deadline)

        return checked

    def _download_by(
        self,
        key: str,
        entry: RemoteEntry,
        fetch: _Fetch,
        way: str,
        read: ReadRange,
        piece_size: int | None = None,
        stop: Callable[[], None] | None = None,
        one_stream: bool = False,
        start_by: float | None = None,
    ) -> None:
        path = self.blob_path(key)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = self.root / "tmp" / self._tmp_name(key)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            actual = self._fill(fd, read, entry, fetch, way, piece_size, stop, one_stream, start_by)
            written = os.fstat(fd).st_size
            if written != entry.size:
                raise IntegrityError(f"{entry.path}: got {written} bytes, expected {entry.size}")
            verify_download(tmp, entry, actual, fetch.beat)
            if fetch.priority == READ_AHEAD:
                # Not opened yet: a future mtime keeps it out of every process's LRU eviction for a while.
                now = time.time()
                os.utime(fd, (now, now + constants.READ_AHEAD_PROTECT))
            os.fsync(fd)  # the one fsync of the blob: completeness is judged by size after a crash
            os.fchmod(fd, 0o444)  # blobs are immutable
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            with self._lock:
                self.stats.fetches += 1
                self.stats.transfers[way][0] += 1
                self.stats.transfers[way][1] += entry.size
            logger.info("fetched %s (%d bytes, %s) as blob %s", entry.path, entry.size, way, key[:16])
        finally:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _fill(
        self,
        fd: int,
        read: ReadRange,
        entry: RemoteEntry,
        fetch: _Fetch,
        way: str,
        piece_size: int | None,
        stop: Callable[[], None] | None,
        one_stream: bool,
        start_by: float | None,
    ) -> str | None:
        """Download `entry` into `fd` through the scheduler with `read`; return the hex digest of what was
        written. `stop()`, if given, is called once the transfer is over (done, failed or abandoned), before
        the scheduler waits for its pieces to end. `start_by`: the first byte's deadline, if not the
        scheduler's own (`TransferScheduler.start`).

        This thread verifies while the scheduler's workers download: bytes reach the hash in order,
        from memory (or read back from the page cache where the reorder buffer was full).
        """
        # A xet hash is computed over the finished file (store/verify.py), not streamed.
        hasher = new_hasher(entry.digest, entry.size) if entry.digest and entry.digest.algo != XET else None
        if entry.size == 0:
            return hasher.hexdigest() if hasher else None

        # The transfer writes through its own descriptor, closed only when its last worker is done.
        with self._lock:
            priority = fetch.priority
        transfer = self.scheduler.start(
            entry.path, entry.size, os.dup(fd), read, priority, piece_size, one_stream, way == "xet", start_by
        )
        with self._lock:
            fetch.transfer = transfer
            if fetch.priority != priority:
                self.scheduler.promote(transfer)
        try:
            transfer.consume(hasher.update if hasher else None, fetch.beat)
        finally:
            if stop is not None:
                stop()
            transfer.release()
            with self._lock:
                self.stats.bytes_fetched += transfer.done
                fetch.transfer = None
                if transfer.first_byte is not None:
                    fetch.moved = transfer.last_progress
        return hasher.hexdigest() if hasher else None

    @staticmethod
    def _is_complete(path: Path, size: int) -> bool:
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    @staticmethod
    def _touch(path: Path, priority: int = FOREGROUND) -> None:
        """Record a use for LRU eviction (atime may be disabled, so use mtime). A read-ahead's use keeps a
        blob not opened yet out of eviction (a future mtime), and never shortens such protection that
        another mount's read-ahead gave it."""
        try:
            if priority == READ_AHEAD:
                now = time.time()
                os.utime(path, (now, max(path.stat().st_mtime, now + constants.READ_AHEAD_PROTECT)))
            else:
                os.utime(path)
        except OSError:
            pass

    def open_blob(self, key: str, remote: Remote, entry: RemoteEntry) -> tuple[int, Callable[[], None]]:
        """Materialize, then open the blob read-only and pin it until the returned `unpin` is called."""
        key = blob_key(key)
        for _ in range(3):
            path = self.materialize(key, remote, entry)
            # Pin after materializing: an eviction between the two steps is seen below (fetched again).
            self.pin(key)
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC), lambda: self.unpin(key)
            except FileNotFoundError:
                self.unpin(key)  # evicted by another process between the two steps: fetch again
            except BaseException:
                self.unpin(key)
                raise
        raise RemoteUnavailable(f"{entry.path}: blob evicted repeatedly while opening; cache too small?")

    def in_flight(self) -> list[FetchProgress]:
        with self._lock:
            fetches = [(f.progress, f.transfer) for f in self._inflight.values()]
        return [FetchProgress(p.key, p.name, p.total, t.done if t else p.done, p.started) for p, t in fetches]

    # -- pins (open blobs are never evicted, by this or any other process) -----------------------
    def pin(self, key: str) -> None:
        with self._lock:
            if key in self._pins:
                fd, count = self._pins[key]
                self._pins[key] = (fd, count + 1)
                return
        # Taken outside self._lock: it may wait for another process's fetch or eviction of this key,
        # and every other thread of this store must keep going meanwhile.
        new_fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        try:
            _flock_by(new_fd, fcntl.LOCK_SH, deadline, f"blob {key[:16]}: timed out waiting for another process")
        except BaseException:
            os.close(new_fd)
            raise
        with self._lock:
            fd, count = self._pins.get(key, (new_fd, 0))
            self._pins[key] = (fd, count + 1)
        if fd != new_fd:  # another thread pinned it meanwhile: its shared lock is enough
            os.close(new_fd)

    def unpin(self, key: str) -> None:
        with self._lock:
            fd, count = self._pins.get(key, (-1, 0))
            if count <= 1:
                self._pins.pop(key, None)
                if fd >= 0:
                    os.close(fd)
            else:
                self._pins[key] = (fd, count - 1)

    # -- size and eviction ------------------------------------------------------------------------
    def blobs(self) -> list[tuple[Path, os.stat_result]]:
        out = []
        for sub in (self.root / "blobs").iterdir():
            for blob in sub.iterdir():
                try:
                    out.append((blob, blob.stat()))
                except FileNotFoundError:
                    continue  # evicted meanwhile
        return out

    def usage(self) -> int:
        return sum(st.st_size for _, st in self.blobs())

    def evict_if_needed(self, max_size: int | None = None) -> int:
        """Remove least-recently-used blobs not open anywhere until under the size limit.

        Returns the number of bytes freed.
        """
        limit = self.max_size if max_size is None else max_size
        if limit is None:
            return 0
        blobs = sorted(self.blobs(), key=lambda item: item[1].st_mtime)
        total = sum(st.st_size for _, st in blobs)
        freed = 0
        now = time.time()
        for path, st in blobs:
            if total <= limit:
                break
            if st.st_mtime > now:
                continue  # fetched ahead and not opened yet: protected until its mtime
            if self._try_evict(path):
                total -= st.st_size
                freed += st.st_size
        return freed

    def _try_evict(self, path: Path) -> bool:
        key = path.name
        with self._lock:
            if key in self._pins or key in self._inflight:
                return False
        try:
            fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails if any process has it open or fetching
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            path.unlink()
            with self._lock:
                self.stats.evictions += 1
            logger.info("evicted blob %s", key[:16])
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def can_hold(self, extra: int) -> bool:
        """Would `extra` more bytes fit under the size limit without evicting a blob in use anywhere?

        In use: open or being fetched in any process (its lock is held), or protected read-ahead.
        """
        if self.max_size is None:
            return True
        now = time.time()
        in_use = 0
        for path, st in self.blobs():
            if st.st_mtime > now or not self._lock_free(path.name):
                in_use += st.st_size
        return in_use + extra <= self.max_size

    def _lock_free(self, key: str) -> bool:
        with self._lock:
            if key in self._pins or key in self._inflight:
                return False
        try:
            fd = os.open(self._lock_path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def _clean_tmp(self) -> None:
        """Remove temp files of this host's writers that died, and any older than a day.

        Never trusted anyway; another host's live writer keeps its file (its pid means nothing here).
        """
        now = time.time()
        for tmp in (self.root / "tmp").iterdir():
            parts = tmp.name.split(".")
            try:
                pid = int(parts[-2])
            except (ValueError, IndexError):
                pid = -1
            # Three parts (no host): written before names carried one, so on this host.
            mine = len(parts) <= 3 or parts[1] == HOST
            try:
                old = now - tmp.stat().st_mtime > _TMP_MAX_AGE
                if old or (mine and pid != os.getpid() and not pid_alive(pid)):
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.scheduler.close()
        with self._lock:
            for fd, _ in self._pins.values():
                os.close(fd)
            self._pins.clear()


class _Superseded(HffsError):
    """A queued read-ahead found its blob fetched, or its claim taken, by another process: nobody's error."""


def _create_claim(claim: Path, token: str) -> bool:
    """Make the claim file `claim` holding `token` with O_EXCL (which works where flock does not); False if
    it exists."""
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return True


def _remove_claim(claim: Path, token: str | None) -> None:
    """Remove the claim file if it holds `token` (None: whatever it holds; a takeover)."""
    try:
        if token is None or claim.read_text() == token:
            claim.unlink()
    except FileNotFoundError:
        pass


def _claimant_dead(claim: Path) -> bool:
    """Whether the claim was made by a process of this host that is gone (a crash): taken over at once."""
    try:
        host, pid, _ = claim.read_text().split(" ")
        return host == HOST and not pid_alive(int(pid))
    except (FileNotFoundError, ValueError):
        return False


def _flock_by(fd: int, operation: int, deadline: float, timeout_message: str) -> None:
    """flock(fd, operation), polling so that the wait ends at `deadline` (monotonic) with EIO."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RemoteUnavailable(timeout_message) from None
            time.sleep(_LOCK_POLL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
