"""A fleet on one machine (issue 29): simulated nodes against one Hub emulator, and the workloads that
measure what a fleet sees. `scripts/fleet.py` prints the figures; `tests/test_fleet_sim.py` checks a
3-node version of each workload.

A node is its own daemon, cache directory, mountpoint and host name (`HFFS_HOST_NAME`, so host-keyed
names differ), plus one client process playing its compiler (or model loader). All traffic goes to the
emulator on 127.0.0.1, never another address. README "Fleet" has the figures and how to run them.

Workloads (each returns a dict of figures; none asserts):
- `publish_storm`: every node compiles its modules with libneuronxla's file pattern and polls for
  everyone else's (`exists(model.done)`, then a read of `model.neff`), `--publish` on one bucket.
- `cold_start`: every node reads the same sharded model at once through a hub-cache mount (node-local
  or one shared cache directory, with working or no-op locks) or with `hf_hub_download` into a plain
  cache directory per node.
- `churn`: a node's compiler and daemon are SIGKILLed mid-compile; the node is remounted.
- `publish_storm` with `rate_limit` set: a share of the Hub routes answer 429 with `Retry-After`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import constants
from ..mount import MountHandle, mount, status, unmount
from .hub_emulator import HubEmulator
from .sample_data import COMPILER_VERSIONS

logger = logging.getLogger(__name__)

VERSION = COMPILER_VERSIONS[0]
MODULE_FILES = ("compile_flags.json", "model.done", "model.hlo_module.pb", "model.neff")
MiB = 1024 * 1024
# FUSE replies that are a client's answer, not a failure (a miss, an O_EXCL claim taken, no xattr).
EXPECTED_ERRNOS = frozenset({"ENOENT", "EEXIST", "ENODATA", "ENOTEMPTY"})

# One node's compiler: libneuronxla's pattern per module (root `lock` opened for writing on every cache
# operation, the module's `*.lock` by O_EXCL, waited on while another holds it, hlo, flags, compile time,
# neff, done, lock removed), while a thread polls for the other nodes' modules as a waiting compiler does.
# argv[1]: JSON spec. Prints "ready", waits for a byte on stdin, prints "begin NAME" / "done NAME" as it
# goes, then one JSON line: {"done": {name: wall time}, "compiled": {name: sha256}, "seen": {name: [wall
# time, size, sha256]}, "lock_waits": {name: seconds}, "errors": [...]}.
NODE_SCRIPT = r"""
import fcntl, hashlib, json, os, sys, threading, time
spec = json.loads(sys.argv[1])
root, version, deadline = spec["root"], spec["version"], time.monotonic() + spec["deadline"]
out = {"done": {}, "compiled": {}, "seen": {}, "lock_waits": {}, "errors": []}

def poll():
    pending = list(spec["others"])
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            module = os.path.join(root, version, name)
            try:
                if not os.path.exists(os.path.join(module, "model.done")):
                    continue
                with open(os.path.join(module, "model.neff"), "rb") as f:
                    data = f.read()
                out["seen"][name] = [time.time(), len(data), hashlib.sha256(data).hexdigest()]
                pending.remove(name)
            except OSError as exc:
                out["errors"].append(f"poll {name}: {exc!r}")
                pending.remove(name)
        time.sleep(spec["poll_s"])
    out["errors"] += [f"never saw {name}" for name in pending]

def compile_module(name):
    module = os.path.join(root, version, name)
    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_UN)
    os.makedirs(module, exist_ok=True)
    claim, waited = os.path.join(module, "model.hlo_module.pb.lock"), time.monotonic()
    while True:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    out["lock_waits"][name] = time.monotonic() - waited
    print(f"begin {name}", flush=True)
    with open(os.path.join(module, "model.hlo_module.pb"), "wb") as f:
        f.write(b"hlo of " + name.encode())
    with open(os.path.join(module, "compile_flags.json"), "wb") as f:
        f.write(b'["--target=trn1"]')
    time.sleep(spec["hold_s"].get(name, spec["compile_s"]))
    neff = os.urandom(spec["neff_size"])
    with open(os.path.join(module, "model.neff"), "wb") as f:
        f.write(neff)
    with open(os.path.join(module, "model.done"), "wb"):
        pass
    out["done"][name] = time.time()
    out["compiled"][name] = hashlib.sha256(neff).hexdigest()
    os.unlink(claim)
    print(f"done {name}", flush=True)

print("ready", flush=True)
os.read(0, 1)
poller = threading.Thread(target=poll)
poller.start()
for name in spec["own"]:
    try:
        compile_module(name)
    except OSError as exc:
        out["errors"].append(f"compile {name}: {exc!r}")
poller.join()
print(json.dumps(out), flush=True)
"""

# One node's model loader (argv: cache dir, repo id, commit, files as JSON): `hf_hub_download` of every
# file, each read to its end (through a hub-cache mount the read is what fetches). Prints the seconds.
LOADER_SCRIPT = r"""
import json, sys, time
from huggingface_hub import hf_hub_download
cache, repo, commit, names = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
started = time.monotonic()
for name in names:
    with open(hf_hub_download(repo, name, revision=commit, cache_dir=cache), "rb") as f:
        while f.read(8 * 1024 * 1024):
            pass
print(time.monotonic() - started, flush=True)
"""

# Lock calls succeed without locking anything, as flock does on many Lustre, GPFS and NFS mounts.
NOLOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/file.h>

int flock(int fd, int operation) { (void)fd; (void)operation; return 0; }

static int lock_cmd(int cmd, void *arg) {
    if (cmd == F_GETLK || cmd == F_OFD_GETLK) { ((struct flock *)arg)->l_type = F_UNLCK; return 1; }
    return cmd == F_SETLK || cmd == F_SETLKW || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW;
}

#define FORWARD(name)                                                         \
    int name(int fd, int cmd, ...) {                                          \
        va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap); \
        if (lock_cmd(cmd, arg)) return 0;                                     \
        static int (*real)(int, int, ...);                                    \
        if (!real) real = (int (*)(int, int, ...))dlsym(RTLD_NEXT, #name);    \
        return real(fd, cmd, arg);                                            \
    }
FORWARD(fcntl)
FORWARD(fcntl64)
"""


def build_nolock_shim(directory: Path) -> Path | None:
    """An LD_PRELOAD library turning `flock`/`fcntl` locks into no-ops; None without a C compiler."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    source, shim = directory / "nolock.c", directory / "nolock.so"
    source.write_text(NOLOCK_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"], check=True, timeout=60)
    return shim


def module_name(tag: str, i: int) -> str:
    return f"MODULE_{tag}{i:06d}+0badcafe"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / max of `values` (None each when empty)."""
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": statistics.median(ordered), "p95": p95, "max": ordered[-1], "n": len(ordered)}


def request_kind(method: str, path: str) -> str:
    """What a recorded request was for, in the words of the figures."""
    if path.endswith("/events"):
        return "events"
    if "/tree" in path:
        return "tree"
    if path.endswith("/paths-info"):
        return "paths-info"
    if path.endswith("/batch"):
        return "batch"
    if "xet-write-token" in path or path.startswith("/v1/chunks/") or (path.startswith("/v") and method == "POST"):
        return "xet-upload"  # the token, global dedupe queries, xorbs and shards
    if "xet-read-token" in path or path.startswith(("/v1/", "/v2/")):
        return "xet-download"  # the token, reconstructions and xorb ranges
    if "/resolve/" in path:
        return "resolve"
    return "other"


def request_counts(hub: HubEmulator, since: float = 0.0) -> Counter:
    """Requests the emulator recorded at or after wall time `since`, by kind; `429` counts those answered so."""
    counts: Counter = Counter()
    for record in hub.requests():
        if record.time >= since:
            counts[request_kind(record.method, record.path)] += 1
            counts["429"] += record.status == 429
    return counts


@dataclass
class Node:
    """One simulated host: a daemon (`handle`), its cache dir, mountpoint and host name."""

    name: str
    mountpoint: Path
    cache_dir: Path
    env: dict[str, str]
    options: dict[str, Any]
    view: str
    source: str = ""
    handle: MountHandle | None = None

    def status(self) -> dict:
        (state,) = status(self.mountpoint)
        return state

    def failures(self) -> dict[str, int]:
        """FUSE replies that failed for a reason other than a client's own miss (EIO and the like)."""
        errors = self.status()["counters"]["errors"]
        return {name: n for name, n in errors.items() if name not in EXPECTED_ERRNOS}


@dataclass
class Fleet:
    """Nodes mounted against `hub` under `work`; `close()` unmounts every one."""

    hub: HubEmulator
    work: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    def add(
        self,
        view: str,
        count: int,
        source: str = "",
        *,
        prefix: str = "node",
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> list[Node]:
        """Mount `count` nodes of `view` (`options`: `MountConfig` fields; `env`: more environment for
        the daemons); each gets `<work>/<prefix>-<i>/{mnt,cache,backing}` unless a `cache_dir` (one
        shared directory) is given, and host name `<prefix>-<i>`."""
        added = []
        for i in range(count):
            name = f"{prefix}-{i}"
            base = self.work / name
            (base / "mnt").mkdir(parents=True, exist_ok=True)
            node_options = dict(options)
            node_options.setdefault("cache_dir", str(base / "cache"))
            if view == "hub-cache":
                (base / "backing").mkdir(exist_ok=True)
                node_options["backing"] = str(base / "backing")
            node_env = dict(self.env, **(env or {}), HFFS_HOST_NAME=name)
            node = Node(name, base / "mnt", Path(node_options["cache_dir"]), node_env, node_options, view, source)
            self.start(node)
            self.nodes.append(node)
            added.append(node)
        return added

    def start(self, node: Node) -> None:
        """Mount `node` (again, after a crash: a stale mount left by a killed daemon is cleared)."""
        node.handle = mount(node.view, node.mountpoint, node.source, env=node.env, **node.options)

    def kill(self, node: Node) -> None:
        """SIGKILL the node's daemon (a node lost without warning); its mount goes stale."""
        process = node.handle.process if node.handle is not None else None
        if process is None:
            raise RuntimeError(f"{node.name}: no daemon process of this fleet's to kill")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def remove(self, nodes: list[Node]) -> None:
        """Unmount `nodes` (forced: a killed client may still hold a file open)."""
        for node in nodes:
            try:
                unmount(node.mountpoint, force=True)
            except Exception as exc:  # one failure must not keep the others mounted
                logger.warning("unmounting %s failed: %s", node.mountpoint, exc)
            self.nodes.remove(node)

    def close(self) -> None:
        self.remove(list(self.nodes))


def make_fleet(
    hub: HubEmulator, work: Path, *, env: dict[str, str] | None = None, network: tuple[float, float] | None = (100, 20)
) -> Fleet:
    """A fleet on `hub` with the event feed on and the network simulated (`network`: 10^6 bytes/s per
    connection and ms per request; None: plain loopback). `env` is the daemons' environment, whose
    `HFFS_RUNTIME_DIR` must be this process's `constants.RUNTIME_DIR` (mount and status read the state
    files there); by default both are set to a runtime dir under `work`."""
    if env is None:
        run = work / "run"
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        constants.RUNTIME_DIR = run
        env = dict(os.environ, HFFS_RUNTIME_DIR=str(run))
    env = dict(env, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    hub.bucket_events.enabled = True
    if network is not None:
        hub.set_network(conn_mbps=network[0], latency_ms=network[1])
    return Fleet(hub, work, env)


# -- publish storm ---------------------------------------------------------------------------------
@dataclass
class StormPlan:
    """Which node compiles what: `own[i]` for node i; each shared module is compiled by two nodes at once
    (first in both their orders)."""

    own: list[list[str]]
    shared: list[str]

    @classmethod
    def make(cls, nodes: int, per_node: int, overlap: int, tag: str = "s") -> StormPlan:
        shared = [module_name(f"{tag}x", k) for k in range(overlap if nodes > 1 else 0)]
        own: list[list[str]] = [[] for _ in range(nodes)]
        for k, name in enumerate(shared):
            own[k % nodes].append(name)
            own[(k + 1) % nodes].append(name)
        for i in range(nodes):
            own[i] += [module_name(f"{tag}{i:03d}", j) for j in range(per_node - len(own[i]))]
        return cls(own, shared)

    @property
    def modules(self) -> set[str]:
        return {name for names in self.own for name in names}


class NodeClient:
    """A node's compiler process (`NODE_SCRIPT`), started and waiting for the go signal."""

    def __init__(self, node: Node, spec: dict[str, Any]):
        self.node = node
        argv = [sys.executable, "-c", NODE_SCRIPT, json.dumps(spec)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        line = self.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"{node.name}'s compiler did not start: {line} {self.stderr.read()[-2000:]}")

    def go(self) -> None:
        self.stdin.write("g")
        self.stdin.flush()

    def wait_for(self, wanted: str) -> None:
        """Read its progress lines ("begin NAME", "done NAME") up to `wanted` (RuntimeError if it ends first)."""
        for line in self.stdout:
            if line.strip() == wanted:
                return
        raise RuntimeError(f"{self.node.name}'s compiler ended before {wanted!r}")

    def result(self, timeout: float) -> dict:
        """Its JSON result (an error entry if it died); killed if it is still running after `timeout`."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        failure = f"{self.node.name}'s compiler exited {self.proc.returncode}: {err[-2000:]}"
        return {"done": {}, "compiled": {}, "seen": {}, "lock_waits": {}, "errors": [failure]}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()


def node_spec(node: Node, own: list[str], others: list[str], *, neff_size: int, deadline: float, **extra: Any) -> dict:
    """`NODE_SCRIPT`'s spec: compile `own`, poll for `others`, all within `deadline` seconds; `extra`
    overrides `compile_s` (per module), `poll_s` (between polling rounds) or `hold_s` ({module: seconds}
    of compile time for some modules)."""
    spec = {
        "root": str(node.mountpoint),
        "version": VERSION,
        "own": own,
        "others": others,
        "neff_size": neff_size,
        "deadline": deadline,
        "compile_s": 0.2,
        "poll_s": 0.05,
        "hold_s": {},
    }
    spec.update(extra)
    return spec


def wait_published(nodes: list[Node], modules: set[str], bucket_dir: Path, timeout: float) -> float:
    """Seconds until every module's `model.done` is in the bucket and no node has a publish pending."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all((bucket_dir / VERSION / m / "model.done").exists() for m in modules) and all(
            n.status()["publish"]["pending"] == 0 for n in nodes
        ):
            break
        time.sleep(0.2)
    return time.monotonic() - started


def bucket_end_state(bucket_dir: Path, modules: set[str]) -> dict[str, Any]:
    """The bucket against the modules compiled: missing modules, extra files (locks, logs, temp files,
    modules nobody finished) and incomplete ones."""
    found: dict[str, set[str]] = {}
    extra: list[str] = []
    for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
        parts = path.relative_to(bucket_dir).parts
        if len(parts) == 3 and parts[0] == VERSION and parts[2] in MODULE_FILES:
            found.setdefault(parts[1], set()).add(parts[2])
        else:
            extra.append("/".join(parts))
    return {
        "modules": len(found),
        "missing": sorted(modules - found.keys()),
        "unexpected": sorted(found.keys() - modules),
        "incomplete": sorted(m for m, files in found.items() if files != set(MODULE_FILES)),
        "extra_files": extra,
    }


class BucketWatch:
    """Records when each module's `model.done` first shows in the emulator's bucket directory (the end
    of its publishing), polling every 20 ms until `stop()`."""

    def __init__(self, bucket_dir: Path, modules: set[str]):
        self.bucket_dir = bucket_dir
        self.pending = set(modules)
        self.at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-bucket-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.pending and not self._stop.wait(0.02):
            for name in list(self.pending):
                if (self.bucket_dir / VERSION / name / "model.done").exists():
                    self.at[name] = time.time()
                    self.pending.discard(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def publish_storm(
    fleet: Fleet,
    nodes: list[Node],
    bucket_id: str,
    plan: StormPlan,
    *,
    neff_size: int,
    deadline: float = 120.0,
    compile_s: float = 0.2,
) -> dict[str, Any]:
    """Run the storm on `nodes` (mounted on `bucket_id` with `--publish`); the figures of issue 29's
    workload 1: visibility (from `model.done` closed on the first node that compiled a module to the
    NEFF read on each node that did not; split at the module's arrival in the bucket), requests (by kind,
    per node per minute, per published module), bytes per node, the bucket's end state, and for each
    doubly compiled module whose copy the bucket kept and who reported the conflict."""
    hub = fleet.hub
    bucket_dir = hub.bucket_dir(bucket_id)
    clients = []
    for i, node in enumerate(nodes):
        others = sorted(plan.modules - set(plan.own[i]))
        spec = node_spec(node, plan.own[i], others, neff_size=neff_size, deadline=deadline, compile_s=compile_s)
        clients.append(NodeClient(node, spec))
    fetched_before = {n.name: n.status()["counters"]["bytes_fetched"] for n in nodes}
    load_before = load_average()
    watch = BucketWatch(bucket_dir, plan.modules)
    started_wall, started = time.time(), time.monotonic()
    for client in clients:
        client.go()
    results = [c.result(deadline + 30) for c in clients]
    polled = time.monotonic() - started
    settled = wait_published(nodes, plan.modules, bucket_dir, 60)
    duration = time.monotonic() - started
    watch.stop()
    counts = request_counts(hub, started_wall)
    states = [n.status() for n in nodes]

    first_done: dict[str, float] = {}
    for result in results:
        for name, at in result["done"].items():
            first_done[name] = min(at, first_done.get(name, at))
    pairs = [(name, seen[0]) for r in results for name, seen in r["seen"].items() if name in first_done]
    conflicts = {}
    for name in plan.shared:
        kept = _sha256(bucket_dir / VERSION / name / "model.neff")
        compiled = {
            n.name: r["compiled"].get(name) for n, r in zip(nodes, results, strict=True) if name in r["compiled"]
        }
        conflicts[name] = {
            "kept_from": sorted(k for k, sha in compiled.items() if sha == kept),
            "lost": sorted(k for k, sha in compiled.items() if sha != kept),
            "reported_by": sorted(
                n.name
                for n, st in zip(nodes, states, strict=True)
                if any(c["module"].endswith(name) for c in st["publish"]["conflicts"])
            ),
        }
    modules = len(plan.modules)
    reads = sum(len(plan.modules - set(own)) for own in plan.own)
    fetched = {
        n.name: st["counters"]["bytes_fetched"] - fetched_before[n.name] for n, st in zip(nodes, states, strict=True)
    }
    expected = {n.name: len(plan.modules - set(own)) * neff_size for n, own in zip(nodes, plan.own, strict=True)}
    publisher = sum(counts[k] for k in ("tree", "paths-info", "batch", "xet-upload", "other"))
    return {
        "nodes": len(nodes),
        "modules": modules,
        "doubly_compiled": len(plan.shared),
        "neff_bytes": neff_size,
        "seconds": {"polled": polled, "settled": settled, "total": duration},
        "visibility_s": percentiles([seen - first_done[name] for name, seen in pairs]),
        "publish_s": percentiles([watch.at[m] - first_done[m] for m in watch.at if m in first_done]),
        "fanout_s": percentiles([seen - watch.at[name] for name, seen in pairs if name in watch.at]),
        "requests": dict(counts),
        "requests_per_node_per_minute": sum(v for k, v in counts.items() if k != "429") / len(nodes) / (duration / 60),
        "per_published_module": {
            "tree": counts["tree"] / modules,
            "publisher": publisher / modules,
            "batch": counts["batch"] / modules,
            "xet_upload": counts["xet-upload"] / modules,
        },
        "downloads_per_read": (counts["xet-download"] + counts["resolve"]) / max(1, reads),
        "bytes_per_node": fetched,
        "bytes_ratio": {k: fetched[k] / expected[k] if expected[k] else None for k in fetched},
        "bucket": bucket_end_state(bucket_dir, plan.modules),
        "conflicts": conflicts,
        "client_errors": [e for r in results for e in r["errors"]],
        "node_failures": {n.name: f for n in nodes if (f := n.failures())},
        "publish_failed": {
            n.name: st["publish"]["failed"] for n, st in zip(nodes, states, strict=True) if st["publish"]["failed"]
        },
        "load": f"{load_before} -> {load_average()}",
        "results": results,
    }


def run_storm(
    fleet: Fleet,
    name: str,
    *,
    nodes: int,
    per_node: int,
    overlap: int,
    neff_size: int,
    events: bool = True,
    negative_ttl: float = 3.0,
    idle: float = 0.0,
    rate_limit: tuple[float, float] | None = None,
    compile_s: float = 0.2,
) -> dict[str, Any]:
    """A publish storm on a bucket and nodes of its own (`--publish`; the event feed followed or, with
    `events` False, probe mode with `negative_ttl`), then `idle` seconds of no work; with `rate_limit`
    (share, Retry-After seconds) a share of the Hub's answers during the storm are 429s; each module takes
    `compile_s` to compile. The nodes are unmounted at the end."""
    bucket = f"fleet/{name}"
    fleet.hub.add_bucket(bucket)
    options = {"publish": True, "follow_events": events, "negative_ttl": negative_ttl}
    mounted = fleet.add("neff", nodes, bucket, prefix=name, **options)
    try:
        plan = StormPlan.make(nodes, per_node, overlap, tag=name[:1])
        if rate_limit is not None:
            limit(fleet.hub, *rate_limit)
        started = time.time()
        try:
            result = publish_storm(fleet, mounted, bucket, plan, neff_size=neff_size, compile_s=compile_s)
        finally:
            fleet.hub.faults.clear()
        if rate_limit is not None:
            told, waits, gaps = rate_limit[1], backoff_waits(mounted), retry_gaps(fleet.hub, started, plan.shared)
            result["backoff"] = {
                "retry_after": told,
                "mount_waits": len(waits),
                "mount_shorter": sum(w < told for w in waits),
                "retried": len(gaps),
                # 50 ms: the emulator's clock for the request against the client's for its wait
                "retried_sooner": [(round(g, 3), what) for g, what in gaps if g < told - 0.05],
                "retry_gap_s": percentiles([g for g, _ in gaps]),
            }
        if idle:
            result["idle"] = idle_requests(fleet, mounted, idle)
        return result
    finally:
        fleet.remove(mounted)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def quiesce(hub: HubEmulator, quiet: float = 1.0, timeout: float = 30.0) -> float:
    """Wait until the emulator saw no new request for `quiet` seconds (at most `timeout`): the last
    checks of a storm (a publisher's re-list) are not idle traffic. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        records = hub.requests()
        if not records or time.time() - max(r.time for r in records) >= quiet:
            break
        time.sleep(0.2)
    return time.monotonic() - started


def idle_requests(fleet: Fleet, nodes: list[Node], window: float) -> dict[str, Any]:
    """Hub requests while the nodes do nothing for `window` seconds (mounted, following the feed), once
    the emulator has been quiet for a second."""
    quiesce(fleet.hub)
    started_wall = time.time()
    time.sleep(window)
    counts = request_counts(fleet.hub, started_wall)
    total = sum(v for k, v in counts.items() if k != "429")
    return {"window_s": window, "requests": dict(counts), "per_node_per_minute": total / len(nodes) / (window / 60)}


# -- rate limits -----------------------------------------------------------------------------------
# The Hub's bucket routes (bucket info, listings, batch, resolve, tokens, the event feed) and the Xet CAS.
RATE_LIMITED = ("/api/buckets/*", "/buckets/*", "/v1/*", "/v2/*")
RETRY_LINE = re.compile(r"HTTP 429; retry \d+ in ([\d.]+)s")


def limit(hub: HubEmulator, share: float, retry_after: float, seed: int = 29) -> None:
    """Answer `share` of the requests to the Hub's bucket routes and the CAS with 429 and `Retry-After`."""
    hub.faults.seed(seed)
    for pattern in RATE_LIMITED:
        hub.faults.add(
            pattern, "status", status=429, retry_after=retry_after, rate=share, methods=("GET", "HEAD", "POST")
        )


def backoff_waits(nodes: list[Node]) -> list[float]:
    """The waits the nodes' own HTTP clients (`remote/http.py`) chose after a 429, from their logs."""
    waits = []
    for node in nodes:
        log = Path(node.status()["log_file"])
        if log.exists():
            waits += [float(m.group(1)) for m in RETRY_LINE.finditer(log.read_text(errors="replace"))]
    return waits


def retry_gaps(hub: HubEmulator, since: float, shared: list[str]) -> list[tuple[float, str]]:
    """For each 429 the emulator sent since wall time `since` to a request only one node makes (a
    module's listing by its publisher, a xorb upload: huggingface_hub's and hf_xet's requests included),
    the seconds until the same request came again, and the request. Downloads are left out: every node
    asks for the same reconstructions, and the emulator does not know which node asked; so are the
    listings of `shared` modules (two nodes publish them)."""
    records = [r for r in hub.requests() if r.time >= since]
    gaps = []
    for i, record in enumerate(records):
        uploaded = record.method == "POST" and record.path.startswith("/v1/xorb")  # a xorb grant or upload
        if record.status != 429 or not ("/tree/" in record.path or uploaded):
            continue
        if any(name in record.path for name in shared):
            continue
        again = next((r for r in records[i + 1 :] if (r.method, r.path) == (record.method, record.path)), None)
        if again is not None:
            gaps.append((again.time - record.time, f"{record.method} {record.path}"))
    return gaps


# -- churn -----------------------------------------------------------------------------------------
def churn(
    fleet: Fleet, nodes: list[Node], bucket_id: str, *, neff_size: int, grace: float, deadline: float = 120.0
) -> dict[str, Any]:
    """Node 0 finishes module A, starts module B and is SIGKILLed (compiler and daemon) while it holds B's
    lock, before A is published (the bucket's batch route answers 503 until the restart, so the kill never
    races the publisher); then remounted, and its compiler started again on
    B at once, waiting on the lock as libneuronxla does (its wait is how long the stale lock outlived the
    restart). The other nodes compile their own module and poll for all of them throughout. Figures: A
    published after the restart, the lock wait against the grace, every module seen everywhere, no
    other node's errors."""
    victim, others = nodes[0], nodes[1:]
    a, b = module_name("churnA", 0), module_name("churnB", 0)
    own = {n.name: [module_name(f"churn{i}", 0)] for i, n in enumerate(others)}
    everything = {a, b} | {m for names in own.values() for m in names}
    victim_client = NodeClient(
        victim, node_spec(victim, [a, b], [], neff_size=neff_size, deadline=deadline, hold_s={b: deadline})
    )
    clients = [
        NodeClient(
            n,
            node_spec(
                n,
                own[n.name],
                sorted(everything - set(own[n.name])),
                neff_size=neff_size,
                deadline=deadline,
                compile_s=1.0,
            ),
        )
        for n in others
    ]
    held_back = fleet.hub.faults.add(f"/api/buckets/{bucket_id}/batch", "status", status=503, methods=("POST",))
    for client in [victim_client, *clients]:
        client.go()
    victim_client.wait_for(f"begin {b}")
    victim_client.kill()  # mid-compile: B's lock held, A not yet published
    fleet.kill(victim)
    killed = time.monotonic()
    a_before = (fleet.hub.bucket_dir(bucket_id) / VERSION / a / "model.done").exists()
    fleet.start(victim)
    restarted = time.monotonic()
    fleet.hub.faults.remove(held_back)
    again = NodeClient(victim, node_spec(victim, [b], [], neff_size=neff_size, deadline=deadline))
    again.go()  # the restarted compiler finds B's lock and waits on it, as libneuronxla does
    again_result = again.result(deadline)
    results = [c.result(deadline + 30) for c in clients]
    settled = wait_published(nodes, everything, fleet.hub.bucket_dir(bucket_id), 60)
    return {
        "nodes": len(nodes),
        "grace_s": grace,
        "restart_s": restarted - killed,
        "a_published_before_kill": a_before,
        "lock_wait_after_restart_s": again_result["lock_waits"].get(b),
        "settled_s": settled,
        "bucket": bucket_end_state(fleet.hub.bucket_dir(bucket_id), everything),
        "others_saw": {n.name: sorted(r["seen"]) for n, r in zip(others, results, strict=True)},
        "expected_seen": {n.name: sorted(everything - set(own[n.name])) for n in others},
        "client_errors": [e for r in [again_result, *results] for e in r["errors"]],
        "other_node_failures": {n.name: n.failures() for n in others if n.failures()},
        "victim_publish": victim.status()["publish"],
    }


# -- cold start ------------------------------------------------------------------------------------
def sharded_model(hub: HubEmulator, work: Path, repo_id: str, size: int, shards: int = 12) -> tuple[str, list[str]]:
    """A model of `shards` safetensors files of `size` bytes in all (unique bytes) plus a config; returns
    its commit and file names."""
    files: dict[str, Any] = {"config.json": b'{"model_type": "gpt2"}'}
    data = work / "model-data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        path = data / name
        with open(path, "wb") as f:
            left = size // shards
            while left:
                chunk = os.urandom(min(left, 8 * MiB))
                f.write(chunk)
                left -= len(chunk)
        files[name] = path
    return hub.add_repo(repo_id, files), sorted(files)


def cold_start(
    fleet: Fleet,
    repo_id: str,
    commit: str,
    names: list[str],
    model_bytes: int,
    *,
    nodes: int,
    way: str,
    shim: Path | None = None,
) -> dict[str, Any]:
    """Every node loads the model at once. `way`: "plain" (`hf_hub_download` into a cache dir per node),
    "local" (a hub-cache mount per node, each its own cache dir), "shared" (mounts on one cache dir) or
    "shared-nolock" (the same with `shim` preloaded into the daemons: locks are no-ops). Figures: wall
    time until the last node is done, upstream bytes in models' worth."""
    hub = fleet.hub
    base = fleet.work / f"cold-{way}"
    mounted: list[Node] = []
    if way == "plain":
        caches = [base / f"hf-{i}" for i in range(nodes)]
        for cache in caches:
            cache.mkdir(parents=True)
    else:
        options: dict[str, Any] = {}
        if way.startswith("shared"):
            options["cache_dir"] = str(base / "shared-cache")
        env = {"LD_PRELOAD": str(shim)} if way == "shared-nolock" else None
        mounted = fleet.add("hub-cache", nodes, prefix=f"cold-{way}", env=env, **options)
        caches = [n.mountpoint for n in mounted]
    env = dict(fleet.env, HF_HUB_DISABLE_XET="1")
    hub.reset_stats()
    load = load_average()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER_SCRIPT, str(cache), repo_id, commit, json.dumps(names)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cache in caches
    ]
    errors = []
    for proc in procs:
        try:
            _out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err[-2000:])
    seconds = time.monotonic() - started
    upstream = hub.bytes_served()
    temp_left = sorted(str(p) for n in mounted for p in (n.cache_dir / "blobs-store" / "tmp").glob("*"))
    failures = {n.name: n.failures() for n in mounted if n.failures()}
    fleet.remove(mounted)
    for path in [base, *(n.mountpoint.parent for n in mounted)]:  # the caches: a model's worth per node
        shutil.rmtree(path, ignore_errors=True)
    return {
        "way": way,
        "nodes": nodes,
        "seconds": seconds,
        "upstream_bytes": upstream,
        "upstream_models": upstream / model_bytes,
        "errors": errors,
        "node_failures": failures,
        "temp_files_left": temp_left,
        "load": f"{load} -> {load_average()}",
    }
