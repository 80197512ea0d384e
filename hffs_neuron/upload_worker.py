"""One upload call (a bucket batch, or a repo commit) in a process of its own, so that a stalled upload can
be stopped.

`run_upload` (in the daemon or `mountctl push`) starts `python -m hffs_neuron.upload_worker` with the
files' fds inherited and the request on standard input (`{"endpoint", "target", "add": [[source,
destination], ...]}`, `target` as `publish.upload_target` gives it; the token, if any, is in the
environment, never on the command line). hf_xet
offers no way to abort an upload from outside, and the upload holds the files' fds: ending the process
ends both. On failure the worker
prints one JSON line, `{"error": message, "status": HTTP status or null}`, and exits 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

_POLL_S = 0.25  # how often a worker's byte counters are read


class UploadFailed(Exception):
    """An upload call failed in its worker process; `status` is the Hub's HTTP status, if it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _io_bytes(pid: int) -> int:
    """Bytes process `pid` has read and written so far (files and sockets alike), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("rchar", 0)) + int(fields.get("wchar", 0))
    except (OSError, ValueError):
        return 0


def run_upload(
    endpoint: str | None, target: dict, add: list[tuple[str, str]], fds: list[int], stall_timeout: float
) -> None:
    """One upload call to `target` in a worker process (`upload_worker`) holding `fds`, stopped once no byte
    has moved for `stall_timeout` seconds (UploadFailed): however the Hub or hf_xet stalls, publishing goes
    on."""
    request = json.dumps({"endpoint": endpoint, "target": target, "add": add})
    worker = subprocess.Popen(
        [sys.executable, "-m", "hffs_neuron.upload_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # hf_xet's progress noise; failures come back on stdout
        pass_fds=fds,
        text=True,
    )
    try:
        worker.stdin.write(request)
        worker.stdin.close()
        moved, last_move = _io_bytes(worker.pid), time.monotonic()
        while worker.poll() is None:
            time.sleep(_POLL_S)
            now_moved = _io_bytes(worker.pid)
            if now_moved != moved:
                moved, last_move = now_moved, time.monotonic()
            elif time.monotonic() - last_move > stall_timeout:
                raise UploadFailed(f"upload stalled: no byte moved for {stall_timeout:.0f} s")
        output = worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        worker.stdout.close()
    if worker.returncode != 0:
        try:
            failure = json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise UploadFailed(f"upload worker ended with status {worker.returncode}") from None
        raise UploadFailed(failure.get("error", "upload failed"), failure.get("status"))


def main() -> int:
    from huggingface_hub import HfApi

    from hffs_neuron import publish

    request = json.loads(sys.stdin.read())
    try:
        api = HfApi(endpoint=request["endpoint"])
        publish.send(api, request["target"], [tuple(pair) for pair in request["add"]])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which classifies it
        status = getattr(getattr(exc, "response", None), "status_code", None)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "status": status}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
