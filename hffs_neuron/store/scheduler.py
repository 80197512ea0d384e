"""One scheduler for every upstream transfer of a daemon: one budget of connections, foreground first.

A `Transfer` is one blob being written into its private temp file. Workers (at most `max_connections`
threads, each holding one upstream connection at a time) take the next piece of the transfer that
should go first: foreground (an open is waiting) before read-ahead, then the transfer with the fewest
connections, then the oldest. Pieces are cut when a worker takes them, so a blob of a few tens of MB
spreads over the connections that are idle at that moment, and a small blob opened while a large one
downloads gets the next free connection instead of waiting for the whole large blob.

Deadlines measure progress, never size or queueing: a piece that gets no byte for the read timeout is
retried from the last byte written (not from its start), and gives up after `STALL_RETRIES` attempts in
a row that brought nothing. A waiting open gives up if its blob has not started arriving within
`timeout`, or if a connection working on it brought nothing for `timeout`. Progress has a floor: bytes
count once `FLOOR_BYTES_PER_S` x `timeout` of them (or a whole piece) arrived, so a connection that
trickles a byte now and then is a stall, not a transfer.

The waiting thread (the one that asked for the blob) verifies while the transfer runs: `Transfer.consume`
hands it the bytes in order, from memory when the workers could keep them (a bounded reorder buffer
shared by all transfers), read back from the temp file otherwise.

Read-ahead never holds a connection a foreground open waits for: while a foreground transfer has no
connection and every worker is busy, a read-ahead piece with more than 1 MiB left stops at its next
network chunk (or at the end of its current attempt, at most a third of `timeout`, if its server sends
nothing), hands the rest of its range back to its transfer, and frees its connection for the open.

The Xet path (remote/xet.py) shares the budget: hf_xet opens its own connections, with no per-connection
hook, so its session is capped at `xet_connections` (all the transfer connections but one, at least one,
at most `XET_MAX_CONNECTIONS`) and charged that many while any Xet piece runs: Xet pieces run on at most
that many workers, HTTP pieces on the rest. Transfers and hf_xet together never hold more than
`max_connections`.

The read-ahead queue lives here too: `read_ahead(key, job)` runs `job` later on a read-ahead thread,
unless `cancel_read_ahead(key)` took it out (an open of that blob went first).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import constants
from ..errors import HffsError, RangeIgnored, RemoteUnavailable

logger = logging.getLogger(__name__)

FOREGROUND = 0
READ_AHEAD = 1

MiB = 1024 * 1024
# Bytes a worker gathers before it writes them (one pwritev) and hands them over (one lock round), or
# seconds after the batch's first byte (a slow connection's bytes still count as progress in time).
_BATCH = MiB
_BATCH_SECONDS = 1.0
# Bytes of all transfers held in memory for in-order verification; beyond it the verifier reads back.
_REORDER_BYTES = 48 * MiB
# The verifier's buffer for bytes it reads back from the temp file.
_READ_BACK_BYTES = 8 * MiB
# Blobs from this size are split over idle connections, in pieces of at least _PIECE_MIN.
SPLIT_MIN = 8 * MiB
_PIECE_MIN = 4 * MiB
# A read-ahead piece hands back only a rest of more than this many bytes: what is already in flight on its
# connection (socket buffers) is lost, and a short rest ends soon anyway.
_HAND_BACK_MIN = MiB
# Attempts in a row that bring no byte before a piece (and so its transfer) fails.
STALL_RETRIES = 3
# Below this rate over a --timeout window a transfer is stalled, however steadily its bytes come.
FLOOR_BYTES_PER_S = 1024
# The verifier starts the disk writeback of every this many bytes it has hashed, so that the blob's one
# fsync at the end finds little left to write (1 GiB: 0.6 s of fsync otherwise, on this machine's disk).
_WRITEBACK_STEP = 64 * MiB
# Idle workers exit after this many seconds.
_WORKER_IDLE = 60.0
_POLL = 0.25
# How long a failed transfer's waiter waits for its running pieces to stop (seconds): part of the 2 s
# that a FUSE call may take beyond --timeout (README "Errors a reader can see"). A piece stuck in a read
# that ignores the stop (hf_xet's streams finish their current request) closes the file itself later.
_RELEASE_WAIT = 0.5

# Connections of the daemon's budget kept for listings and metadata, so lookups never queue behind
# downloads.
METADATA_CONNECTIONS = 2

ReadRange = Callable[[int, int, Callable[[int, bytes], None], float], None]


def transfer_connections(max_connections: int) -> int:
    """The share of a daemon's connection budget (`--max-connections`) that transfers may use."""
    return max(1, max_connections - METADATA_CONNECTIONS)


def xet_connections(transfer_connections: int) -> int:
    """The share of the transfer connections that hf_xet's session may hold (module docstring): all but
    one, which stays for HTTP pieces (files without a Xet hash: configs, tokenizers), since the Hub keeps
    nearly every large file in Xet; at most `XET_MAX_CONNECTIONS`, which bounds hf_xet's memory."""
    return max(1, min(transfer_connections - 1, constants.XET_MAX_CONNECTIONS))


def _describe(exc: BaseException) -> str:
    """A message that always names the cause (some exceptions, e.g. TimeoutError(), have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, HffsError) else text or type(exc).__name__


@dataclass
class _Piece:
    start: int
    end: int
    written: int  # bytes [start, written) are in the temp file
    batches: deque = field(default_factory=deque)  # (offset, [bytes...], length) kept for the verifier


class _HandBack(RemoteUnavailable):
    """A read-ahead piece gives its connection to a waiting foreground transfer (internal)."""


class Transfer:
    """One blob being downloaded into `fd` by the scheduler's workers."""

    def __init__(
        self,
        scheduler: TransferScheduler,
        name: str,
        size: int,
        fd: int,
        read: ReadRange,
        priority: int,
        piece_size: int,
        one_stream: bool = False,
        xet: bool = False,
    ):
        self.name = name
        self.size = size
        self.priority = priority
        self.piece_size = piece_size
        self.one_stream = one_stream  # never cut into pieces: the server ignores Range
        self.xet = xet  # read through hf_xet: its pieces run within the Xet share
        self._scheduler = scheduler
        self._fd = fd
        self._read = read
        self.seq = 0
        self.pieces: list[_Piece] = []  # in byte order
        self.returned: deque[_Piece] = deque()  # the rests of pieces handed back, to run again first
        self.next_offset = 0
        self.active = 0  # connections working on it now
        self.done = 0  # bytes written
        self.error: BaseException | None = None
        self.first_byte: float | None = None  # the floor's worth of bytes first arrived (see _progressed)
        self.last_progress: float | None = None  # the floor's worth arrived again, or a connection started
        self._counted = 0  # `done` when progress was last counted
        self.start_by: float | None = None  # an open waits this long for the first byte
        self.keep_bytes = True
        self._released = False
        self._fd_closed = False

    @property
    def queued(self) -> bool:
        return self.error is None and (self.next_offset < self.size or bool(self.returned))

    def consume(self, update: Callable[[bytes | memoryview], None] | None, beat: Callable[[], None]) -> None:
        """Wait until every byte is in the temp file, feeding them in order to `update` (if given).

        `beat()` is called at every wake-up (under the scheduler lock: keep it short), so that others
        waiting for this thread can tell it is alive.

        Raises the transfer's error, or `RemoteUnavailable` when the waits documented in the module
        docstring run out (then the transfer is aborted).
        """
        s = self._scheduler
        if update is None:
            with s._lock:
                self.keep_bytes = False
        pos, index, written_back = 0, 0, 0
        buffer: bytearray | None = None
        while pos < self.size:
            if pos - written_back >= _WRITEBACK_STEP:
                _start_writeback(self._fd, written_back, pos)
                written_back = pos
            with s._lock:
                while True:
                    beat()
                    if self.error is not None:
                        raise self.error
                    if index < len(self.pieces):
                        piece = self.pieces[index]
                        if pos >= piece.end:  # a piece that handed its rest back ends here
                            index += 1
                            continue
                        if piece.batches or piece.written > pos:
                            break
                    s._progress.wait(self._check_waits())
                if piece.batches and piece.batches[0][0] == pos:
                    _, datas, length = piece.batches.popleft()
                    s._buffered -= length
                    upto = None
                else:  # dropped from memory (or never kept): read back what is written
                    upto = piece.batches[0][0] if piece.batches else piece.written
            if upto is None:
                if update is not None:
                    for data in datas:
                        update(data)
                pos += length
            else:
                if update is not None:
                    if buffer is None:
                        buffer = bytearray(_READ_BACK_BYTES)
                    _read_back(self._fd, pos, upto, update, buffer)
                pos = upto
            if pos >= piece.end:
                index += 1

    def _check_waits(self) -> float:
        """Fail the transfer if a wait of the module docstring ran out; else the seconds until one may
        (at most `_POLL`), so the waiter wakes up when it does, not up to a poll later."""
        now = time.monotonic()
        timeout = self._scheduler.timeout
        ends = [_POLL]
        if self.first_byte is None and self.start_by is not None:
            if now > self.start_by:
                where = "waiting for the server" if self.active else "queued for a connection"
                self._fail(RemoteUnavailable(f"{self.name}: no byte arrived within {timeout:.0f}s ({where})"))
            ends.append(self.start_by - now)
        if self.active and self.last_progress is not None:
            if now - self.last_progress > timeout:
                self._fail(RemoteUnavailable(f"{self.name}: no progress for {timeout:.0f}s"))
            ends.append(self.last_progress + timeout - now)
        if self.error is not None:
            raise self.error
        return max(0.01, min(ends))

    def _fail(self, exc: BaseException) -> None:
        """Record the first error and stop every piece (called with the scheduler lock held)."""
        if self.error is None:
            self.error = exc
            s = self._scheduler
            for piece in self.pieces:
                s._buffered -= sum(length for _, _, length in piece.batches)
                piece.batches.clear()
            s._progress.notify_all()

    def release(self) -> None:
        """The waiter is done with the temp file: close it once no worker writes to it any more.

        After a failure, the pieces still running stop at their next chunk: if bytes were written, wait a
        little for them, so the (already unlinked) temp file's disk space is free when the caller retries
        or reports ENOSPC; a file with no byte holds no space, and its waiter (a stalled server) has waited
        long enough. A worker stuck in a read closes the file itself when it returns.
        """
        s = self._scheduler
        with s._lock:
            if self.done < self.size:  # the waiter gave up: stop the pieces still running or queued
                self._fail(RemoteUnavailable(f"{self.name}: transfer abandoned"))
            s._transfers.discard(self)
            self._released = True
            deadline = time.monotonic() + _RELEASE_WAIT
            while self.active and self.done and time.monotonic() < deadline:
                s._progress.wait(_POLL)
            self._close_if_done()

    def _close_if_done(self) -> None:
        """Close the temp file once released by its waiter and no worker writes to it; exactly once.

        Called with the scheduler lock held, so that when the waiter sees no worker left, the file is
        closed too (an unlinked temp file's disk space is freed only then)."""
        if self._released and not self.active and not self._fd_closed:
            self._fd_closed = True
            os.close(self._fd)

    def _hand_back(self, piece: _Piece, pos: int) -> bool:
        """If a foreground transfer waits for a connection and this is read-ahead, end `piece` at `pos` and
        give its rest [pos, end) back to this transfer, to run again first; True if it was handed back."""
        s = self._scheduler
        with s._lock:
            if not (s.preempt and self.priority == READ_AHEAD and piece.end - pos > _HAND_BACK_MIN):
                return False
            rest = _Piece(pos, piece.end, pos)
            piece.end = pos
            at = next(i for i, p in enumerate(self.pieces) if p is piece)
            self.pieces.insert(at + 1, rest)
            self.returned.append(rest)
            s.handed_back += 1
            s.preempt = False  # one connection freed; the open taking it sets the flag again if need be
            return True

    def _progressed(self, piece: _Piece) -> None:
        """Count bytes just written as progress once they reach the floor (or end their piece); called
        with the scheduler lock held."""
        floor = FLOOR_BYTES_PER_S * self._scheduler.timeout
        if self.done - self._counted >= floor or piece.written >= piece.end:
            now = time.monotonic()
            if self.first_byte is None:
                self.first_byte = now
            self.last_progress = now
            self._counted = self.done

    # -- worker side --------------------------------------------------------------------------------
    def run_piece(self, piece: _Piece) -> None:
        s = self._scheduler
        pos = piece.start
        batch: list[bytes] = []
        batch_len = 0
        batch_started = 0.0

        def flush() -> None:
            nonlocal pos, batch, batch_len
            if not batch_len:
                return
            _pwrite_all(self._fd, batch, pos)
            with s._lock:
                piece.written = pos + batch_len
                self.done += batch_len
                self._progressed(piece)
                s.bytes_transferred += batch_len
                if self.keep_bytes and self.error is None and s._buffered + batch_len <= _REORDER_BYTES:
                    piece.batches.append((pos, batch, batch_len))
                    s._buffered += batch_len
                s._progress.notify_all()
            pos += batch_len
            batch, batch_len = [], 0

        def sink(offset: int, data: bytes) -> None:
            nonlocal batch_len, batch_started
            if self.error is not None:
                raise RemoteUnavailable(f"{self.name}: transfer stopped")
            # s.preempt is read without the lock: a hint, checked again in _hand_back.
            if s.preempt and self.priority == READ_AHEAD and piece.end - offset > _HAND_BACK_MIN:
                raise _HandBack(self.name)
            if offset != pos + batch_len:
                raise RemoteUnavailable(f"{self.name}: bytes at offset {offset}, expected {pos + batch_len}")
            now = time.monotonic()
            if not batch_len:
                batch_started = now
            batch.append(data)
            batch_len += len(data)
            # 512: well below IOV_MAX for pwritev
            if batch_len >= _BATCH or len(batch) >= 512 or now - batch_started >= _BATCH_SECONDS:
                flush()

        fruitless = 0
        while pos < piece.end and self.error is None:
            before = pos
            if self._hand_back(piece, pos):
                return
            try:
                self._read(pos, piece.end, sink, time.monotonic() + s.timeout)
                flush()
                if pos < piece.end:
                    raise RemoteUnavailable(f"{self.name}: the range ended early at byte {pos}")
            except RangeIgnored:
                flush()
                raise  # no resuming from that server: the caller fetches one stream instead
            except _HandBack:
                flush()
                continue  # handed back at the top of the loop (or, if the open got a connection, not)
            except RemoteUnavailable as exc:
                flush()  # bytes that arrived before the failure are good: resume after them
                if self.error is not None:
                    break
                fruitless = 0 if pos > before else fruitless + 1
                if fruitless >= STALL_RETRIES:
                    raise RemoteUnavailable(f"{exc} (no byte in {STALL_RETRIES} attempts in a row)") from exc
                logger.info("%s: %s; resuming at byte %d", self.name, exc, pos)


class TransferScheduler:
    """At most `max_connections` transfers' pieces at once, foreground first; plus the read-ahead queue."""

    def __init__(
        self,
        max_connections: int,
        *,
        chunk_size: int,
        parallel_threshold: int,
        timeout: float,
    ):
        self.max_connections = max(1, max_connections)
        self.xet_connections = xet_connections(self.max_connections)
        self._pieces = {False: 0, True: 0}  # running pieces: HTTP (False), Xet (True)
        self.chunk_size = chunk_size
        self.parallel_threshold = parallel_threshold
        self.timeout = timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait for pieces
        self._progress = threading.Condition(self._lock)  # verifiers wait for bytes
        self._transfers: set[Transfer] = set()
        self._seq = 0
        self._workers = 0
        self._idle = 0
        self._buffered = 0
        self._closed = False
        self.bytes_transferred = 0
        # A foreground transfer waits with no connection while every worker is busy: read-ahead pieces
        # hand theirs back (`_update_preempt`). Read by workers without the lock, as a hint.
        self.preempt = False
        self.handed_back = 0  # read-ahead pieces that gave their connection to an open
        # Read-ahead: key -> job, run in order by at most max_connections threads.
        self._ahead: OrderedDict[str, tuple[Callable[[], None], bool]] = OrderedDict()
        self._ahead_threads = 0
        self._ahead_running = 0  # blobs being read ahead
        self._ahead_busy = 0  # read-ahead threads running a job
        self.read_ahead_done = 0

    # -- transfers ----------------------------------------------------------------------------------
    def start(
        self,
        name: str,
        size: int,
        fd: int,
        read: ReadRange,
        priority: int = FOREGROUND,
        piece_size: int | None = None,
        one_stream: bool = False,
        xet: bool = False,
        start_by: float | None = None,
    ) -> Transfer:
        """Queue the download of bytes [0, size) into `fd` (which the transfer now owns: see `release`).

        `piece_size`: the range a connection takes at a time from a large blob (default `chunk_size`);
        a reader with a cost per range (a Xet reconstruction request) asks for larger ones. `one_stream`:
        one connection from byte 0 to the end (a server that ignores Range). `xet`: `read` goes through
        hf_xet (the Xet share of the connections). `start_by` (monotonic): when a foreground open stops
        waiting for the first byte, if not `timeout` from now (a transfer that takes over the wait of a
        failed one gets only what is left of it).
        """
        transfer = Transfer(self, name, size, fd, read, priority, piece_size or self.chunk_size, one_stream, xet)
        with self._lock:
            if self._closed:
                os.close(fd)  # owned from the call on, refused or not
                raise RemoteUnavailable(f"{name}: the mount is shutting down")
            self._seq += 1
            transfer.seq = self._seq
            if priority == FOREGROUND:
                transfer.start_by = start_by if start_by is not None else time.monotonic() + self.timeout
            self._transfers.add(transfer)
            self._wake_worker()
            self._update_preempt()
        return transfer

    def promote(self, transfer: Transfer) -> None:
        """An open now waits for `transfer`: foreground priority, and the open's wait for a first byte."""
        with self._lock:
            if transfer.priority != FOREGROUND:
                transfer.priority = FOREGROUND
                if transfer.first_byte is None:
                    transfer.start_by = time.monotonic() + self.timeout
                self._work.notify()
                self._update_preempt()

    def _room(self, t: Transfer) -> bool:
        """Whether a piece of `t` may start now within the budget (module docstring)."""
        xet_share = self.xet_connections if self._pieces[True] else 0
        if t.xet:
            return self._pieces[True] < self.xet_connections and self._pieces[False] + self.xet_connections <= (
                self.max_connections
            )
        return self._pieces[False] + xet_share < self.max_connections

    def _update_preempt(self) -> None:
        """Called with the lock held whenever transfers, priorities or running pieces change."""
        busy = self._workers - self._idle >= self.max_connections
        self.preempt = any(
            t.priority == FOREGROUND and t.queued and not t.active and (busy or not self._room(t))
            for t in self._transfers
        )

    def _wake_worker(self) -> None:
        if self._idle:
            self._work.notify()
        elif self._workers < self.max_connections:
            self._workers += 1
            threading.Thread(target=self._worker, name="hffs-transfer", daemon=True).start()

    def _next_piece(self) -> tuple[Transfer, _Piece] | None:
        runnable = [t for t in self._transfers if t.queued]
        if not runnable:
            return None
        t = min(runnable, key=lambda t: (t.priority, t.active, t.seq))
        if not self._room(t):  # the first in order waits for room; nothing overtakes it
            return None
        if t.returned:
            piece = t.returned.popleft()
            return self._started(t, piece)
        remaining = t.size - t.next_offset
        if t.one_stream:
            length = remaining
        elif t.size >= self.parallel_threshold:
            # The last pieces shrink (to _PIECE_MIN at least) so that every connection gets a share of the
            # tail and they finish together, instead of one piece running alone at the end.
            length = min(t.piece_size, max(_PIECE_MIN, -(-remaining // self.max_connections)))
        elif t.size >= SPLIT_MIN and len(runnable) == 1:
            free = self.max_connections - (self._workers - self._idle)  # connections nobody uses now
            length = max(_PIECE_MIN, -(-remaining // (free + 1)))
        else:
            length = remaining
        length = min(length, remaining)
        piece = _Piece(t.next_offset, t.next_offset + length, t.next_offset)
        t.next_offset = piece.end
        t.pieces.append(piece)
        return self._started(t, piece)

    def _started(self, t: Transfer, piece: _Piece) -> tuple[Transfer, _Piece]:
        t.active += 1
        self._pieces[t.xet] += 1
        t.last_progress = time.monotonic()  # queued time never counts against a transfer
        if any(other.queued for other in self._transfers):
            self._wake_worker()
        self._update_preempt()
        return t, piece

    def _worker(self) -> None:
        while True:
            with self._lock:
                job = self._next_piece()
                while job is None:
                    if self._closed:
                        self._workers -= 1
                        return
                    self._idle += 1
                    woken = self._work.wait(_WORKER_IDLE)
                    self._idle -= 1
                    job = self._next_piece()
                    if job is None and not woken:
                        self._workers -= 1
                        return
            transfer, piece = job
            try:
                transfer.run_piece(piece)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter, who raises it
                with self._lock:
                    transfer._fail(
                        exc if isinstance(exc, HffsError) else RemoteUnavailable(f"{transfer.name}: {_describe(exc)}")
                    )
            finally:
                with self._lock:
                    transfer.active -= 1
                    self._pieces[transfer.xet] -= 1
                    transfer._close_if_done()
                    self._update_preempt()
                    self._work.notify()  # room freed: a waiting transfer's piece may start now
                    self._progress.notify_all()

    def in_flight_bytes(self) -> int:
        with self._lock:
            return sum(t.done for t in self._transfers)

    # -- read-ahead ---------------------------------------------------------------------------------
    def read_ahead(self, key: str, job: Callable[[], None], counted: bool = True) -> None:
        """Run `job` on a read-ahead thread after every read-ahead queued before it (once per key).

        `counted`: a blob, shown in `read_ahead_status` (not a planning step).
        """
        with self._lock:
            if self._closed or key in self._ahead:
                return
            self._ahead[key] = (job, counted)
            if self._ahead_threads < self.max_connections and self._ahead_threads <= self._ahead_busy:
                self._ahead_threads += 1
                threading.Thread(target=self._ahead_loop, name="hffs-read-ahead", daemon=True).start()

    def cancel_read_ahead(self, key: str) -> None:
        """An open of `key` goes first: drop its queued read-ahead."""
        with self._lock:
            self._ahead.pop(key, None)

    def _ahead_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._ahead:
                    self._ahead_threads -= 1
                    return
                _, (job, counted) = self._ahead.popitem(last=False)
                self._ahead_running += counted
                self._ahead_busy += 1
            try:
                job()
                with self._lock:
                    self.read_ahead_done += counted
            except Exception as exc:  # noqa: BLE001 - a failed read-ahead is nobody's error
                logger.info("read-ahead: %s", _describe(exc))
            finally:
                with self._lock:
                    self._ahead_running -= counted
                    self._ahead_busy -= 1

    def read_ahead_status(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._ahead), "in_flight": self._ahead_running, "done": self.read_ahead_done}

    def close(self) -> None:
        """Unmount: drop queued read-ahead, stop every transfer (their waiters get EIO)."""
        with self._lock:
            self._closed = True
            self._ahead.clear()
            for transfer in list(self._transfers):
                transfer._fail(RemoteUnavailable(f"{transfer.name}: the mount is shutting down"))
            self._work.notify_all()


def _pwrite_all(fd: int, datas: list[bytes], offset: int) -> None:
    written = os.pwritev(fd, datas, offset)
    total = sum(len(d) for d in datas)
    if written < total:  # rare short write: finish the rest piece by piece
        rest = b"".join(datas)[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            written += n
            rest = rest[n:]


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, start: int, end: int) -> None:
    """Ask the kernel to start writing bytes [start, end) of `fd` to disk, without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)); where that is not supported nothing happens."""
    _libc.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def _read_back(fd: int, start: int, end: int, update: Callable[[bytes | memoryview], None], buffer: bytearray) -> None:
    """Feed bytes [start, end) of `fd` to `update` (just written: they come from the page cache).

    Read into `buffer`, reused across calls: a fresh multi-MiB object per read would cost page faults
    and zeroing of new memory, several times the cost of the copy itself."""
    view = memoryview(buffer)
    while start < end:
        n = os.preadv(fd, [view[: min(len(buffer), end - start)]], start)
        if not n:
            raise RemoteUnavailable(f"temp file shorter than expected at byte {start}")
        update(view[:n])
        start += n
