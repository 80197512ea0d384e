"""Test seam for one publisher test: fail the k-th bucket upload of a daemon, log every call's destinations.

Put this directory on a daemon's PYTHONPATH with HFFS_TEST_UPLOAD_LOG set: Python imports `sitecustomize`
at start (in the daemon and in each upload worker it starts), and this one wraps
`hffs_neuron.publish.upload_to_bucket`, the one function that performs the `batch_bucket_files` call.
Every call is recorded as a JSON line in HFFS_TEST_UPLOAD_LOG, then made for real (hf_xet to the
emulator's CAS, then its batch route) unless HFFS_TEST_UPLOAD_FAIL="<status>@<k>" says
that the k-th call fails with that HTTP status, as the Hub would answer. Emulator faults cannot pick the
k-th call of one route; every other publisher test injects its failures there instead.
"""

from __future__ import annotations

import json
import os

_log = os.environ.get("HFFS_TEST_UPLOAD_LOG")
if _log:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from hffs_neuron import publish

    _status, _, _only = os.environ.get("HFFS_TEST_UPLOAD_FAIL", "").partition("@")
    _real = publish.upload_to_bucket

    def upload_to_bucket(api: object, bucket_id: str, additions: list[tuple[str, str]]) -> None:
        # Each call runs in its own upload worker process: the log's lines count the calls.
        with open(_log, "a") as log:
            log.write(json.dumps({"bucket": bucket_id, "add": [dest for _, dest in additions]}) + "\n")
        with open(_log) as log:
            calls = sum(1 for _ in log)
        if _status and calls == int(_only):
            request = httpx2.Request("POST", f"http://hub/api/buckets/{bucket_id}/batch")
            raise HfHubHTTPError(f"{_status} injected", response=httpx2.Response(int(_status), request=request))
        _real(api, bucket_id, additions)

    publish.upload_to_bucket = upload_to_bucket
