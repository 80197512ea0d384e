"""mountctl: mount, inspect, warm and publish hffs-neuron filesystems.

Every failure is one line on stderr and a non-zero exit code (see EXIT_CODES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hffs_neuron import constants
from hffs_neuron.errors import HffsError, MountError, UsageError
from hffs_neuron.mount import (
    check_fuse_available,
    mount,
    parse_duration,
    parse_size,
    read_states,
    unmount,
)

EXIT_CODES = """exit codes:
  0  success
  1  other error (I/O, integrity)
  2  bad usage: unknown option, bad id, size or duration syntax
  3  mount problem: FUSE missing, mountpoint missing/not empty/already mounted/stale/busy, daemon failed
  4  not found: bucket, repo, revision or path
  5  access denied: unauthorized, forbidden or gated (set HF_TOKEN)
  6  Hub unreachable or failing after retries"""


class _Parser(argparse.ArgumentParser):
    """argparse that fails with one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"mountctl: {message} (see mountctl --help)", file=sys.stderr)
        sys.exit(2)


def _common_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", default=str(constants.CACHE_DIR), help="blob store and local layers"
    )
    p.add_argument(
        "--cache-size", default=constants.CACHE_SIZE, help="blob store size limit, e.g. 50G"
    )
    p.add_argument("--metadata-ttl", default=str(constants.METADATA_TTL), help="seconds a listing is trusted")
    p.add_argument("--negative-ttl", default=str(constants.NEGATIVE_TTL), help="seconds 'not found' is trusted")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the saved token)")
    tok.add_argument("--token-file", default=None, help="file holding the Hub token")
    p.add_argument("--foreground", action="store_true", help="stay attached instead of daemonizing")
    p.add_argument(
        "--allow-other", action="store_true", help="let other users in (opt-in)"
    )
    p.add_argument("--log-file", default=None, help="daemon log file (default: in the runtime dir)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--timeout", default=str(constants.OPERATION_TIMEOUT), help="network deadline, seconds"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mountctl",
        description="Mount Hugging Face storage with FUSE: Neuron compile caches and a lazy HF_HUB_CACHE.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount a view")
    views = m.add_subparsers(dest="view", required=True, parser_class=_Parser)
    neff = views.add_parser("neff", help="a Storage Bucket's flat Neuron cache (NEURON_COMPILE_CACHE_URL)")
    neff.add_argument("bucket_id")
    neff.add_argument("mountpoint")
    neff.add_argument("--prefix", default=None, help="mount this folder of the bucket")
    neff.add_argument("--read-only", action="store_true", help="refuse writes with EROFS")
    neff.add_argument("--show-model-area", action="store_true", help="also show the per-model area, read-only")
    _common_mount_options(neff)
    hub = views.add_parser("hub-cache", help="a lazy, case-insensitive HF_HUB_CACHE")
    hub.add_argument("mountpoint")
    hub.add_argument("--backing", default=None, help="real hub cache dir where writes land (default: in the cache dir)")
    hub.add_argument("--repo", action="append", default=[], metavar="ID[@REV]", help="pre-pin a repo (repeatable)")
    _common_mount_options(hub)

    u = sub.add_parser("umount", help="unmount (waits for the daemon)")
    u.add_argument("mountpoint")
    u.add_argument("--force", action="store_true", help="also clear dead-daemon and busy mounts (lazy unmount)")

    s = sub.add_parser("status", help="show mounts, cache use, counters and in-flight fetches")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true")

    pf = sub.add_parser("prefetch", help="warm files or whole directories of a mount")
    pf.add_argument("paths", nargs="+")
    pf.add_argument("--jobs", type=int, default=4)

    pu = sub.add_parser("push", help="NEFF view: publish complete local modules to the bucket")
    pu.add_argument("mountpoint")
    pu.add_argument("--dry-run", action="store_true")

    c = sub.add_parser("cache", help="inspect or shrink the blob store")
    c.add_argument("action", choices=("du", "prune"))
    c.add_argument("--cache-dir", default=str(constants.CACHE_DIR))
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
    return getattr(args, "token", None)


def cmd_mount(args: argparse.Namespace) -> int:
    options = {
        "cache_dir": os.path.abspath(args.cache_dir),
        "cache_size": args.cache_size,
        "metadata_ttl": parse_duration(args.metadata_ttl),
        "negative_ttl": parse_duration(args.negative_ttl),
        "endpoint": args.endpoint,
        "allow_other": args.allow_other,
        "log_file": os.path.abspath(args.log_file) if args.log_file else None,
        "log_level": args.log_level,
        "timeout": parse_duration(args.timeout),
    }
    parse_size(args.cache_size)
    if args.view == "neff":
        source = args.bucket_id
        options.update(prefix=args.prefix, read_only=args.read_only, show_model_area=args.show_model_area)
    else:
        source = ""
        options.update(backing=os.path.abspath(args.backing) if args.backing else None, repos=args.repo)
    token = _token(args)
    if args.foreground:
        return _mount_foreground(args.view, args.mountpoint, source, token, options)
    handle = mount(args.view, args.mountpoint, source, token=token, **options)
    print(f"mounted {args.view} view on {handle.mountpoint} (pid {handle.pid})")
    return 0


def _mount_foreground(view: str, mountpoint: str, source: str, token: str | None, options: dict) -> int:
    from hffs_neuron.mount import MountConfig, configure_logging, serve, validate_config

    if token:
        os.environ["HF_TOKEN"] = token
    config = MountConfig(view=view, mountpoint=os.path.abspath(mountpoint), source=source, **options)
    validate_config(config)
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


def _store_usage(cache_dir: str) -> int:
    root = Path(cache_dir) / "blobs-store" / "blobs"
    return sum(f.stat().st_size for f in root.glob("*/*") if f.is_file()) if root.is_dir() else 0


def cmd_status(args: argparse.Namespace) -> int:
    states = read_states()
    if args.mountpoint:
        wanted = os.path.realpath(args.mountpoint)
        states = [s for s in states if s.get("mountpoint") == wanted]
        if not states:
            raise MountError(f"{args.mountpoint}: no hffs mount recorded here")
    for state in states:
        state["cache_used"] = _store_usage(state.get("cache_dir", ""))
        state["uptime"] = round(time.time() - state.get("started", time.time()), 1)
        state["mounted"] = os.path.ismount(state.get("mountpoint", ""))
    if args.json:
        print(json.dumps({"mounts": states}, indent=1))
        return 0
    if not states:
        print("no hffs mounts")
        return 0
    for s in states:
        health = "running" if s["alive"] and s["mounted"] else ("DEAD daemon" if not s["alive"] else "not mounted")
        c = s.get("counters", {})
        print(f"{s['mountpoint']}: {s['view']} view of {s['source']} ({health}, pid {s['pid']}, up {s['uptime']}s)")
        print(f"  cache {s.get('cache_dir')}: {_human(s['cache_used'])} used")
        print(
            f"  hits {c.get('hits', 0)}  misses {c.get('misses', 0)}  fetches {c.get('fetches', 0)}  "
            f"fetched {_human(c.get('bytes_fetched', 0))}  http requests {c.get('http_requests', 0)}"
        )
        for f in s.get("in_flight", []):
            pct = 100 * f["done"] / f["total"] if f["total"] else 100
            print(f"  fetching {f['name']}: {_human(f['done'])} / {_human(f['total'])} ({pct:.0f}%)")
        if s.get("log_file"):
            print(f"  log {s['log_file']}")
    return 0


def _files_under(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory")
        if os.path.isdir(path) and not os.path.islink(path):
            for root, _dirs, names in os.walk(path):
                files.extend(os.path.join(root, n) for n in sorted(names))
        else:
            files.append(path)
    return files


def _mount_state_of(path: str) -> dict | None:
    real = os.path.realpath(path)
    best = None
    for state in read_states():
        mp = state.get("mountpoint", "")
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) > len(best["mountpoint"])
        ):
            best = state
    return best


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Warm by opening each file through the mount: the daemon's single-flight store does the fetch."""
    from tqdm import tqdm

    files = _files_under(args.paths)
    sizes = {f: os.stat(f).st_size if os.path.exists(f) else 0 for f in files}
    total = sum(sizes.values())
    failures: list[str] = []
    done = threading.Event()

    def warm(path: str) -> int:
        try:
            with open(path, "rb") as fh:  # open() returns once the blob is complete and verified
                fh.read(1)
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror or exc}")
            return 0
        return sizes[path]

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prefetch", file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for size in pool.map(warm, files):
                bar.update(size)
        done.set()
    print(f"prefetched {len(files) - len(failures)} of {len(files)} files ({_human(total)})")
    for failure in failures:
        print(f"mountctl: prefetch failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_push(args: argparse.Namespace) -> int:
    from hffs_neuron.publish import push

    state = _mount_state_of(args.mountpoint)
    if state is None or os.path.realpath(args.mountpoint) != state.get("mountpoint"):
        raise MountError(f"{args.mountpoint}: not an hffs mount (see mountctl status)")
    plan = push(state, dry_run=args.dry_run)
    verb = "would push" if args.dry_run else "pushed"
    for module, files in plan.upload:
        print(f"{verb} {module} ({len(files)} files)")
    for module, reason in plan.skipped:
        print(f"skipped {module}: {reason}")
    if not plan.upload:
        print("nothing to push")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from hffs_neuron.store.blobstore import BlobStore

    root = Path(args.cache_dir) / "blobs-store"
    if not root.is_dir():
        print(f"{args.cache_dir}: no blob store yet (0 B)")
        return 0
    store = BlobStore(root)
    try:
        if args.action == "du":
            blobs = store.blobs()
            print(f"{_human(sum(st.st_size for _, st in blobs))} in {len(blobs)} blobs under {root}")
            return 0
        limit = parse_size(args.max_size) if args.max_size else 0
        freed = store.evict_if_needed(limit)
        print(f"freed {_human(freed)}; {_human(store.usage())} left (blobs open in a mount are kept)")
        return 0
    finally:
        store.close()


COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "status": cmd_status,
    "prefetch": cmd_prefetch,
    "push": cmd_push,
    "cache": cmd_cache,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            check_fuse_available()
        return COMMANDS[args.command](args)
    except HffsError as exc:
        print(f"mountctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mountctl: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"mountctl: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
