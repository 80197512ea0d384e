"""Remotes: a Hub repo pinned to a commit, or a Storage Bucket, behind one small interface."""

from .admission import AdmissionLimiter
from .base import Digest, Remote, RemoteEntry, is_git_oid, is_safe_path, is_sha256
from .bucket import Bucket, check_bucket_id
from .http import HubHttp, token_fingerprint
from .hub import HubRepo, check_repo_id

__all__ = [
    "AdmissionLimiter",
    "Bucket",
    "Digest",
    "HubHttp",
    "HubRepo",
    "Remote",
    "RemoteEntry",
    "check_bucket_id",
    "check_repo_id",
    "is_git_oid",
    "is_safe_path",
    "is_sha256",
    "token_fingerprint",
]
