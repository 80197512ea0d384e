"""Test seam for bucket uploads in mount daemons (the emulator does not accept Xet uploads yet).

Put this directory on a daemon's PYTHONPATH with HFFS_TEST_BUCKETS=<emulator root>/buckets: Python
imports `sitecustomize` at start, and this one replaces only `hffs_neuron.publish.upload_to_bucket`,
the one function that performs the `batch_bucket_files` call, with one that writes each file into the
emulator's bucket directory (temp file + rename, as a real upload appears whole). Every call is recorded
as a JSON line in HFFS_TEST_UPLOAD_LOG. HFFS_TEST_UPLOAD_FAIL makes calls fail with an HTTP status, as
the Hub would answer: "<status>" every call, "<status>x<n>" the first n, "<status>@<k>" the k-th only.
"""

from __future__ import annotations

import json
import os
import shutil

_buckets = os.environ.get("HFFS_TEST_BUCKETS")
if _buckets:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from hffs_neuron import publish

    _fail = os.environ.get("HFFS_TEST_UPLOAD_FAIL", "")
    _status, _, _only = _fail.partition("@")
    _status, _, _first = _status.partition("x")
    _calls = [0]

    def _fails(call: int) -> bool:
        if not _status:
            return False
        if _only:
            return call == int(_only)
        return not _first or call <= int(_first)

    def upload_to_bucket(api: object, bucket_id: str, additions: list[tuple[str, str]]) -> None:
        with open(os.environ["HFFS_TEST_UPLOAD_LOG"], "a") as log:
            log.write(json.dumps({"bucket": bucket_id, "add": [dest for _, dest in additions]}) + "\n")
        _calls[0] += 1
        if _fails(_calls[0]):
            request = httpx2.Request("POST", f"http://hub/api/buckets/{bucket_id}/batch")
            raise HfHubHTTPError(f"{_status} injected", response=httpx2.Response(int(_status), request=request))
        for src, dest in additions:
            target = os.path.join(_buckets, bucket_id, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # Written beside the buckets, not in one: a listing never shows a half-uploaded file.
            tmp = os.path.join(_buckets, os.pardir, "tmp", f"upload.{os.getpid()}.{os.path.basename(dest)}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)

    publish.upload_to_bucket = upload_to_bucket
