"""Every error the library raises, each carrying the errno a filesystem should answer with.

The FUSE adapter turns any `HffsError` into `FuseOSError(err.errno)`; the CLI prints `str(err)` as its
one-line message and exits with `err.exit_code`.
"""

from __future__ import annotations

import errno as _errno


class HffsError(Exception):
    """Base class: an I/O failure unless a subclass says otherwise."""

    errno: int = _errno.EIO
    exit_code: int = 1


class RemoteNotFound(HffsError):
    """The repo, revision, bucket or path does not exist upstream."""

    errno = _errno.ENOENT
    exit_code = 4


class PathNotFound(HffsError):
    """A local path given to a command does not exist."""

    errno = _errno.ENOENT
    exit_code = 4


class RemoteAccessDenied(HffsError):
    """Unauthorized, forbidden or gated: a token with access is needed. `repo`: the repo refused, if known."""

    errno = _errno.EACCES
    exit_code = 5

    def __init__(self, message: str, repo: str | None = None):
        super().__init__(message)
        self.repo = repo


def no_access(repo: str) -> RemoteAccessDenied:
    """EACCES for a gated or private `repo` (ORG/NAME): only the mount's own token ever reaches the Hub,
    so a client's HF_TOKEN cannot help; the message says which token counts."""
    return RemoteAccessDenied(f"this mount's token (--token-file at mount time) has no access to {repo}", repo=repo)


class RemoteUnavailable(HffsError):
    """A transient failure (timeout, reset, 429, 5xx) that outlasted every retry and the deadline."""

    errno = _errno.EIO
    exit_code = 6


class RangeIgnored(RemoteUnavailable):
    """The server answered a Range request for bytes past the start with the whole body (200): pieces
    cannot be fetched from it, only one stream from byte 0."""


class Throttled(HffsError):
    """Over this mount's own limit on upstream lookups: try again shortly (nothing was cached)."""

    errno = _errno.EAGAIN
    exit_code = 6


class IntegrityError(HffsError):
    """Downloaded bytes do not match the expected size or content hash; they were discarded."""

    errno = _errno.EIO


class CacheFull(HffsError):
    """No room on the cache disk for a blob, even after evicting every blob not in use."""

    errno = _errno.ENOSPC


class UnsafeName(HffsError):
    """A remote name that would escape the mount or cannot be a file name (`..`, `/`, NUL...)."""

    errno = _errno.ENOENT


class ReadOnly(HffsError):
    """A write to content that comes from the Hub, or to a `--read-only` mount."""

    errno = _errno.EROFS


class UsageError(HffsError):
    """Bad command-line or API input: what is wrong and what to do instead."""

    errno = _errno.EINVAL
    exit_code = 2


class MountError(HffsError):
    """The mount could not be set up, or torn down (mountpoint state, FUSE, daemon)."""

    exit_code = 3
