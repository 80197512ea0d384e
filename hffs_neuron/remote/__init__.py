"""Remotes: a Hub repo pinned to a commit, or a Storage Bucket, behind one small interface."""

from .base import Digest, Remote, RemoteEntry, is_safe_path
from .bucket import Bucket, check_bucket_id
from .http import HubHttp, token_fingerprint
from .hub import HubRepo, check_repo_id

__all__ = [
    "Bucket",
    "Digest",
    "HubHttp",
    "HubRepo",
    "Remote",
    "RemoteEntry",
    "check_bucket_id",
    "check_repo_id",
    "is_safe_path",
    "token_fingerprint",
]
