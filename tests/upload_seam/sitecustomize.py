"""Test seam for publisher tests: fail the k-th bucket upload of a daemon, log every call's destinations.

Put this directory on a daemon's PYTHONPATH with HFFS_TEST_UPLOAD_LOG set: Python imports `sitecustomize`
at start (in the daemon and in the upload worker it starts), and this one wraps
`hffs_neuron.publish.upload_to_bucket`, the one function that performs the `batch_bucket_files` call.
Every call is recorded as a JSON line in HFFS_TEST_UPLOAD_LOG (destinations and wall-clock time), then
made for real (hf_xet to the emulator's CAS, then its batch route) unless
HFFS_TEST_UPLOAD_FAIL="<status>@<k>[:<retry after>]" says that the k-th call fails with that HTTP status
(and that `Retry-After` header), as the Hub would answer once huggingface_hub's own retries are spent.
Emulator faults cannot pick the k-th call of one route; every other publisher test injects its failures
there instead.
"""

from __future__ import annotations

import json
import os
import time

_log = os.environ.get("HFFS_TEST_UPLOAD_LOG")
if _log:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from hffs_neuron import publish

    _status, _, _when = os.environ.get("HFFS_TEST_UPLOAD_FAIL", "").partition("@")
    _only, _, _retry_after = _when.partition(":")
    _real = publish.upload_to_bucket

    def upload_to_bucket(api: object, bucket_id: str, additions: list[tuple[str, str]]) -> None:
        # The log's lines count the calls (a worker replaced after a stall counts on).
        with open(_log, "a") as log:
            log.write(json.dumps({"bucket": bucket_id, "add": [dest for _, dest in additions], "time": time.time()}))
            log.write("\n")
        with open(_log) as log:
            calls = sum(1 for _ in log)
        if _status and calls == int(_only):
            request = httpx2.Request("POST", f"http://hub/api/buckets/{bucket_id}/batch")
            headers = {"Retry-After": _retry_after} if _retry_after else {}
            response = httpx2.Response(int(_status), request=request, headers=headers)
            raise HfHubHTTPError(f"{_status} injected", response=response)
        _real(api, bucket_id, additions)

    publish.upload_to_bucket = upload_to_bucket
