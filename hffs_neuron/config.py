"""Mount configuration: the `MountConfig` record and the parsing and validation of user input.

Pure input handling: nothing here touches the network, FUSE or the runtime directory, so a bad size,
duration, repo spec or log level is rejected (as `UsageError`) before anything is started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from . import constants
from .errors import UsageError

VIEWS = ("neff", "hub-cache")
READ_AHEAD_MODES = ("shards", "snapshot", "off")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`50G`, `512M`, `1.5T`, `1024` (bytes) -> bytes. Powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix, e.g. 50G")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGTP".index(unit or " "))


def parse_duration(text: str | float) -> float:
    """`30`, `30s`, `500ms`, `5m`, `1h` -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise UsageError(f"bad duration {text!r}: use seconds or a suffix, e.g. 30s, 500ms, 5m")
    number, unit = float(match.group(1)), (match.group(2) or "s").lower()
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class MountConfig:
    """Everything a mount needs, minus secrets (the token travels in the daemon's environment)."""

    view: str
    mountpoint: str
    source: str = ""  # bucket id (neff) or "" (hub-cache)
    prefix: str | None = None
    read_only: bool = False
    show_model_area: bool = False
    publish: bool = constants.PUBLISH
    publish_from: list[str] = field(default_factory=lambda: list(constants.PUBLISH_FROM))  # USER or @GROUP
    publish_max_bytes: int = constants.PUBLISH_MAX_BYTES
    commit_interval: float = constants.COMMIT_INTERVAL  # publishing to a repo: seconds between commits
    keep_stale_locks: bool = constants.KEEP_STALE_LOCKS
    stale_lock_grace: float = constants.STALE_LOCK_GRACE
    follow_events: bool = constants.FOLLOW_EVENTS
    backing: str | None = None
    repos: list[str] = field(default_factory=list)  # "type:id@rev" or "id@rev"
    cache_dir: str = str(constants.CACHE_DIR)
    cache_size: str = constants.CACHE_SIZE
    metadata_ttl: float = constants.METADATA_TTL
    negative_ttl: float = constants.NEGATIVE_TTL
    endpoint: str | None = None
    allow_other: bool = False
    group: str | None = constants.GROUP  # with allow_other: this group may read gated/private content
    log_file: str | None = None
    log_level: str = "INFO"
    timeout: float = constants.OPERATION_TIMEOUT
    max_threads: int = 64
    metrics_addr: str | None = constants.METRICS_ADDR or None  # HOST:PORT serving /metrics; None: off
    max_resolutions_per_s: float = constants.MAX_RESOLUTIONS_PER_S  # hub-cache: new repo/revision lookups
    max_connections: int = constants.MAX_CONNECTIONS
    read_ahead: str = constants.READ_AHEAD
    xet: str = constants.XET  # "auto": hf_xet for files with a xet hash, "off": HTTP Range only
    check: bool = constants.CHECK  # mount-time checks of endpoint, token and source (mount_checks.py)
    # The FUSE fsname: the source as /proc/mounts, findmnt, df and mount(8) show it. The mount helper
    # sets it to the source exactly as the fstab line writes it (util-linux matches "already mounted"
    # on that string); "" means default_fsname(): the source's canonical form, or `hub-cache`.
    fsname: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        return cls(**json.loads(text))


def default_fsname(view: str, source: str, prefix: str | None = None) -> str:
    """The fsname of a mount not made from fstab: its source's one canonical form (`sources.Source`:
    `ORG/NAME`, `hf://buckets/ORG/NAME/PREFIX`, `hf://ORG/NAME@REV`), or `hub-cache`. An fstab line
    that writes the source in that form matches such a mount (util-linux compares the strings)."""
    if view != "neff":
        return "hub-cache"
    from .sources import parse_source

    return parse_source(source, prefix).canonical


def mount_fsname(config: MountConfig) -> str:
    return config.fsname or default_fsname(config.view, config.source, config.prefix)


def parse_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:9100`, `0.0.0.0:9100`, `[::1]:9100` -> (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"bad address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)


def parse_repo_spec(spec: str) -> tuple[str, str, str]:
    """`Org/Name`, `Org/Name@rev`, `datasets/Org/Name@rev` -> (repo_type, repo_id, revision)."""
    from .remote.hub import check_repo_id

    repo_type = "model"
    body, _, revision = spec.partition("@")
    for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
        if body.startswith(prefix) and body.count("/") == 2:
            repo_type, body = kind, body[len(prefix) :]
    check_repo_id(body)
    return repo_type, body, revision or "main"


def validate_config(config: MountConfig) -> None:
    """Raise UsageError for input problems detectable before contacting anything."""
    from .sources import parse_source

    if config.view == "neff":
        parse_source(config.source, config.prefix)
    elif config.publish:
        raise UsageError("--publish works on NEFF mounts only")
    if config.fsname and (not config.fsname.isprintable() or any(c.isspace() for c in config.fsname)):
        raise UsageError(f"source {config.fsname!r}: no spaces or control characters")
    if config.stale_lock_grace < 0:
        raise UsageError(f"--stale-lock-grace {config.stale_lock_grace}: must be 0 or more seconds")
    if config.publish_from:
        from .publish_checks import TrustedWriters

        TrustedWriters.parse(0, config.publish_from)  # names that do not exist: said now, not at publish time
    if config.commit_interval < 0:
        raise UsageError(f"--commit-interval {config.commit_interval}: must be 0 or more seconds")
    if config.publish_max_bytes <= 0:
        raise UsageError(f"--publish-max-bytes {config.publish_max_bytes}: must be a positive size, e.g. 8G")
    for spec in config.repos:
        parse_repo_spec(spec)
    parse_size(config.cache_size)
    if config.metrics_addr:
        parse_host_port(config.metrics_addr)
    if config.backing and not os.path.isdir(config.backing):
        raise UsageError(f"--backing {config.backing}: not a directory")
    if config.max_resolutions_per_s < 0:
        raise UsageError(f"--max-resolutions-per-s {config.max_resolutions_per_s}: use 0 (no limit) or more")
    if config.max_connections < 1:
        raise UsageError(f"--max-connections {config.max_connections}: must be at least 1")
    if config.read_ahead not in READ_AHEAD_MODES:
        raise UsageError(f"--read-ahead {config.read_ahead!r}: use one of {', '.join(READ_AHEAD_MODES)}")
    if config.xet not in ("auto", "off"):
        raise UsageError(f"--xet {config.xet!r}: use auto or off")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"bad log level {config.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
