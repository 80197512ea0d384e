"""A shared on-disk store of complete, verified blobs, keyed by content identity.

Layout under the store root:

    blobs/<k[:2]>/<key>      complete, verified blobs (the only files ever served)
    tmp/<key>.<pid>.<rand>   one private temp file per writer, renamed into blobs/ when verified
    locks/<key>.lock         fcntl lock: held exclusively while fetching (single-flight), shared
                             while a blob is open in some process (never evicted then)

Correctness never depends on the lock: a writer only ever renames its own verified temp file into
place, so even where `flock` is a no-op (some network filesystems) nobody sees a partial blob; the lock
only avoids duplicate transfers.
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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import constants
from ..errors import CacheFull, HffsError, IntegrityError, RemoteUnavailable
from ..proc import pid_alive
from ..remote.base import XET, Digest, Remote, RemoteEntry
from .verify import verify_download

logger = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_LOCK_POLL = 0.05
# Transfers of one blob tried before a size/hash mismatch is reported (as IntegrityError, EIO).
_VERIFY_ATTEMPTS = 2
# The slowest transfer rate a fetch deadline allows for (bytes/s), on top of OPERATION_TIMEOUT.
_MIN_RATE = 1024 * 1024


def blob_key(content_id: str) -> str:
    """A file-name-safe store key for a content id (hex hashes pass through unchanged)."""
    if _SAFE_KEY.match(content_id):
        return content_id
    return "h" + hashlib.sha256(content_id.encode()).hexdigest()


def fetch_deadline(size: int) -> float:
    """Monotonic deadline for fetching `size` bytes: generous for big blobs, never infinite."""
    return time.monotonic() + constants.OPERATION_TIMEOUT + size / _MIN_RATE


def new_hasher(digest: Digest, size: int) -> hashlib._Hash:
    """A hash object that, fed the `size` content bytes, yields `digest.hexdigest` if they are right."""
    if digest.algo == "git-sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)  # git hashes a header, then the content
        return h
    return hashlib.new(digest.algo)


def _hash_range(fd: int, start: int, end: int, h: hashlib._Hash) -> None:
    """Feed bytes [start, end) of `fd` to `h` (they were just written: read from the page cache)."""
    position = start
    while position < end:
        data = os.pread(fd, min(8 * 1024 * 1024, end - position), position)
        if not data:
            break
        h.update(data)
        position += len(data)


@dataclass
class FetchProgress:
    """An in-flight fetch, for status output and progress bars."""

    key: str
    name: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class StoreStats:
    hits: int = 0  # materialize() answered from a complete local blob
    misses: int = 0  # materialize() had to fetch (or wait for another process's fetch)
    fetches: int = 0  # upstream transfers this process made
    bytes_fetched: int = 0
    evictions: int = 0


class BlobStore:
    """Complete blobs on local disk, fetched once across threads, processes and mounts."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        max_size: int | None = None,
        chunk_size: int = constants.CHUNK_SIZE,
        concurrency: int = constants.DOWNLOAD_CONCURRENCY,
        parallel_threshold: int = constants.PARALLEL_THRESHOLD,
    ):
        self.root = Path(root)
        self.max_size = max_size
        self.chunk_size = max(1024 * 1024, chunk_size)
        self.concurrency = max(1, concurrency)
        self.parallel_threshold = parallel_threshold
        for sub in ("blobs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}  # key -> the one in-process fetch everyone waits on
        self._progress: dict[str, FetchProgress] = {}
        self._pins: dict[str, tuple[int, int]] = {}  # key -> (lock fd holding LOCK_SH, open count)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="hffs-range")
        self._clean_tmp()

    # -- paths ----------------------------------------------------------------------------------
    def blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key[:2] / key

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def has(self, key: str) -> bool:
        return self.blob_path(key).exists()

    # -- fetching -------------------------------------------------------------------------------
    def materialize(self, key: str, remote: Remote, entry: RemoteEntry, deadline: float | None = None) -> Path:
        """Return the path of the complete, verified blob `key` holding `entry`'s bytes.

        Fetches it at most once however many threads and processes ask at the same time; waits are
        bounded by `deadline` (default: `fetch_deadline(entry.size)`).
        """
        key = blob_key(key)
        path = self.blob_path(key)
        if self._is_complete(path, entry.size):
            self._touch(path)
            with self._lock:
                self.stats.hits += 1
            return path
        deadline = deadline or fetch_deadline(entry.size)
        with self._lock:
            self.stats.misses += 1
            future = self._inflight.get(key)
            leader = future is None
            if leader:
                future = Future()
                self._inflight[key] = future
                self._progress[key] = FetchProgress(key, entry.path, entry.size)
        if not leader:
            return self._wait(future, deadline, entry)
        try:
            result = self._fetch_locked(key, remote, entry, deadline)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
                self._progress.pop(key, None)

    @staticmethod
    def _wait(future: Future, deadline: float, entry: RemoteEntry) -> Path:
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise RemoteUnavailable(f"{entry.path}: timed out waiting for the download") from exc

    def _fetch_locked(self, key: str, remote: Remote, entry: RemoteEntry, deadline: float) -> Path:
        path = self.blob_path(key)
        with self._exclusive(key, deadline, entry.path):
            # Another process may have finished it while we waited for the lock.
            if self._is_complete(path, entry.size):
                self._touch(path)
                return path
            self._make_room(entry)
            for attempt in range(_VERIFY_ATTEMPTS):
                try:
                    self._download(key, remote, entry, deadline)
                    break
                except IntegrityError as exc:
                    # Bytes damaged in transit are discarded; a fresh transfer usually succeeds.
                    if attempt + 1 == _VERIFY_ATTEMPTS or time.monotonic() >= deadline:
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
        the disk; raise CacheFull (ENOSPC) if it cannot fit."""
        if self._free_bytes() >= entry.size:
            return
        for path, _ in sorted(self.blobs(), key=lambda item: item[1].st_mtime):
            if self._try_evict(path) and self._free_bytes() >= entry.size:
                return
        raise self._no_room(entry)

    def _no_room(self, entry: RemoteEntry) -> CacheFull:
        error = CacheFull(
            f"{entry.path}: no room in the cache directory {self.root}: needs {entry.size} bytes, "
            f"{self._free_bytes()} free (blobs in use are never evicted)"
        )
        logger.error("%s", error)
        return error

    @contextmanager
    def _exclusive(self, key: str, deadline: float, name: str) -> Iterator[None]:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock_by(fd, fcntl.LOCK_EX, deadline, f"{name}: timed out waiting for another process's download")
            yield
        finally:
            os.close(fd)  # closing releases the flock; a killed holder releases it the same way

    def _download(self, key: str, remote: Remote, entry: RemoteEntry, deadline: float) -> None:
        path = self.blob_path(key)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            actual = self._fill(fd, key, remote, entry, deadline)
            written = os.fstat(fd).st_size
            if written != entry.size:
                raise IntegrityError(f"{entry.path}: got {written} bytes, expected {entry.size}")
            verify_download(tmp, entry, actual)
            os.fsync(fd)
            os.chmod(tmp, 0o444)  # blobs are immutable
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            with self._lock:
                self.stats.fetches += 1
            logger.info("fetched %s (%d bytes) as blob %s", entry.path, entry.size, key[:16])
        finally:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _fill(self, fd: int, key: str, remote: Remote, entry: RemoteEntry, deadline: float) -> str | None:
        """Download `entry` into `fd`; return the hex digest of what was written (None: nothing to verify).

        Hashing overlaps the transfer: inline for one stream, range by range (in order, while later ranges
        are still downloading) for parallel fetches, so verification adds almost no time.
        """
        progress = self._progress.get(key)
        aborted = threading.Event()
        size = entry.size
        hasher = new_hasher(entry.digest, size) if entry.digest and entry.digest.algo != XET else None

        def sink(offset: int, data: bytes) -> None:
            if aborted.is_set():  # another range failed: stop this one at its next chunk
                raise RemoteUnavailable(f"{entry.path}: download aborted")
            os.pwrite(fd, data, offset)
            with self._lock:
                self.stats.bytes_fetched += len(data)
                if progress:
                    progress.done += len(data)

        if size < self.parallel_threshold or self.concurrency == 1:

            def hashing_sink(offset: int, data: bytes) -> None:
                sink(offset, data)
                if hasher:
                    hasher.update(data)  # one stream delivers bytes in order, resuming without overlap

            remote.read_range(entry, 0, size, hashing_sink, deadline)
            return hasher.hexdigest() if hasher else None
        os.ftruncate(fd, size)  # sparse: ranges land in place
        ranges = [(start, min(start + self.chunk_size, size)) for start in range(0, size, self.chunk_size)]
        futures = [self._pool.submit(remote.read_range, entry, a, b, sink, deadline) for a, b in ranges]
        errors = []
        for (start, end), fut in zip(ranges, futures, strict=True):
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()) + 1)
                if hasher and not errors:
                    _hash_range(fd, start, end, hasher)
            except Exception as exc:  # noqa: BLE001 - collect, cancel the rest, raise the first
                errors.append(exc)
                aborted.set()
                for other in futures:
                    other.cancel()
        if errors:
            # The caller closes `fd` next: wait until no range thread can write to it any more. Each
            # one stops at its next chunk (sink raises) or at its own read timeout and deadline.
            wait(futures)
            first = errors[0]
            raise first if isinstance(first, HffsError) else RemoteUnavailable(f"{entry.path}: {first}")
        return hasher.hexdigest() if hasher else None

    @staticmethod
    def _is_complete(path: Path, size: int) -> bool:
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    @staticmethod
    def _touch(path: Path) -> None:
        """Record a use for LRU eviction (atime may be disabled, so use mtime)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def open_blob(self, key: str, remote: Remote, entry: RemoteEntry) -> tuple[int, Callable[[], None]]:
        """Materialize, then open the blob read-only and pin it until the returned `unpin` is called."""
        key = blob_key(key)
        for _ in range(3):
            path = self.materialize(key, remote, entry)
            # Pin after materializing: the fetch takes the key's lock exclusively, the pin shares it.
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
            return [FetchProgress(p.key, p.name, p.total, p.done, p.started) for p in self._progress.values()]

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
        deadline = time.monotonic() + constants.OPERATION_TIMEOUT
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
        for path, st in blobs:
            if total <= limit:
                break
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

    def _clean_tmp(self) -> None:
        """Remove temp files left by writers that died (their pid is gone). Never trusted anyway."""
        for tmp in (self.root / "tmp").iterdir():
            parts = tmp.name.split(".")
            try:
                pid = int(parts[-2])
            except (ValueError, IndexError):
                pid = -1
            if pid == os.getpid() or pid_alive(pid):
                continue
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for fd, _ in self._pins.values():
                os.close(fd)
            self._pins.clear()


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
