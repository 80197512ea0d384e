"""Defaults, read from the environment in one place.

Every knob here can also be set per mount (CLI flag or `hffs_neuron.mount(...)` argument); the
environment only changes the default.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _default_hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"))


# Where blobs, metadata and per-mount upper layers live: $HFFS_CACHE_DIR, else $HF_HOME/hffs-neuron.
CACHE_DIR = Path(os.environ.get("HFFS_CACHE_DIR") or _default_hf_home() / "hffs-neuron")
# Where running mounts record their state (pid, options, stats): one JSON file per mount. Root's default
# is /run/hffs (a tmpfs emptied at boot, as mounts are), a user's $HF_HOME/hffs-neuron-run.
RUNTIME_DIR = Path(
    os.environ.get("HFFS_RUNTIME_DIR") or ("/run/hffs" if os.geteuid() == 0 else _default_hf_home() / "hffs-neuron-run")
)

CACHE_SIZE = os.environ.get("HFFS_CACHE_SIZE", "50G")
# Bucket listings may change upstream: how long a listing is trusted.
METADATA_TTL = _env_float("HFFS_METADATA_TTL", 60.0)
# How long "does not exist" is trusted (most Neuron cache probes are misses).
NEGATIVE_TTL = _env_float("HFFS_NEGATIVE_TTL", 5.0)
# NEFF mounts: publish local modules to the bucket as soon as they are complete (`--publish`).
PUBLISH = os.environ.get("HFFS_PUBLISH", "").strip().lower() in ("1", "true", "yes", "on")
# Whose modules are published besides the owner's and root's (`--publish-from USER|@GROUP`, repeatable):
# comma-separated here.
PUBLISH_FROM = tuple(n.strip() for n in os.environ.get("HFFS_PUBLISH_FROM", "").split(",") if n.strip())
# A module of more bytes than this is never published (`--publish-max-bytes`).
PUBLISH_MAX_BYTES = _env_int("HFFS_PUBLISH_MAX_BYTES", 8 << 30)
# Publishing to a repo: at least this many seconds between two commits to it (`--commit-interval`); what
# arrives meanwhile goes in the next commit.
COMMIT_INTERVAL = _env_float("HFFS_COMMIT_INTERVAL", 60.0)
# NEFF mounts: a compile lock (`*.lock`) whose creator process is gone is removed this many seconds after
# it is first seen stale (`--stale-lock-grace`), unless stale locks are kept (`--keep-stale-locks`:
# only reported).
STALE_LOCK_GRACE = _env_float("HFFS_STALE_LOCK_GRACE", 10.0)
KEEP_STALE_LOCKS = os.environ.get("HFFS_KEEP_STALE_LOCKS", "").strip().lower() in ("1", "true", "yes", "on")
# NEFF mounts: follow the bucket's event feed (`--follow-events`), falling back to probes without it.
FOLLOW_EVENTS = os.environ.get("HFFS_FOLLOW_EVENTS", "1").strip().lower() not in ("0", "false", "no", "off")
# Content at a pinned commit never changes: its metadata can be kept for a long time.
PINNED_TTL = _env_float("HFFS_PINNED_TTL", 24 * 3600.0)
METADATA_CACHE_ENTRIES = _env_int("HFFS_METADATA_CACHE_ENTRIES", 100_000)

# Network deadlines (seconds): per connect, per read of a response chunk, and per whole operation
# including retries. A FUSE call never waits longer than OPERATION_TIMEOUT on the network.
CONNECT_TIMEOUT = _env_float("HFFS_CONNECT_TIMEOUT", 10.0)
READ_TIMEOUT = _env_float("HFFS_READ_TIMEOUT", 30.0)
OPERATION_TIMEOUT = _env_float("HFFS_TIMEOUT", 120.0)
MAX_RETRIES = _env_int("HFFS_MAX_RETRIES", 5)
RETRY_BASE_WAIT = _env_float("HFFS_RETRY_BASE_WAIT", 0.25)
RETRY_MAX_WAIT = _env_float("HFFS_RETRY_MAX_WAIT", 8.0)
# Each attempt's connect and read timeouts are at most this fraction of OPERATION_TIMEOUT (--timeout):
# a stalled attempt (accepted, or headers then silence) gives up early enough for a retry on a new
# connection to fit in the operation's deadline.
ATTEMPT_TIMEOUT_FRACTION = 1 / 3
# Each page of a paginated listing has its own OPERATION_TIMEOUT, and a listing ends after this many pages
# (the Hub serves 1,000 entries or more per page, so the cap is only ever met by a misbehaving server).
MAX_LISTING_PAGES = _env_int("HFFS_MAX_LISTING_PAGES", 1000)

# Hub-cache view: lookups of repos, revisions and commits not seen yet, per mount. Beyond these, a
# lookup fails at once with EAGAIN (nothing is cached), so a runaway script cannot spend the owner's
# Hub quota nor hold FUSE threads. The rate is also the burst.
MAX_RESOLUTIONS_PER_S = _env_float("HFFS_MAX_RESOLUTIONS_PER_S", 20.0)
MAX_CONCURRENT_RESOLUTIONS = _env_int("HFFS_MAX_CONCURRENT_RESOLUTIONS", 8)

# Parallel Range downloads of one large blob, in pieces of this size: small enough that the pieces
# ahead of the one being verified fit the in-memory reorder buffer (no read-back) on a few connections.
CHUNK_SIZE = _env_int("HFFS_CHUNK_SIZE", 8 * 1024 * 1024)
# Objects from this size are always split into CHUNK_SIZE ranges (smaller ones from 8 MiB only over
# connections that are idle).
PARALLEL_THRESHOLD = _env_int("HFFS_PARALLEL_THRESHOLD", 64 * 1024 * 1024)
# A Xet transfer's range per connection: each range costs a reconstruction request and a xorb request
# before its first byte, and each hf_xet download in flight holds about twice its range in memory. 1 GiB
# on the emulator under --net 100,20 with 5 downloads at once, and the daemon's peak RSS with 8 readers
# (bench rows 10 and 8): 24 MiB 3.2-3.5 s, 302-338 MB; 16 MiB 3.6-3.9 s, 252 MB; 12 MiB 3.5-4.0 s,
# 200-205 MB; 10 MiB 3.7 s, 173 MB; 8 MiB 3.9 s, 157 MB. Larger ranges trade memory for fewer round
# trips where each request waits longer than 20 ms.
XET_PIECE_SIZE = _env_int("HFFS_XET_PIECE_SIZE", 10 * 1024 * 1024)
# hf_xet's downloads in flight, at most: the transfer scheduler gives hf_xet all its connections but one,
# up to this many. Each holds about twice its range (XET_PIECE_SIZE) in memory: with 24 MiB ranges and 8
# readers the daemon's peak RSS was 232 MB with 3 at once, 302-338 MB with 5.
XET_MAX_CONNECTIONS = _env_int("HFFS_XET_MAX_CONNECTIONS", 8)
# The one budget of upstream connections of a daemon (transfers, read-ahead, listings): by default four
# per core, at most 32 (a 2-core host: 8; 8 cores and up: 32).
MAX_CONNECTIONS = _env_int("HFFS_MAX_CONNECTIONS", min(32, 4 * (os.cpu_count() or 1)))
# What opening a Hub file reads ahead in the background: "shards" (the rest of its shard set),
# "snapshot" (every file of its snapshot) or "off".
READ_AHEAD = os.environ.get("HFFS_READ_AHEAD", "shards")
# Blobs fetched by read-ahead and not opened yet are not evicted for this long (seconds).
READ_AHEAD_PROTECT = _env_float("HFFS_READ_AHEAD_PROTECT", 600.0)
# This host's name in temp-file names of a cache directory shared by several hosts (cluster
# filesystems); the override exists for tests that run two "hosts" on one machine.
HOST_NAME = os.environ.get("HFFS_HOST_NAME") or socket.gethostname()

# Resolve local-layer paths one component at a time even where openat2 exists (tests of the fallback;
# a kernel or sandbox whose openat2 misbehaves). "1" forces the walk.
NO_OPENAT2 = os.environ.get("HFFS_NO_OPENAT2", "") not in ("", "0")

# Mount-time checks (`--check`, default on): the endpoint answers, the token is valid or absent, the bucket
# or each --repo exists and is readable. "0" (`--no-check`) skips them (offline starts).
CHECK = os.environ.get("HFFS_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")

# Where `--metrics-addr` serves Prometheus metrics by default (HOST:PORT); empty: off.
METRICS_ADDR = os.environ.get("HFFS_METRICS_ADDR", "")

# With --allow-other: the group (name or gid) that may read gated or private repos' content besides
# the mount's owner. Unset: the owner only.
GROUP = os.environ.get("HFFS_GROUP") or None

# The Xet download path (`--xet`): "auto" uses hf_xet for files listed with a xet hash, "off" HTTP Range
# only. HF_HUB_DISABLE_XET=1 in the daemon's environment means "off" whatever the flag says.
XET = os.environ.get("HFFS_XET", "auto")
# After a Xet failure the mount reads over HTTP Range for this long before trying Xet again (seconds).
XET_PAUSE_AFTER_FAILURE = _env_float("HFFS_XET_PAUSE_AFTER_FAILURE", 60.0)
HF_HUB_DISABLE_XET = os.environ.get("HF_HUB_DISABLE_XET", "").strip().lower() in ("1", "true", "yes", "on")
# Bytes of --cache-size set aside for hf_xet's own files under <cache>/xet (logs, shard cache of uploads).
XET_CACHE_RESERVE = _env_int("HFFS_XET_CACHE_RESERVE", 256 * 1024 * 1024)
