"""mountctl: mount, inspect, warm and publish hffs-neuron filesystems.

Every failure is one line on stderr and a non-zero exit code (see EXIT_CODES).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hffs_neuron import __version__, constants
from hffs_neuron.config import parse_duration, parse_size
from hffs_neuron.errors import HffsError, MountError, UsageError
from hffs_neuron.mount import cache_prune, cache_usage, mount, mount_state_of, prefetch, status, unmount
from hffs_neuron.runtime import check_fuse_available
from hffs_neuron.supervision import dead as dead_threads

EXIT_CODES = """exit codes:
  0  success
  1  other error (I/O, integrity)
  2  bad usage: unknown option, bad id, size or duration syntax
  3  mount problem: FUSE missing, mountpoint missing/not empty/already mounted/stale/busy, daemon failed
  4  not found: bucket, repo, revision or path
  5  access denied: unauthorized, forbidden or gated (the mount's token: --token-file or HF_TOKEN at mount)
  6  Hub unreachable or failing after retries"""


def _secrets(argv: list[str]) -> list[str]:
    """Every token this invocation could know, so no message ever prints one."""
    found = [os.environ.get(name, "") for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    for i, arg in enumerate(argv):
        if arg in ("--token", "--token-file") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--token=", "--token-file=")):
            value = arg.split("=", 1)[1]
        else:
            # mount.hffs options (`-o a=b,Token=...`): any spelling of a token option.
            found += [v for k, _, v in (o.partition("=") for o in arg.split(",")) if _is_token_key(k)]
            continue
        if arg.startswith("--token-file"):
            try:
                value = Path(value).read_text().strip()
            except OSError:
                continue
        found.append(value)
    return [t for t in found if len(t) >= 4]


def _fail(message: str, argv: list[str]) -> None:
    """Print one line on stderr, with any token masked (argparse echoes arguments back)."""
    for secret in _secrets(argv):
        message = message.replace(secret, "***")
    print(f"mountctl: {' '.join(message.split())}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse that fails with one line and exit code 2."""

    argv: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # `--tok` must not silently mean `--token`, nor a future flag change what an old spelling does.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{message} (see mountctl --help)", _Parser.argv)
        sys.exit(2)


def _common_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=str(constants.CACHE_DIR), help="blob store and local layers")
    p.add_argument("--cache-size", default=constants.CACHE_SIZE, help="blob store size limit, e.g. 50G")
    p.add_argument("--metadata-ttl", default=str(constants.METADATA_TTL), help="seconds a listing is trusted")
    p.add_argument("--negative-ttl", default=str(constants.NEGATIVE_TTL), help="seconds 'not found' is trusted")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    # Set by mount.hffs: the source exactly as the fstab line writes it (the FUSE fsname).
    p.add_argument("--fsname", default="", help=argparse.SUPPRESS)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--token",
        default=None,
        help="Hub token, or - to read it from standard input (default: $HF_TOKEN or the saved token); "
        "a literal value is hidden from the process list once mountctl starts, but --token-file, "
        "--token - or HF_TOKEN are the safe ways",
    )
    tok.add_argument("--token-file", default=None, help="file holding the Hub token (the safe way)")
    p.add_argument("--foreground", action="store_true", help="stay attached instead of daemonizing")
    p.add_argument("--allow-other", action="store_true", help="let other users in (opt-in)")
    p.add_argument(
        "--group", default=constants.GROUP, help="with --allow-other: this group may also read gated/private content"
    )
    p.add_argument("--log-file", default=None, help="daemon log file (default: in the runtime dir)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--timeout", default=str(constants.OPERATION_TIMEOUT), help="network deadline, seconds")
    p.add_argument(
        "--metrics-addr",
        default=constants.METRICS_ADDR or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=constants.MAX_CONNECTIONS,
        help="upstream connections of the daemon (default: 4 per core, at most 32)",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=constants.CHECK,
        help="check at mount time that the endpoint answers, the token is valid and the source readable "
        "(default: $HFFS_CHECK, else on; a transient failure only warns); --no-check: none (offline starts)",
    )
    p.add_argument(
        "--xet",
        choices=("auto", "off"),
        default=constants.XET,
        help="fetch files listed with a xet hash through hf_xet (auto, default) or only over HTTP Range (off);"
        " HF_HUB_DISABLE_XET=1 means off",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mountctl",
        description="Mount Hugging Face storage with FUSE: Neuron compile caches and a lazy HF_HUB_CACHE.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mountctl (hffs-neuron) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount a view")
    views = m.add_subparsers(dest="view", required=True, parser_class=_Parser)
    neff = views.add_parser("neff", help="a Storage Bucket's flat Neuron cache (NEURON_COMPILE_CACHE_URL)")
    neff.add_argument(
        "bucket_id", metavar="SOURCE", help="ORG/NAME (a bucket), hf://buckets/ORG/NAME[/PREFIX], hf://ORG/NAME[@REV]"
    )
    neff.add_argument("mountpoint")
    neff.add_argument("--prefix", default=None, help="mount this folder of the bucket")
    neff.add_argument("--read-only", action="store_true", help="refuse writes with EROFS")
    neff.add_argument("--show-model-area", action="store_true", help="also show the per-model area, read-only")
    neff.add_argument(
        "--publish",
        action=argparse.BooleanOptionalAction,
        default=constants.PUBLISH,
        help="publish local modules to the bucket once complete (default: $HFFS_PUBLISH, else off)",
    )
    neff.add_argument(
        "--publish-from",
        action="append",
        default=None,
        metavar="USER|@GROUP",
        help="also publish modules written by this user or group (repeatable; default: $HFFS_PUBLISH_FROM, "
        "comma-separated; the mount's owner and root always)",
    )
    neff.add_argument(
        "--publish-max-bytes",
        default=None,
        metavar="SIZE",
        help="never publish a module larger than this, e.g. 8G (default: $HFFS_PUBLISH_MAX_BYTES, else 8G)",
    )
    neff.add_argument(
        "--commit-interval",
        default=str(constants.COMMIT_INTERVAL),
        metavar="S",
        help="publishing to a repo: at least this long between two commits; what completes meanwhile goes in "
        "the next one (default: $HFFS_COMMIT_INTERVAL, else 60 s)",
    )
    neff.add_argument(
        "--keep-stale-locks",
        action=argparse.BooleanOptionalAction,
        default=constants.KEEP_STALE_LOCKS,
        help="only report compile locks whose creator is gone, never remove them (default: $HFFS_KEEP_STALE_LOCKS, "
        "else off: they are removed after --stale-lock-grace)",
    )
    neff.add_argument(
        "--stale-lock-grace",
        default=str(constants.STALE_LOCK_GRACE),
        help="seconds a compile lock whose creator is gone stays before it is removed (default: 10)",
    )
    neff.add_argument(
        "--follow-events",
        action=argparse.BooleanOptionalAction,
        default=constants.FOLLOW_EVENTS,
        help="apply the bucket's event feed to cached listings (default: on where the Hub serves it; "
        "--no-follow-events: TTL + probes only)",
    )
    _common_mount_options(neff)
    hub = views.add_parser("hub-cache", help="a lazy, case-insensitive HF_HUB_CACHE")
    hub.add_argument("mountpoint")
    hub.add_argument("--backing", default=None, help="real hub cache dir where writes land (default: in the cache dir)")
    hub.add_argument("--repo", action="append", default=[], metavar="ID[@REV]", help="pre-pin a repo (repeatable)")
    hub.add_argument(
        "--max-resolutions-per-s",
        type=float,
        default=constants.MAX_RESOLUTIONS_PER_S,
        metavar="N",
        help="Hub lookups of repos/revisions not seen yet, per second (0: no limit); beyond: EAGAIN",
    )
    hub.add_argument(
        "--read-ahead",
        choices=("shards", "snapshot", "off"),
        default=constants.READ_AHEAD,
        help="on open, fetch the rest of the file's shard set (default), its whole snapshot, or nothing",
    )
    _common_mount_options(hub)

    u = sub.add_parser("umount", help="unmount (waits for the daemon)")
    u.add_argument("mountpoint")
    u.add_argument("--force", action="store_true", help="also clear dead-daemon and busy mounts (lazy unmount)")

    s = sub.add_parser("status", help="show mounts, cache use, counters and in-flight fetches")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help='machine-readable: {"mounts": [...]}')
    s.add_argument("--watch", action="store_true", help="refresh in place until interrupted (Ctrl-C)")
    s.add_argument("--interval", default="1", help="seconds between refreshes with --watch")
    s.add_argument(
        "--check", action="store_true", help="exit 3 unless every mount shown is running, no daemon thread dead"
    )

    pf = sub.add_parser("prefetch", help="warm files or whole directories of a mount")
    pf.add_argument("paths", nargs="+")
    pf.add_argument("--jobs", type=int, default=4, help="files fetched at once")

    pu = sub.add_parser("push", help="NEFF view: publish complete local modules to the bucket")
    pu.add_argument("mountpoint")
    pu.add_argument("--dry-run", action="store_true")
    pu.add_argument(
        "--include-untrusted",
        action="store_true",
        help="also push modules written by users outside --publish-from (--dry-run says which)",
    )

    lk = sub.add_parser("lookup", help="NEFF caches: the export configurations of a model already compiled")
    lk.add_argument("target", metavar="MOUNTPOINT|SOURCE", help="a NEFF mount, or a source (hf://ORG/NAME, ORG/NAME)")
    lk.add_argument("model_id", metavar="MODEL_ID")
    lk.add_argument("--task", default=None, help="only configurations for this task, e.g. text-generation")
    lk.add_argument("--json", action="store_true", help="one JSON object")

    c = sub.add_parser("cache", help="inspect or shrink the blob store")
    c.add_argument("action", choices=("du", "prune"))
    c.add_argument(
        "--cache-dir",
        default=None,
        help="this cache dir only (default: the cache dir of every hffs mount on the host, and the default one)",
    )
    c.add_argument("--max-size", default=None, help="prune down to this size, e.g. 10G (default: 0 = all unused)")
    return parser


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file}: file is empty")
        return token
    token = getattr(args, "token", None)
    if token == "-":
        token = _read_token_from_stdin()
    if token is not None and not token.strip():
        raise UsageError("--token is empty")
    return token.strip() if token else token


def _read_token_from_stdin() -> str:
    """`--token -`: the first line of standard input (a prompt without echo on a terminal)."""
    if sys.stdin is None:
        raise UsageError("--token -: no standard input")
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("Hub token: ")
    return sys.stdin.readline().strip()


def cmd_mount(args: argparse.Namespace) -> int:
    view, mountpoint, source, token, options = _mount_request(args)
    if args.foreground:
        return _mount_foreground(view, mountpoint, source, token, options)
    handle = mount(view, mountpoint, source, token=token, **options)
    print(f"mounted {view} view on {handle.mountpoint} (pid {handle.pid})")
    return 0


def _mount_request(args: argparse.Namespace) -> tuple[str, str, str, str | None, dict[str, Any]]:
    """(view, mountpoint, source, token, MountConfig options) of a `mount` command, checked as far as
    possible without mounting (FUSE present, sizes, durations, ids, token file, log level)."""
    from hffs_neuron.config import MountConfig, validate_config
    from hffs_neuron.sources import parse_source

    check_fuse_available()
    options = {
        "cache_dir": os.path.abspath(args.cache_dir),
        "cache_size": args.cache_size,
        "metadata_ttl": parse_duration(args.metadata_ttl),
        "negative_ttl": parse_duration(args.negative_ttl),
        "endpoint": args.endpoint,
        "allow_other": args.allow_other,
        "group": args.group,
        "log_file": os.path.abspath(args.log_file) if args.log_file else None,
        "log_level": args.log_level,
        "timeout": parse_duration(args.timeout),
        "metrics_addr": args.metrics_addr,
        "max_connections": args.max_connections,
        "xet": args.xet,
        "check": args.check,
        "fsname": args.fsname,
    }
    parse_size(args.cache_size)
    if args.view == "neff":
        source, prefix = parse_source(args.bucket_id, args.prefix).config_fields()
        options.update(
            prefix=prefix,
            read_only=args.read_only,
            show_model_area=args.show_model_area,
            publish=args.publish,
            publish_from=list(constants.PUBLISH_FROM) if args.publish_from is None else args.publish_from,
            publish_max_bytes=parse_size(args.publish_max_bytes)
            if args.publish_max_bytes
            else constants.PUBLISH_MAX_BYTES,
            commit_interval=parse_duration(args.commit_interval),
            keep_stale_locks=args.keep_stale_locks,
            stale_lock_grace=parse_duration(args.stale_lock_grace),
            follow_events=args.follow_events,
        )
    else:
        source = ""
        options.update(
            backing=os.path.abspath(args.backing) if args.backing else None,
            repos=args.repo,
            max_resolutions_per_s=args.max_resolutions_per_s,
        )
        options.update(read_ahead=args.read_ahead)
    token = _token(args)
    validate_config(MountConfig(view=args.view, mountpoint=os.path.abspath(args.mountpoint), source=source, **options))
    return args.view, args.mountpoint, source, token, options


def _mount_foreground(view: str, mountpoint: str, source: str, token: str | None, options: dict) -> int:
    from hffs_neuron.config import MountConfig
    from hffs_neuron.daemon import configure_logging, serve

    if token:
        os.environ["HF_TOKEN"] = token
    config = MountConfig(view=view, mountpoint=os.path.abspath(mountpoint), source=source, **options)
    configure_logging(config)
    serve(config)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    print(unmount(args.mountpoint, force=args.force))
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _render_status(states: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps({"mounts": states}, indent=1)
    if not states:
        return "no hffs mounts"
    lines = []
    for s in states:
        if "view" not in s:  # known from the mount table only: another user's, or a silent daemon
            owner = f"mounted by uid {s['owner_uid']}" if s["health"] == "not yours" else "no state recorded here"
            lines.append(f"{s['mountpoint']}: {s['source']} ({s['health']}: {owner})")
            continue
        health = {"dead": "DEAD daemon: run mountctl umount --force"}.get(s["health"], s["health"])
        saved = "" if s.get("live") or not s["alive"] else ", daemon not answering: saved figures"
        c = s.get("counters", {})
        cache = s.get("cache", {})
        limit = f" of {_human(cache['limit_bytes'])}" if cache.get("limit_bytes") else ""
        lines += [
            f"{s['mountpoint']}: {s['view']} view of {s['source']} "
            f"({health}, pid {s['pid']}, up {s['uptime']}s{saved})",
            f"  cache {s.get('cache_dir')}: {_human(s['cache_used'])} used{limit}",
            f"  hits {c.get('hits', 0)}  misses {c.get('misses', 0)}  fetches {c.get('fetches', 0)}  "
            f"fetched {_human(c.get('bytes_fetched', 0))}  evictions {c.get('evictions', 0)}  "
            f"http requests {c.get('http_requests', 0)}"
            + "".join(f"  {k} {v}" for k, v in sorted(c.get("http_status", {}).items())),
        ]
        if c.get("errors"):
            lines.append("  errors " + "  ".join(f"{k} {v}" for k, v in sorted(c["errors"].items())))
        for check, result in s.get("checks", {}).items():
            if result.startswith("warning: "):
                lines.append(f"  WARNING at mount time, {check}: {result.removeprefix('warning: ')}")
        for refused in s.get("access_denied", []):
            lines.append(f"  EACCES ({refused['count']}x): {refused['message']}")
        ra = s.get("read_ahead", {})
        if any(ra.values()):
            lines.append(f"  read-ahead queued {ra['queued']}  in flight {ra['in_flight']}  done {ra['done']}")
        pub = s.get("publish", {})
        if pub.get("mode", "off") != "off":
            lines.append(
                f"  publish ({pub['mode']}): published {pub['published']}  pending {pub['pending']}  "
                f"failed {len(pub['failed'])}"
            )
            lines += [f"  not published {f['module']}: {f['reason']}" for f in pub["failed"]]
        for name, error in sorted(dead_threads(s.get("threads", {})).items()):
            lines.append(f"  DEAD thread {name}: {error}")
        for lock in s.get("stale_locks", []):
            creator = f"pid {lock['pid']}" if lock.get("pid") else "creator unknown"
            lines.append(f"  stale lock {lock['path']} ({creator}, {lock['age_s']:.0f}s old)")
        for f in s.get("in_flight", []):
            pct = 100 * f["done"] / f["total"] if f["total"] else 100
            lines.append(f"  fetching {f['name']}: {_human(f['done'])} / {_human(f['total'])} ({pct:.0f}%)")
        if s.get("follow"):
            lines.append(f"  follow upstream: {s['follow']}")
        if s.get("metrics_addr"):
            lines.append(f"  metrics http://{s['metrics_addr']}/metrics")
        if s.get("log_file"):
            lines.append(f"  log {s['log_file']}")
    return "\n".join(lines)


def _check(states: list[dict]) -> None:
    """`status --check`: every mount shown (other users' aside) is running and none of its daemon threads
    died (one line each)."""
    states = [s for s in states if s["health"] != "not yours"]
    if not states or any(s["health"] != "running" for s in states):
        raise MountError("not running: " + (", ".join(s["mountpoint"] for s in states) or "no hffs mounts"))
    dead = [(s["mountpoint"], *item) for s in states for item in sorted(dead_threads(s.get("threads", {})).items())]
    for mountpoint, name, error in dead:
        print(f"mountctl: {mountpoint}: daemon thread {name} died: {error}", file=sys.stderr)
    if dead:
        raise MountError(f"{len(dead)} daemon thread(s) died (see the daemon's log); remount to recover")


def cmd_status(args: argparse.Namespace) -> int:
    if not args.watch:
        states = status(args.mountpoint)
        print(_render_status(states, args.json))
        if args.check:
            _check(states)
        return 0
    interval = parse_duration(args.interval)
    # On a terminal: the alternate screen (what was there comes back at the end), each frame cut to the
    # terminal's size and drawn in place, like top; in a pipe or file, one whole frame after another.
    screen = sys.stdout.isatty()
    if screen:
        sys.stdout.write(ALT_SCREEN_ON)
    try:
        while True:
            frame = _render_status(status(args.mountpoint), args.json)
            sys.stdout.write(f"{HOME_CLEAR}{_fit(frame, shutil.get_terminal_size())}" if screen else f"{frame}\n\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if screen:
            sys.stdout.write(ALT_SCREEN_OFF)
            sys.stdout.flush()


ALT_SCREEN_ON, ALT_SCREEN_OFF, HOME_CLEAR = "\x1b[?1049h", "\x1b[?1049l", "\x1b[H\x1b[2J"


def _fit(frame: str, size: os.terminal_size) -> str:
    """`frame` cut to the terminal: lines to its width, and to its height with a last line saying what
    was left out (a terminal that scrolls would not redraw in place)."""
    lines = [line[: size.columns] for line in frame.splitlines()]
    if len(lines) > size.lines - 1:
        note = f"... {len(lines) - (size.lines - 2)} more lines: a taller terminal, or status MOUNTPOINT"
        lines = lines[: size.lines - 2] + [note[: size.columns]]
    return "\n".join(lines)


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Warm by opening each file through the mount: the daemon's single-flight store does the fetch."""
    from tqdm import tqdm

    bars: list[Any] = []

    def start(total: int) -> None:  # only once the paths are known good: errors stay one line
        bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prefetch", file=sys.stderr))

    def progress(done: int) -> None:  # bytes so far, transfers in flight included: the bar moves during a file
        bars[0].update(done - bars[0].n)

    try:
        result = prefetch(args.paths, jobs=args.jobs, on_total=start, on_progress=progress)
    finally:
        for bar in bars:
            bar.close()
    total = result.files + len(result.failures)
    print(f"prefetched {result.files} of {total} files ({_human(result.bytes)})")
    for failure in result.failures:
        print(f"mountctl: prefetch failed: {failure}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_push(args: argparse.Namespace) -> int:
    from hffs_neuron.publish import push

    state = mount_state_of(args.mountpoint)
    if state is None or os.path.realpath(args.mountpoint) != state.get("mountpoint"):
        raise MountError(f"{args.mountpoint}: not an hffs mount (see mountctl status)")
    # Files the running daemon has open for writing (its live answer says): their modules are not finished.
    writing = frozenset(tuple(key) for key in state.get("open_for_writing", ()) if state.get("live"))
    plan = push(state, dry_run=args.dry_run, include_untrusted=args.include_untrusted, writing=writing)
    verb = "would push" if args.dry_run else "pushed"
    for upload in plan.upload:
        print(f"{verb} {upload.module} ({len(upload.files)} files){plan.notes.get(upload.module, '')}")
    for module, reason in plan.skipped:
        print(f"skipped {module}: {reason}")
    if not plan.upload:
        print("nothing to push")
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    from huggingface_hub import constants as hf_constants

    from hffs_neuron import lookup
    from hffs_neuron.remote.http import HubHttp
    from hffs_neuron.sources import parse_source

    state = mount_state_of(args.target) if os.path.isdir(args.target) else None
    if state is not None and state.get("mountpoint") == os.path.realpath(args.target) and state.get("view") == "neff":
        source = parse_source(state["source"], state.get("options", {}).get("prefix"))
        endpoint, cache_dir = state.get("endpoint"), state.get("cache_dir") or str(constants.CACHE_DIR)
    else:
        source, endpoint, cache_dir = parse_source(args.target), None, str(constants.CACHE_DIR)
    http = HubHttp(endpoint, offline=hf_constants.HF_HUB_OFFLINE)
    result = lookup.lookup(source, args.model_id, http=http, cache_dir=cache_dir, task=args.task)
    print(lookup.to_json(result) if args.json else lookup.format_table(result))
    return 0


def _cache_dirs(args: argparse.Namespace) -> list[str]:
    """`--cache-dir`, else the cache dir of every hffs mount this user can ask (any runtime dir) and
    the default one, each once."""
    if args.cache_dir:
        return [os.path.abspath(args.cache_dir)]
    mounted = [os.path.realpath(s["cache_dir"]) for s in status() if s.get("cache_dir")]
    return list(dict.fromkeys([*mounted, os.path.realpath(constants.CACHE_DIR)]))


def cmd_cache(args: argparse.Namespace) -> int:
    for cache_dir in _cache_dirs(args):
        if args.action == "du":
            used, count = cache_usage(cache_dir)
            print(f"{_human(used)} in {count} blobs under {cache_dir}")
        else:
            freed, left = cache_prune(cache_dir, parse_size(args.max_size) if args.max_size else 0)
            print(f"{cache_dir}: freed {_human(freed)}; {_human(left)} left (blobs open in a mount are kept)")
    return 0


COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "status": cmd_status,
    "prefetch": cmd_prefetch,
    "push": cmd_push,
    "lookup": cmd_lookup,
    "cache": cmd_cache,
}


def _hide_token_from_process_title(argv: list[str]) -> None:
    """Replace a literal `--token T` in this process's command line (`ps`, /proc/<pid>/cmdline) by `***`.

    Other users could read it there for as long as mountctl runs (with --foreground: the whole mount).
    The few milliseconds before this runs are why --token-file and HF_TOKEN are the safe ways.
    """
    secrets = [s for s in _secrets(argv) if s != "-"]
    if not any(s in arg for arg in argv for s in secrets):
        return
    import setproctitle

    title = " ".join(["mountctl", *argv])
    for secret in secrets:
        title = title.replace(secret, "***")
    setproctitle.setproctitle(title)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        _hide_token_from_process_title(argv)
    argv = list(argv)
    _Parser.argv = argv
    args = build_parser().parse_args(argv)
    # Library warnings (e.g. "recovering a stale mount") as one "mountctl: ..." line each.
    logging.basicConfig(level=logging.WARNING, format="mountctl: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except HffsError as exc:
        _fail(str(exc), argv)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted", argv)
        return 130
    except BrokenPipeError:  # `mountctl status --watch | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush must not fail
        return 0
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}", argv)
        return 1


# fstab options that are mount(8)'s business, not ours.
_GENERIC_OPTIONS = {
    "defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
    "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "strictatime",
    "sync", "async", "loop",
}  # fmt: skip
_FLAG_OPTIONS = {"ro": "--read-only", "read_only": "--read-only", "allow_other": "--allow-other",
                 "show_model_area": "--show-model-area", "foreground": "--foreground",
                 "publish": "--publish", "nopublish": "--no-publish",
                 "keep_stale_locks": "--keep-stale-locks", "nokeep_stale_locks": "--no-keep-stale-locks",
                 "follow_events": "--follow-events", "nofollow_events": "--no-follow-events",
                 "check": "--check", "nocheck": "--no-check"}  # fmt: skip
_VALUE_OPTIONS = {"prefix", "backing", "repo", "cache_dir", "cache_size", "metadata_ttl", "negative_ttl",
                  "endpoint", "token_file", "log_file", "log_level", "timeout", "metrics_addr", "group",
                  "max_resolutions_per_s", "stale_lock_grace", "publish_from", "publish_max_bytes",
                  "max_connections", "read_ahead", "xet", "commit_interval"}  # fmt: skip


def _is_token_key(key: str) -> bool:
    """`token`, `Token`, `hf_token`, `HF-TOKEN`, ...: an option carrying a token itself (not its file)."""
    return key.strip().lower().replace("-", "_") in ("token", "hf_token")


def mount_helper_argv(argv: list[str]) -> tuple[list[str], bool]:
    """`mount.hffs SOURCE MOUNTPOINT [-sfnvw] [-N ns] [-o opt,key=value...] [-t type]` -> (`mountctl mount ...`
    arguments, fake). `fake` (`-f`) means: check everything, mount nothing. The same program answers as
    `mount.fuse.hffs` (mount(8) looks for that name for `-t fuse.hffs`, with the same arguments).

    SOURCE is `neff:<namespace>/<bucket>` (or a bare bucket id) or `hub-cache`. This is how mount(8)
    calls `/sbin/mount.hffs` for an fstab line such as
    `neff:my-org/neuron-cache /mnt/nc hffs cache_dir=/var/cache/hffs,token_file=/etc/hffs/token,_netdev 0 0`.
    mount(8) always passes SOURCE and MOUNTPOINT first; they are handed on after a `--`, so a source
    such as `neff:--token=...` can never be taken for an option.
    """
    usage = "usage: mount.hffs neff:<namespace>/<bucket>|hub-cache MOUNTPOINT [-fnsvw] [-o options]"
    if len(argv) < 2:
        raise UsageError(usage)
    (source, mountpoint), rest = argv[:2], argv[2:]
    options: list[str] = []
    fake = False
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-o", "-t", "-N"):
            if i + 1 >= len(rest):
                raise UsageError(usage)
            if arg == "-o":  # -t type / -N namespace: mount(8) passes them, we already know
                options += [o for o in rest[i + 1].split(",") if o]
            i += 2
            continue
        if arg.startswith("-o"):
            options += [o for o in arg[2:].split(",") if o]
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) <= set("fnsvw"):
            # -f fake; -n (no mtab), -s (sloppy), -v (verbose), -w (rw): nothing to do for a FUSE daemon
            fake = fake or "f" in arg
        else:
            raise UsageError(usage)
        i += 1
    out: list[str] = []
    for option in options:
        raw_key, has_value, value = option.partition("=")
        # x-systemd.*, x-gvfs-*, ...: userspace hints for other programs, before the `-` -> `_` rewrite.
        if raw_key.startswith("x-"):
            continue
        key = raw_key.replace("-", "_")
        if _is_token_key(key):
            raise UsageError(f"mount.hffs: a token in fstab is world-readable ({raw_key}=***): use token_file=<path>")
        # `group=NAME` is ours (--group); a bare `group` is mount(8)'s.
        if (key in _GENERIC_OPTIONS and not (has_value and key in _VALUE_OPTIONS)) or key == "comment":
            continue
        if key in _FLAG_OPTIONS and not has_value:
            out.append(_FLAG_OPTIONS[key])
        elif key in _VALUE_OPTIONS and has_value:
            out += [f"--{key.replace('_', '-')}", value]
        else:
            # The key only: a value may be a secret under a misspelt name.
            shown = f"{raw_key}=..." if has_value else raw_key
            raise UsageError(f"mount.hffs: unknown option {shown!r}")
    # The FUSE fsname is the source exactly as written: util-linux matches a mount to its fstab line
    # by that string (a second `mount -a` is then a no-op) and findmnt/df show it.
    out.append(f"--fsname={source}")
    if source.startswith("hub-cache"):
        return ["mount", "hub-cache", *out, "--", mountpoint], fake
    return ["mount", "neff", *out, "--", source.removeprefix("neff:"), mountpoint], fake


def mount_helper(argv: list[str] | None = None) -> int:
    """Console script `mount.hffs`: the mount(8) helper protocol on top of `mountctl mount`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        mapped, fake = mount_helper_argv(argv)
    except HffsError as exc:
        _fail(str(exc), argv)
        return exc.exit_code
    if not fake:
        return main(mapped)
    _Parser.argv = mapped
    args = build_parser().parse_args(mapped)
    try:
        _mount_request(args)  # everything but the mount itself
    except HffsError as exc:
        _fail(str(exc), mapped)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
