"""Command line: serve an emulator until SIGTERM/SIGINT (``python -m hffs_neuron.testing.hub_emulator``)."""

from __future__ import annotations

import argparse
import inspect
import logging
import signal
import threading

from hffs_neuron.testing.emulator.hub import HubEmulator

logger = logging.getLogger(__name__)
_XET_DEFAULT = inspect.signature(HubEmulator).parameters["xet"].default

DESCRIPTION = """A local emulator of the Hugging Face Hub HTTP surface, serving repos and buckets from a
directory. Prints ``READY http://HOST:PORT`` once serving; it is controlled over HTTP through the
``/_emulator/*`` routes (see EmulatorClient)."""


def main(argv: list[str] | None = None) -> int:
    """Serve a Hub emulator until SIGTERM/SIGINT; print ``READY <url>`` once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m hffs_neuron.testing.hub_emulator", description=DESCRIPTION, allow_abbrev=False
    )
    parser.add_argument("--root", required=True, help="directory holding the emulator's data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument(
        "--page-latency", type=float, default=0.0, help="seconds each page of a tree listing takes (a slow Hub)"
    )
    parser.add_argument("--redirect-lfs", action="store_true", help="answer LFS downloads with a 302 to the CDN")
    parser.add_argument("--token", action="append", default=[], help="accepted token for gated repos (repeatable)")
    parser.add_argument("--sample", action="store_true", help="populate the demo NEFF bucket and sharded repo")
    parser.add_argument(
        "--conn-mbps", type=float, default=None, help="bandwidth cap per TCP connection, in MB/s (10^6 bytes)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every request")
    parser.add_argument(
        "--xet",
        action=argparse.BooleanOptionalAction,
        default=_XET_DEFAULT,
        help="speak Xet (CAS, xet hashes and tokens, bucket writes); --no-xet serves plain HTTP only",
    )
    parser.add_argument(
        "--bucket-events", action="store_true", help="serve the bucket event feed (/api/buckets/{id}/events)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    emulator = HubEmulator(
        args.root,
        host=args.host,
        port=args.port,
        page_size=args.page_size,
        page_latency_s=args.page_latency,
        redirect_lfs=args.redirect_lfs,
        tokens=args.token,
        conn_mbps=args.conn_mbps,
        latency_ms=args.latency_ms,
        xet=args.xet,
    )
    emulator.bucket_events.enabled = args.bucket_events
    if args.sample:
        from hffs_neuron.testing.sample_data import build_neff_bucket, build_sharded_model_repo

        logger.info("sample bucket: %s", build_neff_bucket(emulator)["bucket_id"])
        logger.info("sample repo: %s", build_sharded_model_repo(emulator)["repo_id"])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with emulator:
        print(f"READY {emulator.url}", flush=True)
        stop.wait()
    return 0
