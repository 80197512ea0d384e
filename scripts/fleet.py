#!/usr/bin/env python3
"""A fleet on one machine (issue 29): N simulated nodes, one bucket, one Hub emulator on 127.0.0.1.

    .venv/bin/python scripts/fleet.py                        # 8 nodes, every workload, 60 s idle window
    .venv/bin/python scripts/fleet.py --nodes 32 --workloads storm --idle 20
    .venv/bin/python scripts/fleet.py --nodes 4 --model-mb 120 --json fleet.json

Each node is its own daemon, cache dir, mountpoint and host name (HFFS_HOST_NAME); the bucket's event
feed is on and the network simulated (--net MBPS,MS: 10^6 bytes/s per connection, ms per request).
Workloads, each beside its baseline: the publish storm in event mode beside probe mode; idle requests;
the cold start of a fleet through node-local mounts, one shared cache dir (working locks, then no-op
locks) beside plain HF_HUB_CACHE dirs; churn (a node SIGKILLed mid-compile and restarted); the storm
under 429 rate limits beside the storm without. It prints a table with the load average beside the
figures and writes --json; nothing here asserts (tests/test_fleet_sim.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOADS = ("storm", "idle", "cold", "churn", "ratelimit")


def fmt(p: dict | None) -> str:
    if not p or not p.get("n"):
        return "-"
    return f"{p['p50']:.2f} / {p['p95']:.2f} / {p['max']:.2f} s"


def row(measure: str, ours: str, baseline: str = "", load: str = "") -> None:
    print(f"| {measure} | {ours} | {baseline} | {load} |", flush=True)


def bucket_text(bucket: dict) -> str:
    """The bucket's end state: "exact" or what is wrong with it."""
    wrong = {k: v for k, v in bucket.items() if k != "modules" and v}
    return f"{bucket['modules']} modules, {'exact' if not wrong else wrong}"


def storm_rows(label: str, r: dict, base: dict | None, base_label: str) -> None:
    """The storm's figures, `r` beside `base` (another run of the same storm)."""

    def both(figure) -> tuple[str, str]:
        return figure(r), (f"{base_label}: {figure(base)}" if base else "")

    def per_module(x: dict) -> str:
        per = x["per_published_module"]
        return f"{per['publisher']:.2f} (tree {per['tree']:.2f}, batch {per['batch']:.2f}, xet {per['xet_upload']:.2f})"

    def conflicts(x: dict) -> str:
        c = x["conflicts"].values()
        good = sum(len(v["kept_from"]) == 1 and v["lost"] == v["reported_by"] for v in c)
        return f"{good} of {len(c)}: one copy kept, the loser reported the conflict"

    def errors(x: dict) -> str:
        failed = x["publish_failed"] or 0
        return f"{len(x['client_errors'])} client, {x['node_failures'] or 0} node, publish failed {failed}"

    def ratio(x: dict) -> str:
        ratios = [v for v in x["bytes_ratio"].values() if v is not None]
        return f"{min(ratios):.2f}-{max(ratios):.2f} x the modules it read" if ratios else "-"

    load = r["load"]
    row(f"{label}: visibility p50 / p95 / max", *both(lambda x: fmt(x["visibility_s"])), load)
    row(f"{label}: of which publishing (done -> in bucket)", *both(lambda x: fmt(x["publish_s"])))
    row(f"{label}: of which fan-out (in bucket -> read)", *both(lambda x: fmt(x["fanout_s"])))
    row(f"{label}: Hub requests per published module, publisher's", *both(per_module))
    row(f"{label}: downloads per NEFF read", *both(lambda x: f"{x['downloads_per_read']:.2f}"))
    row(f"{label}: Hub requests per node per minute", *both(lambda x: f"{x['requests_per_node_per_minute']:.0f}"))
    row(f"{label}: bytes per node", *both(ratio))
    row(f"{label}: bucket end state", *both(lambda x: bucket_text(x["bucket"])))
    row(f"{label}: doubly compiled", *both(conflicts))
    row(f"{label}: errors", *both(errors))
    row(f"{label}: wall time", *both(lambda x: f"{x['seconds']['total']:.1f} s ({x['modules']} modules)"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--modules", type=int, default=8, help="modules each node compiles")
    parser.add_argument("--overlap", type=int, default=2, help="modules compiled by two nodes at the same moment")
    parser.add_argument("--neff-kb", type=int, default=1024, help="size of each model.neff")
    parser.add_argument("--compile-s", type=float, default=1.0, help="seconds each module takes to compile")
    parser.add_argument("--net", default="100,20", help="MBPS,MS per connection and per request; 'off' for loopback")
    parser.add_argument("--mode", default="events,probe", help="storm follow modes: events, probe or both")
    parser.add_argument("--negative-ttl", type=float, default=3.0, help="probe mode's --negative-ttl")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window in seconds")
    parser.add_argument("--model-mb", type=int, default=600, help="cold start: model size (12 shards)")
    parser.add_argument("--grace", type=float, default=5.0, help="churn: --stale-lock-grace")
    parser.add_argument("--rate-limit", default="0.1,1", help="SHARE,RETRY_AFTER_S of 429 answers")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {','.join(WORKLOADS)}")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args()
    wanted = set(args.workloads.split(","))
    net = None if args.net == "off" else tuple(float(x) for x in args.net.split(","))
    modes = args.mode.split(",")

    work = Path(tempfile.mkdtemp(prefix="hffs-fleet-", dir=args.work_dir))
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HOME"] = str(work / "hf_home")
    from hffs_neuron.testing import fleet as fl
    from hffs_neuron.testing.hub_emulator import HubEmulator

    hub = HubEmulator(work / "hub").start()
    os.environ["HF_ENDPOINT"] = hub.url
    fleet = fl.make_fleet(hub, work, network=net)
    neff = args.neff_kb * 1024
    out: dict = {
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_start": fl.load_average(),
    }
    print(f"fleet: {args.nodes} nodes, {os.cpu_count()} CPUs, net {args.net}, load {fl.load_average()}", flush=True)
    print("| workload | hffs-neuron | baseline | load |\n|---|---|---|---|", flush=True)
    try:
        storms = {}
        common = {
            "nodes": args.nodes,
            "per_node": args.modules,
            "overlap": args.overlap,
            "neff_size": neff,
            "compile_s": args.compile_s,
        }
        idle = args.idle if "idle" in wanted else 0.0
        for mode in modes if wanted & {"storm", "idle"} else ():
            storms[mode] = fl.run_storm(
                fleet, mode, events=mode == "events", negative_ttl=args.negative_ttl, idle=idle, **common
            )
        if "ratelimit" in wanted:
            share, retry_after = (float(x) for x in args.rate_limit.split(","))
            storms["ratelimit"] = fl.run_storm(fleet, "ratelimit", rate_limit=(share, retry_after), **common)
        out["storm"] = storms
        if "events" in storms or "probe" in storms:
            label = "events" if "events" in storms else "probe"
            base = storms.get("probe") if label == "events" else None
            storm_rows(f"storm, {label}", storms[label], base, "probe mode")
        for mode in modes:
            if "idle" in storms.get(mode, {}):
                idle = storms[mode]["idle"]
                row(
                    f"idle {idle['window_s']:.0f} s, {mode}: Hub requests per node per minute",
                    f"{idle['per_node_per_minute']:.2f} {idle['requests']}",
                    "",
                    fl.load_average(),
                )
        if "ratelimit" in storms:
            r = storms["ratelimit"]
            b = r["backoff"]
            row(
                f"storm under 429 ({args.rate_limit}): 429 answers; retries",
                f"{r['requests'].get('429', 0)}; the mount's client waited {b['mount_waits']} times, "
                f"{b['mount_shorter']} shorter than Retry-After; of {b['retried']} retried requests seen, "
                f"{len(b['retried_sooner'])} came back sooner (gap {fmt(b['retry_gap_s'])})",
            )
            storm_rows("storm under 429", r, storms.get("events"), "no 429")

        if "churn" in wanted:
            bucket = "fleet/churn"
            hub.add_bucket(bucket)
            nodes = fleet.add(
                "neff", min(args.nodes, 4), bucket, prefix="churn", publish=True, stale_lock_grace=args.grace
            )
            out["churn"] = c = fl.churn(fleet, nodes, bucket, neff_size=neff, grace=args.grace)
            fleet.remove(nodes)
            row(
                f"churn ({c['nodes']} nodes, --stale-lock-grace {args.grace:g} s)",
                f"restart {c['restart_s']:.1f} s; the restarted compiler waited {c['lock_wait_after_restart_s']:.1f} s "
                f"on its dead lock; module A published before the kill: {c['a_published_before_kill']}, after: "
                f"{not c['bucket']['missing']}; bucket {bucket_text(c['bucket'])}; "
                f"errors: {len(c['client_errors'])} client, other nodes {c['other_node_failures'] or 0}",
                "",
                fl.load_average(),
            )

        if "cold" in wanted:
            size = args.model_mb * 1_000_000
            commit, names = fl.sharded_model(hub, work, "fleet/model", size)
            model_bytes = sum((work / "model-data" / n).stat().st_size for n in names if n.endswith(".safetensors"))
            model_bytes += len(b'{"model_type": "gpt2"}')
            shim = fl.build_nolock_shim(work)
            cold = {}
            for way in ("plain", "local", "shared", "shared-nolock"):
                if way == "shared-nolock" and shim is None:
                    continue
                cold[way] = fl.cold_start(
                    fleet, "fleet/model", commit, names, model_bytes, nodes=args.nodes, way=way, shim=shim
                )
            out["cold"] = cold
            plain = cold["plain"]
            base = (
                f"plain HF_HUB_CACHE x {args.nodes}: {plain['seconds']:.1f} s, {plain['upstream_models']:.2f} x model"
            )
            for way in ("local", "shared", "shared-nolock"):
                if way in cold:
                    r = cold[way]
                    ours = (
                        f"{r['seconds']:.1f} s, upstream {r['upstream_models']:.2f} x model, "
                        f"errors {len(r['errors'])}, temp files left {len(r['temp_files_left'])}"
                    )
                    row(f"cold start {args.model_mb} MB, {way}", ours, base, r["load"])
    finally:
        fleet.close()
        hub.stop()
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
