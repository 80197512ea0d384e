"""One bucket upload call in a process of its own, so that a stalled upload can be stopped.

`publish.run_upload` starts `python -m hffs_neuron.upload_worker` with the files' fds inherited and the
request on standard input (`{"endpoint", "bucket_id", "add": [[source, destination], ...]}`; the token,
if any, is in the environment, never on the command line). hf_xet offers no way to abort an upload
from outside, and the upload holds the files' fds: ending the process ends both. On failure the worker
prints one JSON line, `{"error": message, "status": HTTP status or null}`, and exits 1.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from huggingface_hub import HfApi

    from hffs_neuron import publish

    request = json.loads(sys.stdin.read())
    try:
        api = HfApi(endpoint=request["endpoint"])
        publish.upload_to_bucket(api, request["bucket_id"], [tuple(pair) for pair in request["add"]])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which classifies it
        status = getattr(getattr(exc, "response", None), "status_code", None)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "status": status}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
