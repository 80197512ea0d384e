"""Mount sources of the NEFF view: one parsing of every spelling, one canonical string per source.

Accepted (README "Using it" and "Commands"):

- `ORG/NAME`: a Storage Bucket (as always); `neff:ORG/NAME` is the fstab spelling of the same;
- `hf://buckets/ORG/NAME[/PREFIX]`: a bucket, optionally one folder of it (as `--prefix`);
- `hf://ORG/NAME[@REV]`: a model repo (the optimum-neuron cache, `aws-neuron/optimum-neuron-cache`);
- `hf://datasets/ORG/NAME[@REV]`: a dataset repo.

REV is a branch, tag or commit, URL-encoded as huggingface_hub writes it (`refs%2Fpr%2F1`); without it
the repo's `main` branch is followed. The canonical string is the bare id for a whole bucket, else the
`hf://` form (`@main` is dropped: it is the default). Anything else is refused with one line (UsageError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from .errors import UsageError

if TYPE_CHECKING:
    from .remote.bucket import Bucket
    from .remote.http import HubHttp
    from .remote.repo import RepoTree

BUCKET = "bucket"
MODEL = "model"
DATASET = "dataset"
REPO_KINDS = (MODEL, DATASET)
DEFAULT_REVISION = "main"
_FORMS = "ORG/NAME, hf://buckets/ORG/NAME[/PREFIX], hf://ORG/NAME[@REV] or hf://datasets/ORG/NAME[@REV]"


@dataclass(frozen=True)
class Source:
    """What a NEFF mount reads: a bucket (with `prefix`) or a model or dataset repo (at `revision`)."""

    kind: str  # BUCKET, MODEL or DATASET
    repo_id: str  # ORG/NAME, as written (the Hub's casing is learnt at mount)
    prefix: str = ""  # buckets only
    revision: str | None = None  # repos only; None: the default branch

    @property
    def is_repo(self) -> bool:
        return self.kind in REPO_KINDS

    @property
    def canonical(self) -> str:
        """The one string of this source: fstab fsname, status and state files use it."""
        if self.kind == BUCKET:
            return f"hf://buckets/{self.repo_id}/{self.prefix}" if self.prefix else self.repo_id
        kind = "datasets/" if self.kind == DATASET else ""
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"hf://{kind}{self.repo_id}{rev}"

    def open(self, http: HubHttp, ref_ttl: float, *, defer: bool = False) -> Bucket | RepoTree:
        """The NEFF view's remote of this source (resolved now: a request to the Hub); a repo checks its
        branch for new commits at most once per `ref_ttl` seconds, and with `defer` comes up through a
        transient failure, resolved on first use."""
        from .remote.bucket import Bucket
        from .remote.repo import RepoTree

        if self.kind == BUCKET:
            return Bucket(http, self.repo_id, self.prefix)
        return RepoTree(http, self, ref_ttl, defer=defer)

    def config_fields(self) -> tuple[str, str | None]:
        """(MountConfig.source, MountConfig.prefix): a bucket keeps its id and prefix apart, as before
        (`mountctl push` and the layer key read them so); a repo is its canonical string."""
        if self.kind == BUCKET:
            return self.repo_id, self.prefix or None
        return self.canonical, None


def parse_source(text: str, prefix: str | None = None) -> Source:
    """The source `text` names (`prefix`: a `--prefix`, buckets only). UsageError for any other form."""
    from .remote.bucket import check_bucket_id
    from .remote.hub import check_repo_id

    if not isinstance(text, str) or not text or not text.isprintable() or any(c.isspace() for c in text):
        raise UsageError(f"invalid source {str(text)[:120]!r}: expected {_FORMS}")
    body = text.removeprefix("neff:")
    if not body.startswith("hf://"):
        if "@" in body or ":" in body:
            raise UsageError(f"invalid source {text!r}: expected {_FORMS}")
        check_bucket_id(body)
        return _bucket(body, prefix or "")
    rest = body[len("hf://") :]
    if rest.startswith("buckets/"):
        parts = rest[len("buckets/") :].split("/", 2)
        if len(parts) < 2 or "@" in rest:
            raise UsageError(f"invalid bucket source {text!r}: expected hf://buckets/ORG/NAME[/PREFIX]")
        bucket_id = "/".join(parts[:2])
        check_bucket_id(bucket_id)
        own = parts[2].strip("/") if len(parts) == 3 else ""
        if own and prefix and own != prefix.strip("/"):
            raise UsageError(f"source {text!r} names prefix {own!r}, --prefix says {prefix!r}: give one")
        return _bucket(bucket_id, own or prefix or "")
    if prefix:
        raise UsageError(f"--prefix works with bucket sources only, not {text!r}")
    kind = MODEL
    if rest.startswith("datasets/"):
        kind, rest = DATASET, rest[len("datasets/") :]
    elif rest.startswith(("spaces/", "models/")):
        raise UsageError(f"invalid source {text!r}: expected {_FORMS}")
    repo_id, at, revision = rest.partition("@")
    if repo_id.count("/") != 1:
        raise UsageError(f"invalid repo source {text!r}: expected {_FORMS} (no path inside the repo)")
    check_repo_id(repo_id)
    if at:
        revision = unquote(revision)
        if not revision or not revision.isprintable() or ".." in revision or revision.startswith("/"):
            raise UsageError(f"invalid revision in {text!r}: expected a branch, tag or commit after @")
    return Source(kind, repo_id, revision=None if revision in ("", DEFAULT_REVISION) else revision)


def _bucket(bucket_id: str, prefix: str) -> Source:
    from .remote.base import is_safe_path

    prefix = prefix.strip("/")
    if prefix and not is_safe_path(prefix):
        raise UsageError(f"invalid bucket prefix {prefix!r}")
    return Source(BUCKET, bucket_id, prefix=prefix)
