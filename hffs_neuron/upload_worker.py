"""Upload calls (bucket batches, repo commits) in a long-lived process of their own, so that a stalled upload
can be stopped.

`UploadWorker` (one per publisher, and one per `mountctl push`) starts `python -m hffs_neuron.upload_worker`
once and keeps it: Python, huggingface_hub and hf_xet start once, and the Xet session and HTTP connections
are reused from call to call. Each call goes over a Unix SOCK_SEQPACKET socket pair: a JSON request
(`{"endpoint", "target", "add": [destination, ...]}`, `target` as `publish.upload_target` gives it; the
token, if any, is in the worker's environment, never on the command line) with the files' fds attached
(SCM_RIGHTS: the worker reads the very open files the caller checked, through `/proc/self/fd/N` of its own
copies); the worker answers one JSON record, `{}` or `{"error", "status", "retry_after"}`.

hf_xet offers no way to abort an upload from outside, and the upload holds the files' fds: killing the
process ends both. The caller waits on the socket (an answer wakes it at once) and reads the worker's byte
counters (`/proc/<pid>/io`) while it waits; once no byte has moved for the call's stall timeout, the worker
is killed and the call fails (UploadFailed); the next call starts a fresh worker.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

# SCM_RIGHTS carries at most 253 fds per message (the kernel's SCM_MAX_FD); a repo commit may hold 256.
_FDS_PER_MESSAGE = 200
_MAX_RECORD = 1 << 20  # one request or answer (a 256-file commit's destinations are ~40 KB)
_EXIT_WAIT_S = 5.0  # a worker told to stop (its socket closed) exits within this, else it is killed
# How often a waiting caller reads the worker's byte counters: often enough that a stall is noticed within
# a quarter of its timeout, at most once a second (an answer does not wait for it).
_MAX_CHECK_S = 1.0
RETRY_AFTER_MAX_S = 600.0  # a longer Retry-After is cut to this: every wait is bounded


class UploadFailed(Exception):
    """An upload call failed in its worker process; `status` is the Hub's HTTP status, if it answered, and
    `retry_after` the seconds its `Retry-After` asked for, if any."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked to wait before retrying (`Retry-After` in seconds, at most
    RETRY_AFTER_MAX_S) from an UploadFailed or a huggingface_hub HTTP error; None if it said nothing."""
    if isinstance(exc, UploadFailed):
        return exc.retry_after
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        seconds = float(headers.get("Retry-After") or "")
    except ValueError:  # absent, or the HTTP-date form: the caller's own backoff applies
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


def _io_bytes(pid: int) -> int:
    """Bytes process `pid` has read and written so far (files and sockets alike), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("rchar", 0)) + int(fields.get("wchar", 0))
    except (OSError, ValueError):
        return 0


class UploadWorker:
    """One upload worker process, started at the first call (or `start`) and again after it was killed.

    Calls are serialized (one worker, one call at a time). `close` ends the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self.started = 0  # worker processes started so far (a stalled one is replaced)

    @property
    def pid(self) -> int | None:
        """The running worker's process id, None if none runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the worker process now (it loads huggingface_hub and hf_xet while nothing waits on it)."""
        with self._lock:
            self._ensure()

    def call(self, endpoint: str | None, target: dict, files: Sequence[tuple[int, str]], stall_timeout: float) -> None:
        """Upload `files` ((fd, destination) pairs) to `target` in the worker; raises UploadFailed if the
        call fails, or once no byte has moved for `stall_timeout` seconds (the worker is then killed)."""
        request = json.dumps({"endpoint": endpoint, "target": target, "add": [dest for _, dest in files]}).encode()
        fds = [fd for fd, _ in files]
        with self._lock:
            sock = self._ensure()
            try:
                socket.send_fds(sock, [request], fds[:_FDS_PER_MESSAGE])
                for start in range(_FDS_PER_MESSAGE, len(fds), _FDS_PER_MESSAGE):
                    socket.send_fds(sock, [b"+"], fds[start : start + _FDS_PER_MESSAGE])
                answer = self._answer(sock, stall_timeout)
            except BaseException:
                self._stop(kill=True)  # a stalled, dead or interrupted worker is not used again
                raise
        if "error" in answer:
            raise UploadFailed(answer["error"], answer.get("status"), answer.get("retry_after"))

    def close(self) -> None:
        """End the worker: it exits when its socket closes (killed if it does not within a few seconds, or
        if a call still runs then: that call fails and its caller reaps the worker)."""
        if self._lock.acquire(timeout=_EXIT_WAIT_S):
            try:
                self._stop(kill=False)
            finally:
                self._lock.release()
        elif (process := self._process) is not None:
            process.kill()

    def _ensure(self) -> socket.socket:
        if self._process is not None and self._process.poll() is None and self._socket is not None:
            return self._socket
        self._stop(kill=True)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "hffs_neuron.upload_worker", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # hf_xet's progress noise; failures come back on the socket
                pass_fds=[theirs.fileno()],
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._socket = mine
        self.started += 1
        logger.debug("upload worker %d started", self._process.pid)
        return mine

    def _answer(self, sock: socket.socket, stall_timeout: float) -> dict[str, Any]:
        """The worker's answer to the request just sent, waiting while its byte counters move."""
        assert self._process is not None
        pid = self._process.pid
        check = min(_MAX_CHECK_S, max(0.01, stall_timeout / 4))
        moved, last_move = _io_bytes(pid), time.monotonic()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while not poller.poll(check * 1000):
            now_moved = _io_bytes(pid)
            if now_moved != moved:
                moved, last_move = now_moved, time.monotonic()
            elif time.monotonic() - last_move > stall_timeout:
                raise UploadFailed(f"upload stalled: no byte moved for {stall_timeout:.0f} s")
        record = sock.recv(_MAX_RECORD)
        if not record:  # the worker ended without answering
            status = self._process.wait(_EXIT_WAIT_S)
            raise UploadFailed(f"upload worker ended with status {status}")
        return json.loads(record)

    def _stop(self, *, kill: bool) -> None:
        process, sock = self._process, self._socket
        self._process = self._socket = None
        if sock is not None:
            sock.close()  # the worker's signal to exit once its call is done
        if process is None:
            return
        if kill:
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve(sock: socket.socket) -> None:
    """The worker's loop: one request at a time until the socket closes."""
    from huggingface_hub import HfApi

    from hffs_neuron import publish

    apis: dict[str | None, HfApi] = {}
    while True:
        record, fds, _, _ = socket.recv_fds(sock, _MAX_RECORD, _FDS_PER_MESSAGE)
        if not record:
            return
        request = json.loads(record)
        destinations = request["add"]
        while len(fds) < len(destinations):
            _, more, _, _ = socket.recv_fds(sock, 1, _FDS_PER_MESSAGE)
            if not more:
                return
            fds += more
        answer: dict[str, Any] = {}
        try:
            if request["endpoint"] not in apis:
                apis[request["endpoint"]] = HfApi(endpoint=request["endpoint"])
            api = apis[request["endpoint"]]
            add = [(f"/proc/self/fd/{fd}", dest) for fd, dest in zip(fds, destinations, strict=True)]
            publish.send(api, request["target"], add)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which classifies it
            status = getattr(getattr(exc, "response", None), "status_code", None)
            answer = {"error": f"{type(exc).__name__}: {exc}", "status": status, "retry_after": retry_after(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(answer).encode())


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        _serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
