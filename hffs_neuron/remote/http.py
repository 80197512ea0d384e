"""HTTP to the Hub with deadlines, bounded retries and filesystem-shaped errors.

Auth headers and error classes come from huggingface_hub; the client is our own `httpx2.Client` because
huggingface_hub's shared session has no timeout, and a FUSE call must never wait without a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, get_token, hf_raise_for_status

from .. import __version__, constants
from ..errors import HffsError, RangeIgnored, RemoteAccessDenied, RemoteNotFound, RemoteUnavailable, no_access
from ..telemetry import timed_send

logger = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def token_fingerprint(token: str | None) -> str:
    """A short, non-reversible name for a token, usable in cache keys and status output."""
    if not token:
        return "anonymous"
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class _Transient(Exception):
    """Internal: a failure worth retrying, with an optional server-requested wait."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after_seconds(response: httpx2.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class HubHttp:
    """Requests to one endpoint with one identity.

    Every request has a connect and a per-read deadline; every operation (including its retries) has
    an overall deadline. Errors leave as `RemoteNotFound` (ENOENT), `RemoteAccessDenied` (EACCES) or
    `RemoteUnavailable` (EIO).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        connect_timeout: float = constants.CONNECT_TIMEOUT,
        read_timeout: float = constants.READ_TIMEOUT,
        operation_timeout: float = constants.OPERATION_TIMEOUT,
        max_retries: int = constants.MAX_RETRIES,
        max_connections: int = 64,
        max_listing_pages: int = constants.MAX_LISTING_PAGES,
        offline: bool = False,
    ):
        self.endpoint = (endpoint or hf_constants.ENDPOINT).rstrip("/")
        self._token = token if token is not None else get_token()
        self.token_fingerprint = token_fingerprint(self._token)
        self.operation_timeout = operation_timeout
        self.max_retries = max_retries
        self.max_listing_pages = max_listing_pages
        # HF_HUB_OFFLINE=1 in the daemon's environment: nothing is ever sent; what is not cached is missing.
        self.offline = offline
        self._client = httpx2.Client(
            follow_redirects=True,  # httpx drops Authorization on cross-origin redirects (CDN)
            timeout=httpx2.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._headers = build_hf_headers(
            token=self._token or False, library_name="hffs-neuron", library_version=__version__
        )
        self._lock = threading.Lock()
        self.requests_sent = 0

    @property
    def headers(self) -> dict[str, str]:
        """The headers of every request to the endpoint (auth included): for the Xet token route."""
        return dict(self._headers)

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    def close(self) -> None:
        self._client.close()

    # -- core retry loop ------------------------------------------------------------------------
    def with_retries(self, what: str, attempt: Callable[[float], Any], deadline: float | None = None) -> Any:
        """Run `attempt(deadline)` until it succeeds, a permanent error occurs, or retries/time run out.

        `attempt` raises `_Transient` (or an httpx2 transport error) for retryable failures.
        """
        deadline = deadline or time.monotonic() + self.operation_timeout
        last: Exception | None = None
        for attempt_no in range(self.max_retries + 1):
            if time.monotonic() >= deadline:
                break
            try:
                return attempt(deadline)
            except (_Transient, httpx2.TransportError) as exc:
                last = exc
                wait = min(constants.RETRY_MAX_WAIT, constants.RETRY_BASE_WAIT * 2**attempt_no)
                wait = wait * (0.5 + random.random())  # jitter: de-synchronise many readers
                if isinstance(exc, _Transient) and exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                if attempt_no == self.max_retries or time.monotonic() + wait >= deadline:
                    break
                logger.info("%s: %s; retry %d in %.2fs", what, _describe(exc), attempt_no + 1, wait)
                time.sleep(wait)
        raise RemoteUnavailable(f"{what}: {_describe(last) if last else 'deadline exceeded'} (gave up after retries)")

    def _send(
        self, method: str, url: str, deadline: float, stream: bool = False, anonymous: bool = False, **kwargs: Any
    ) -> httpx2.Response:
        """One attempt; `anonymous`: without our token (a URL the endpoint sent us to on another origin)."""
        if self.offline:
            raise RemoteNotFound(f"{urlsplit(url).path}: not cached, and HF_HUB_OFFLINE=1 keeps the mount off the Hub")
        headers = {k: v for k, v in self._headers.items() if not (anonymous and k.lower() == "authorization")}
        headers.update(kwargs.pop("headers", None) or {})
        # A third of the operation's deadline at most (capped by what is left of it), so a stalled
        # attempt leaves room for a retry on a new connection.
        cap = min(max(0.1, deadline - time.monotonic()), self.operation_timeout * constants.ATTEMPT_TIMEOUT_FRACTION)
        timeout = self._client.timeout
        timeout = httpx2.Timeout(min(timeout.read or cap, cap), connect=min(timeout.connect or cap, cap))
        with self._lock:
            self.requests_sent += 1
        request = self._client.build_request(method, url, headers=headers, timeout=timeout, **kwargs)
        # Always streamed: a body read in one call would only see the per-read timeout, and a body that
        # trickles (a byte now and then) would hold the call far past the operation's deadline.
        response = timed_send(self._client.send, request, stream=True)
        if response.status_code in _RETRY_STATUS:
            retry_after = _retry_after_seconds(response)
            response.close()
            raise _Transient(f"HTTP {response.status_code}", retry_after)
        if not stream:
            _read_by(response, deadline)
        return response

    def request(
        self, method: str, path_or_url: str, what: str | None = None, *, deadline: float | None = None, **kwargs: Any
    ) -> httpx2.Response:
        """One complete (non-streamed) request with retries; raises mapped errors on 4xx."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        what = what or f"{method} {url}"

        def attempt(deadline: float) -> httpx2.Response:
            response = self._send(method, url, deadline, **kwargs)
            raise_for_status(response, what)
            return response

        return self.with_retries(what, attempt, deadline)

    def request_json(
        self, method: str, path_or_url: str, what: str | None = None, *, deadline: float | None = None, **kwargs: Any
    ) -> tuple[Any, httpx2.Response]:
        """Like `request`, and parse the JSON body inside the retry loop.

        A body that is not valid JSON (damaged or cut short in transit) is a transient failure: it is
        retried, and never escapes as a bare ValueError that no caller maps to an errno.
        """
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        what = what or f"{method} {url}"

        def attempt(deadline: float) -> tuple[Any, httpx2.Response]:
            response = self._send(method, url, deadline, **kwargs)
            raise_for_status(response, what)
            try:
                return response.json(), response
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both derive from it
                raise _Transient(f"invalid JSON in the response ({exc.__class__.__name__})") from exc

        return self.with_retries(what, attempt, deadline)

    def get_json(self, path_or_url: str, what: str | None = None, **kwargs: Any) -> Any:
        return self.request_json("GET", path_or_url, what, **kwargs)[0]

    def paginate(self, path: str, params: dict[str, Any] | None, what: str) -> Iterator[dict]:
        """Yield items of a JSON-list endpoint, page by page (see `pages`)."""
        for items in self.pages(path, params, what):
            yield from items

    def pages(self, path: str, params: dict[str, Any] | None, what: str) -> Iterator[list]:
        """Yield each page of a JSON-list endpoint, following `Link: <...>; rel="next"` pages.

        Each page has its own deadline (`operation_timeout`) and a retry asks for that same page (the
        `next` link is the cursor), so a slow but moving listing completes: a version directory of 10,000
        modules or a large dataset from a Hub that pages slowly. At most `max_listing_pages` pages: a
        server that keeps sending `next` links fails the listing instead of holding it forever. Only the
        endpoint's origin gets our token: a `next` link elsewhere is followed without it (as httpx does
        for redirects).
        """
        url, anonymous = path, False
        for _page in range(self.max_listing_pages):
            deadline = time.monotonic() + self.operation_timeout
            items, response = self.request_json("GET", url, what, deadline=deadline, params=params, anonymous=anonymous)
            if not isinstance(items, list):
                raise HffsError(f"{what}: the server answered {type(items).__name__}, expected a list")
            yield items
            if "next" not in response.links:
                return
            url, params = response.links["next"].get("url", ""), None
            anonymous = not self._same_origin(url)
        raise HffsError(f"{what}: more than {self.max_listing_pages} pages; giving up on this listing")

    def _same_origin(self, url: str) -> bool:
        mine, theirs = urlsplit(self.endpoint), urlsplit(url)
        return (mine.scheme, mine.netloc.lower()) == (theirs.scheme, theirs.netloc.lower())

    def stream_range(
        self,
        url: str,
        start: int,
        end: int,
        sink: Callable[[int, bytes], None],
        what: str,
        deadline: float | None = None,
    ) -> None:
        """Stream bytes [start, end) to `sink(offset, data)`, resuming after transient failures.

        A 200 to a request from byte 0 is the whole body: its first `end` bytes are taken. A 200 to a
        request past the start raises `RangeIgnored` at once (that server will not resume or serve a
        piece; the caller fetches one stream from 0). Another range than the one asked
        (`Content-Range`, checked on every attempt, resumes included) or the wrong length is a transient
        failure: retried, and nothing of that answer reaches `sink`.
        """
        if end <= start:
            return
        position = start

        def attempt(deadline: float) -> None:
            nonlocal position
            headers = {"Range": f"bytes={position}-{end - 1}", "Accept-Encoding": "identity"}
            response = self._send("GET", url, deadline, stream=True, headers=headers)
            try:
                raise_for_status(response, what)
                whole = response.status_code == 200
                if whole and position > 0:
                    raise RangeIgnored(f"{what}: the server ignored Range (HTTP 200 to bytes={position}-)")
                if not whole and response.status_code != 206:
                    raise _Transient(f"HTTP {response.status_code} to a Range request")
                if not whole:
                    _check_content_range(response.headers.get("Content-Range"), position, end)
                for data in response.iter_raw():  # network-sized pieces: no 1 MiB re-chunking copies
                    if time.monotonic() > deadline:
                        raise _Transient("deadline exceeded mid-body")
                    room = end - position
                    if len(data) > room:
                        if not whole:
                            raise _Transient("server sent more bytes than requested")
                        data = data[:room]  # the whole body: what follows is not asked for
                    sink(position, data)
                    position += len(data)
                    if whole and position == end:
                        break
                if position < end:
                    raise _Transient(f"truncated body: {end - position} bytes missing")
            finally:
                response.close()

        self.with_retries(what, attempt, deadline)


def _read_by(response: httpx2.Response, deadline: float) -> None:
    """Read the whole body (then available as `response.content`), or raise `_Transient` once `deadline`
    (monotonic) passes: a body below any useful rate is a stall, however steadily its bytes come."""
    chunks = []
    try:
        for data in response.iter_bytes():
            if time.monotonic() > deadline:
                raise _Transient("deadline exceeded mid-body")
            chunks.append(data)
    finally:
        response.close()
    response._content = b"".join(chunks)  # what `Response.read()` sets; the body is now in memory


def _check_content_range(header: str | None, start: int, end: int) -> None:
    """Raise `_Transient` unless a 206's `Content-Range` is exactly bytes [start, end)."""
    match = _CONTENT_RANGE.match(header or "")
    if match is None:
        raise _Transient(f"206 answer with an unusable Content-Range {header!r}")
    first, last = int(match.group(1)), int(match.group(2))
    if (first, last) != (start, end - 1):
        raise _Transient(f"206 answer for bytes {first}-{last} to a request for bytes {start}-{end - 1}")


def raise_for_status(response: httpx2.Response, what: str) -> None:
    """Map a 4xx answer to a filesystem-shaped error (reading the body for the message)."""
    if response.status_code < 400:
        return
    if response.is_stream_consumed is False:
        try:
            response.read()
        except httpx2.HTTPError:
            pass
    try:
        hf_raise_for_status(response)
    except hf_errors.GatedRepoError as exc:
        raise no_access(exc.repo_id or what) from exc
    except (
        hf_errors.RepositoryNotFoundError,
        hf_errors.RevisionNotFoundError,
        hf_errors.RemoteEntryNotFoundError,
        hf_errors.BucketNotFoundError,
    ) as exc:
        if response.status_code == 401:
            raise RemoteNotFound(f"{what}: not found (or private: the mount's --token-file has no access)") from exc
        raise RemoteNotFound(f"{what}: not found") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = response.status_code
        if status in (401, 403):
            raise RemoteAccessDenied(f"{what}: access denied (HTTP {status}) to the mount's --token-file") from exc
        if status == 404:
            raise RemoteNotFound(f"{what}: not found") from exc
        raise HffsError(f"{what}: HTTP {status}") from exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx2.TransportError):
        return f"connection error ({type(exc).__name__})"
    return str(exc)
