#!/usr/bin/env python3
"""Benchmarks, side by side with their baselines, in one run, against the local Hub emulator.

    .venv/bin/python scripts/bench.py [--size-mb 1024] [--rows 1,2,3] [--json out.json]
    .venv/bin/python scripts/bench.py --rows 3n,9 --net 100,20   # simulated network: MB/s per
                                                                 # connection, ms per request
    .venv/bin/python scripts/bench.py --rows 10 --net 100,20     # Xet path: loopback, then network
    .venv/bin/python scripts/bench.py --rows ops,storm           # compile path: per-operation latency
                                                                 # and the compile storm vs a local dir
    .venv/bin/python scripts/bench.py --rows cpu --net 100,20    # CPU per cold GiB, HTTP and Xet paths:
                                                                 # loopback, then network
    .venv/bin/python scripts/bench.py --rows 11,12               # large repos: first read against repo
                                                                 # size, walks against a local cache dir
    .venv/bin/python scripts/bench.py --rows floor               # the storm and a walk through a do-nothing
                                                                 # filesystem on the same FUSE binding

Each row prints the project's figure, the baseline's and the ratio (see the README table). Sizes are
parameters; the defaults fit a 2-core machine in a few minutes. Nothing here asserts: tests do that.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def kernel_fuse_inodes() -> int | None:
    """FUSE inodes the kernel holds, all mounts (`/proc/slabinfo`, root only): libfuse's high-level API
    keeps one node (a path component and its hash-table links) per inode the kernel holds."""
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            if line.startswith("fuse_inode "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def walk_files(top: Path) -> int:
    """`os.walk` of `top` (which stats each symlink's target to tell directories apart); the files seen."""
    return sum(len(names) for _top, _dirs, names in os.walk(top))


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - start


def dd_read(path: str) -> float:
    """Seconds to read a file sequentially with 1 MiB requests."""
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, its threads and reaped children included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def child_cpu(cmd: list[str], env: dict | None = None) -> float:
    """CPU seconds (user + system) of running `cmd` to its end (getrusage of the reaped child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_file(path: Path, size: int, unique: bool = False) -> None:
    """`size` random bytes; unless `unique`, every other 16 MiB block repeats one block (quicker to make).

    Xet deduplicates repeated chunks within a file, so the Xet rows use unique bytes, like trained weights:
    with the repeating file, `hf_hub_download` with xet fetches only ~55% of it.
    """
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(len(chunk), size - written)
            f.write(chunk[:n] if written % (32 * MiB) and not unique else os.urandom(n))
            written += n


def load_seconds(repo_id: str, cache: str) -> float:
    """Seconds of `from_pretrained(repo_id)` in a fresh process with HF_HUB_CACHE=`cache` (timed inside it)."""
    load = (
        "import sys, time, transformers as t; s = time.perf_counter(); "
        "t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(time.perf_counter() - s)"
    )
    env = dict(os.environ, HF_HUB_CACHE=cache)
    out = subprocess.run([PY, "-c", load, repo_id], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


# Row `ops`: each operation a compiler does in a module directory, timed one by one in a process of its own
# (not the bench's, which hosts the emulator). argv: JSON list of directories, iterations. Prints JSON
# {op: [[ns per call in dir 0], [ns per call in dir 1], ...]}; each op runs in every directory in turn.
OPS_SCRIPT = r"""
import gc, json, os, sys, time
dirs, n = json.loads(sys.argv[1]), int(sys.argv[2])
clock, data, new, excl = time.perf_counter_ns, b"w" * 4096, os.O_CREAT | os.O_WRONLY, os.O_EXCL

def create(d, i):
    path = f"{d}/model.{i}.hlo_module.pb"
    t = clock(); os.close(os.open(path, new, 0o644)); return clock() - t

def excl_create(d, i):
    path = f"{d}/model.{i}.hlo_module.pb.lock"
    t = clock(); os.close(os.open(path, new | excl, 0o644)); return clock() - t

def write_close(d, i):
    path = f"{d}/model.{i}.hlo_module.pb"
    t = clock(); fd = os.open(path, os.O_WRONLY); os.write(fd, data); os.close(fd); return clock() - t

def stat(d, i):
    path = f"{d}/model.{i}.hlo_module.pb"
    t = clock(); os.stat(path); return clock() - t

def unlink(d, i):
    path = f"{d}/model.{i}.hlo_module.pb.lock"
    t = clock(); os.unlink(path); return clock() - t

def exists_miss(d, i):
    path = f"{d}/model.{i}.done"
    t = clock(); os.path.exists(path); return clock() - t

gc.disable()
out = {}
for op in (create, excl_create, write_close, stat, unlink, exists_miss):
    out[op.__name__] = [[op(d, i) for i in range(n)] for d in dirs]
for d in dirs:
    for i in range(n):
        os.unlink(f"{d}/model.{i}.hlo_module.pb")
print(json.dumps(out))
"""

# Row `storm`, one compiler: what libneuronxla does per module (argv: root, version dir, compiler index,
# modules, neff bytes, hlo bytes). Prints "ready", waits for one byte on stdin, then prints JSON
# {"end": monotonic seconds, "errors": [...]}.
COMPILER_SCRIPT = r"""
import fcntl, json, os, sys, time
root, version = sys.argv[1], sys.argv[2]
c, modules, neff_size, hlo_size = (int(a) for a in sys.argv[3:7])
hlo, neff, flags = os.urandom(hlo_size), os.urandom(neff_size), b'["--target=trn1", "--model-type=transformer"]'
errors = []
print("ready", flush=True)
os.read(0, 1)
for m in range(modules):
    module = os.path.join(root, version, f"MODULE_{c:04d}{m:04d}+0badcafe")
    try:
        with open(os.path.join(root, "lock"), "w") as lock:  # on every cache operation
            fcntl.flock(lock, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_UN)
        os.makedirs(module, exist_ok=True)
        claim = os.path.join(module, "model.hlo_module.pb.lock")
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        for name, data in (("model.hlo_module.pb", hlo), ("compile_flags.json", flags), ("model.neff", neff),
                           ("model.done", b"")):
            with open(os.path.join(module, name), "wb") as f:
                f.write(data)
        os.unlink(claim)
    except OSError as exc:
        errors.append(f"compiler {c} (uid {os.getuid()}) module {m}: {exc!r}")
print(json.dumps({"end": time.monotonic(), "errors": errors}), flush=True)
"""

# Row `storm`, one reader: lookups as libneuronxla does them (exists(model.done), then exists(model.log)),
# half on modules the compilers make, half on names nobody makes, and a read of every neff found done,
# until stdin closes (argv: root, version dir, compilers, modules, neff bytes, seed). Sleeps 1 ms per lookup.
READER_SCRIPT = r"""
import json, os, random, select, sys, time
root, version = sys.argv[1], sys.argv[2]
compilers, modules, neff_size, seed = (int(a) for a in sys.argv[3:7])
rng, errors, lookups, reads = random.Random(seed), [], 0, 0
print("ready", flush=True)
os.read(0, 1)
while not select.select([0], [], [], 0)[0]:
    if rng.random() < 0.5:
        name = f"MODULE_{rng.randrange(compilers):04d}{rng.randrange(modules):04d}+0badcafe"
    else:
        name = f"MODULE_{rng.randrange(10**8):08d}+deadbeef"
    module = os.path.join(root, version, name)
    lookups += 1
    try:
        if os.path.exists(os.path.join(module, "model.done")):
            with open(os.path.join(module, "model.neff"), "rb") as f:
                size = len(f.read())
            reads += 1
            if size != neff_size:
                errors.append(f"reader {seed}: {name}/model.neff has {size} bytes, not {neff_size}")
        elif os.path.exists(os.path.join(module, "model.log")):
            errors.append(f"reader {seed}: {name}/model.log exists")
    except OSError as exc:
        errors.append(f"reader {seed}: {name}: {exc!r}")
    time.sleep(0.001)
print(json.dumps({"lookups": lookups, "reads": reads, "errors": errors}), flush=True)
"""

STORM_VERSION = "neuronxcc-2.21.18209.0+043b1bf7"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="hffs-bench-", dir=args.work_dir))
        self.rows: list[dict] = []
        os.environ["HFFS_RUNTIME_DIR"] = str(self.work / "run")
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HOME"] = str(self.work / "hf_home")
        from hffs_neuron.testing.hub_emulator import HubEmulator

        self.hub = HubEmulator(self.work / "hub").start()
        os.environ["HF_ENDPOINT"] = self.hub.url
        self.mounts: list = []

    def close(self) -> None:
        for handle in self.mounts:
            try:
                handle.unmount()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                print(f"bench: unmount {handle.mountpoint}: {exc}", file=sys.stderr)
        self.hub.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def mount(self, view: str, name: str, source: str = "", env: dict | None = None, **options):
        import hffs_neuron

        mountpoint = self.work / name
        mountpoint.mkdir()
        options.setdefault("cache_dir", str(self.work / f"cache-{name}"))
        handle = hffs_neuron.mount(view, mountpoint, source, env=dict(env or os.environ), **options)
        self.mounts.append(handle)
        return handle

    def unmount(self, handle) -> None:
        handle.unmount()
        self.mounts.remove(handle)

    def report(self, row: str, measure: str, ours: float, base: float, unit: str, ratio: float, target: str):
        entry = dict(row=row, measure=measure, ours=ours, baseline=base, unit=unit, ratio=ratio, target=target)
        self.rows.append(entry)
        print(
            f"{row:>3} {measure:<58} ours {ours:10.3f} {unit:<6} base {base:10.3f} {unit:<6} "
            f"ratio {ratio:6.2f}  ({target})",
            flush=True,
        )

    # -- data ----------------------------------------------------------------------------------
    def big_repo(self, repo_id: str, size: int, unique: bool = False) -> tuple[str, str]:
        src = self.work / f"src-{repo_id.replace('/', '_')}.bin"
        make_file(src, size, unique)
        commit = self.hub.add_repo(repo_id, {"model.safetensors": src})
        return commit, "model.safetensors"

    def snapshot_file(self, mountpoint: Path, repo_id: str, name: str) -> str:
        folder = mountpoint / ("models--" + repo_id.replace("/", "--"))
        commit = (folder / "refs" / "main").read_text()
        return str(folder / "snapshots" / commit / name)

    # -- rows ----------------------------------------------------------------------------------
    def rows_1_2_3(self) -> None:
        size = self.args.size_mb * MiB
        self.big_repo("bench/big", size)
        # Row 3 baseline first: hf_hub_download into an empty plain cache, same emulator.
        plain = self.work / "plain-cache"
        env = dict(os.environ, HF_HUB_CACHE=str(plain))
        script = "from huggingface_hub import hf_hub_download as d; d('bench/big', 'model.safetensors')"
        drop_caches()
        base3 = timed([PY, "-c", script], env=env) - self.python_startup(env)
        handle = self.mount("hub-cache", "hub123")
        path = self.snapshot_file(Path(handle.mountpoint), "bench/big", "model.safetensors")
        drop_caches()
        cold = dd_read(path)  # first open: materializes through the store
        self.report(
            "3", f"cold read {self.args.size_mb} MiB LFS via hub-cache (s)", cold, base3, "s", cold / base3, "<= 0.8"
        )
        blob = next(Path(handle.mountpoint).parent.glob("cache-hub123/blobs-store/blobs/*/*"))
        dd_read(path)
        dd_read(str(blob))
        warm, base1 = dd_read(path), dd_read(str(blob))
        self.report(
            "1",
            f"warm read {self.args.size_mb} MiB, second open (GB/s)",
            size / warm / 1e9,
            size / base1 / 1e9,
            "GB/s",
            base1 / warm,
            ">= 0.9",
        )
        self.unmount(handle)
        handle = self.mount("hub-cache", "hub2", cache_dir=str(self.work / "cache-hub123"))
        path = self.snapshot_file(Path(handle.mountpoint), "bench/big", "model.safetensors")
        dropped = drop_caches()
        first = dd_read(path)
        drop_caches()
        base2 = dd_read(str(blob))
        note = "" if dropped else " [page cache not droppable here]"
        self.report(
            "2",
            f"first read after remount, materialized (GB/s){note}",
            size / first / 1e9,
            size / base2 / 1e9,
            "GB/s",
            base2 / first,
            ">= 0.7",
        )
        self.unmount(handle)

    def network(self) -> str | None:
        """Apply `--net MBPS,MS` to the emulator; returns a label, or None when not asked for.

        Raises SystemExit with a clear message when the emulator has no network simulation.
        """
        if not self.args.net:
            return None
        if not hasattr(self.hub, "set_network"):
            raise SystemExit(
                "bench: --net needs the emulator's network simulation (HubEmulator.set_network(conn_mbps=...,"
                " latency_ms=...)), which this checkout's emulator does not have"
            )
        mbps, ms = (float(x) for x in self.args.net.split(","))
        self.hub.set_network(conn_mbps=mbps, latency_ms=ms)
        return f"{mbps:g} MB/s per connection, {ms:g} ms per request"

    def row_3n(self) -> None:
        """Row 3 under the simulated network: many connections against hf_hub_download's one."""
        label = self.network()
        if label is None:
            print("  3n skipped: needs --net MBPS,MS")
            return
        size = self.args.net_size_mb * MiB
        self.big_repo("bench/big-net", size)
        handle = self.mount("hub-cache", "hub3n")
        path = self.snapshot_file(Path(handle.mountpoint), "bench/big-net", "model.safetensors")
        cold = dd_read(path)
        env = dict(os.environ, HF_HUB_CACHE=str(self.work / "plain-cache-3n"))
        script = "from huggingface_hub import hf_hub_download as d; d('bench/big-net', 'model.safetensors')"
        base = timed([PY, "-c", script], env=env) - self.python_startup(env)
        measure = f"cold read {self.args.net_size_mb} MiB LFS, {label} (s)"
        self.report("3n", measure, cold, base, "s", cold / base, "<= 0.3")
        self.unmount(handle)
        self.hub.set_network(conn_mbps=None, latency_ms=0)

    def row_9(self) -> None:
        """from_pretrained of a >= 500 MB checkpoint in >= 10 shards, mount vs plain HF_HUB_CACHE."""
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("  9 skipped: torch/transformers not installed (HFFS_SKIP_ML=1?)")
            return
        model_dir = self.work / "gpt2-shards"
        build = f"""
import torch, transformers
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=1024, n_layer=8, n_head=16)
transformers.GPT2LMHeadModel(cfg).save_pretrained({str(model_dir)!r}, max_shard_size="50MB")
"""
        subprocess.run([PY, "-c", build], check=True)
        files = {p.name: p for p in model_dir.iterdir()}
        total = sum(p.stat().st_size for p in files.values())
        shards = sum(1 for name in files if name.endswith(".safetensors"))
        self.hub.add_repo("bench/gpt2-shards", files)
        label = self.network() or "loopback"

        def run(cache: str) -> float:
            return load_seconds("bench/gpt2-shards", cache)

        ours_cold = base_cold = ours_warm = base_warm = float("inf")
        upstream = 0.0
        for attempt in range(self.args.repeat):
            handle = self.mount("hub-cache", f"hub9-{attempt}")
            plain = str(self.work / f"plain-cache-9-{attempt}")
            self.hub.reset_stats()
            ours_cold = min(ours_cold, run(handle.mountpoint))
            upstream = max(upstream, self.hub.bytes_served("bench/gpt2-shards") / total)
            base_cold = min(base_cold, run(plain))
            ours_warm, base_warm = min(ours_warm, run(handle.mountpoint)), min(base_warm, run(plain))
            self.unmount(handle)
        if label != "loopback":
            self.hub.set_network(conn_mbps=None, latency_ms=0)
        what = f"from_pretrained {total / 1e6:.0f} MB in {shards} shards, {label}"
        self.report("9", f"{what}, cold (s)", ours_cold, base_cold, "s", ours_cold / base_cold, "<= 0.8")
        self.report("9", f"{what}, warm (s)", ours_warm, base_warm, "s", ours_warm / base_warm, "<= 1.05")
        self.report("9", f"{what}, cold: upstream bytes / size", upstream, 1.0, "x", upstream, "= 1.00")

    def row_10(self) -> None:
        """Cold read of one LFS file: the mount's Xet path and its HTTP path against hf_hub_download with
        hf_xet on (its default), on loopback and, with --net, under the simulated network.

        Each of the three is measured `--repeat` times (3 gives each the first place once), interleaved,
        each time into an empty cache; the best of each is reported: on 2 cores one run varies by 30%."""
        size = self.args.size_mb * MiB
        self.big_repo("bench/xet", size, unique=True)
        self.hub.prepare_xet()  # conversion to Xet is never timed
        xet_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
        script = "from huggingface_hub import hf_hub_download as d; d('bench/xet', 'model.safetensors')"
        startup = self.python_startup(xet_env)
        for label in ("loopback", "net"):
            if label == "net" and (label := self.network()) is None:
                break
            runs: dict[str, list[float]] = {"auto": [], "off": [], "download": [], "download+dd": []}
            peaks: dict[str, list[float]] = {"auto": [], "off": []}
            ways = ["auto", "off", "download"]
            for attempt in range(self.args.repeat):
                # Each attempt starts with another way, so no way always runs right after the same other
                # one; on 2 cores a single run of any of them varies by 30% or more.
                for way in ways[attempt % 3 :] + ways[: attempt % 3]:
                    if way == "download":
                        drop_caches()
                        plain = self.work / f"plain-cache-10-{len(self.rows)}-{attempt}"
                        seconds = timed([PY, "-c", script], env=dict(xet_env, HF_HUB_CACHE=str(plain))) - startup
                        runs["download"].append(seconds)
                        # What a hf_hub_download user pays to have the bytes once: the download, then a read.
                        (downloaded,) = plain.glob("models--bench--xet/snapshots/*/model.safetensors")
                        runs["download+dd"].append(seconds + dd_read(str(downloaded)))
                        shutil.rmtree(plain)
                        continue
                    handle = self.mount("hub-cache", f"hub10-{way}-{len(self.rows)}-{attempt}", env=xet_env, xet=way)
                    path = self.snapshot_file(Path(handle.mountpoint), "bench/xet", "model.safetensors")
                    drop_caches()
                    runs[way].append(dd_read(path))
                    peaks[way].append(self.daemon_memory(handle.pid)[1])
                    self.unmount(handle)
            auto, off, base, base_read = (min(runs[k]) for k in ("auto", "off", "download", "download+dd"))
            spread = " ".join(f"{k} {'/'.join(f'{t:.2f}' for t in v)}" for k, v in runs.items())
            memory = " ".join(f"{k} {'/'.join(f'{m:.0f}' for m in v)}" for k, v in peaks.items())
            print(f"    row 10 {label}, every run (s): {spread}; daemon peak RSS (MB): {memory}", flush=True)
            load = f"load {os.getloadavg()[0]:.1f}"
            what = f"cold read {self.args.size_mb} MiB LFS, {label}, vs hf_hub_download with xet ({load})"
            self.report("10", f"{what}: mount --xet auto (s)", auto, base, "s", auto / base, "<= 1.0")
            self.report("10", f"{what}: mount --xet off (s)", off, base, "s", off / base, "<= 1.5")
            what = f"cold read {self.args.size_mb} MiB LFS, {label}, vs hf_hub_download with xet + one dd of the file"
            self.report("10", f"{what}: mount --xet auto (s)", auto, base_read, "s", auto / base_read, "(context)")
        if self.args.net:
            self.hub.set_network(conn_mbps=None, latency_ms=0)

    def row_cpu(self) -> None:
        """CPU seconds per cold GiB: the daemon (/proc/<pid>/stat, threads and reaped children included) plus
        the reader's one pass over the file (`dd`, getrusage), against `hf_hub_download`'s whole process plus
        one `dd` of the downloaded file; the HTTP path (`--xet off` vs HF_HUB_DISABLE_XET=1) and the Xet path
        (`--xet auto` vs hf_xet on). Loopback, then with --net under the simulated network. The emulator's
        own CPU (this process) is in neither figure. Best of --repeat, every run printed."""
        size = self.args.size_mb * MiB
        self.big_repo("bench/cpu", size, unique=True)
        self.hub.prepare_xet()  # conversion to Xet is never measured
        xet_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
        http_env = dict(os.environ, HF_HUB_DISABLE_XET="1")
        script = "from huggingface_hub import hf_hub_download as d; d('bench/cpu', 'model.safetensors')"
        gib = size / (1024 * MiB)
        for label in ("loopback", "net"):
            if label == "net" and (label := self.network()) is None:
                break
            for path, way, env in (("HTTP", "off", http_env), ("Xet", "auto", xet_env)):
                ours, base, startup = [], [], child_cpu([PY, "-c", "import huggingface_hub"], env)
                for attempt in range(self.args.repeat):
                    name = f"hubcpu-{way}-{len(self.rows)}-{attempt}"
                    handle = self.mount("hub-cache", name, env=env, xet=way)
                    file = self.snapshot_file(Path(handle.mountpoint), "bench/cpu", "model.safetensors")
                    before = process_cpu(handle.pid)
                    reader = child_cpu(["dd", f"if={file}", "of=/dev/null", "bs=1M"])
                    ours.append((process_cpu(handle.pid) - before + reader) / gib)
                    self.unmount(handle)
                    shutil.rmtree(self.work / f"cache-{name}")
                    plain = self.work / f"plain-cache-cpu-{len(self.rows)}-{attempt}"
                    download = child_cpu([PY, "-c", script], dict(env, HF_HUB_CACHE=str(plain)))
                    (downloaded,) = plain.glob("models--bench--cpu/snapshots/*/model.safetensors")
                    base.append((download + child_cpu(["dd", f"if={downloaded}", "of=/dev/null", "bs=1M"])) / gib)
                    shutil.rmtree(plain)
                every = f"ours {'/'.join(f'{c:.2f}' for c in ours)}, base {'/'.join(f'{c:.2f}' for c in base)}"
                print(f"    row cpu {label} {path}, every run (CPU s/GiB): {every}", flush=True)
                what = (
                    f"CPU per cold GiB, {path} path, {label}: daemon + reader vs hf_hub_download process + dd "
                    f"(s; its import alone {startup:.2f} s; load {os.getloadavg()[0]:.1f})"
                )
                self.report("cpu", what, min(ours), min(base), "s", min(ours) / min(base), "<= 1.0")
                if (label, path) == ("loopback", "Xet"):
                    self.report_verification(size, min(base))
        if self.args.net:
            self.hub.set_network(conn_mbps=None, latency_ms=0)

    def report_verification(self, size: int, xet_baseline: float) -> None:
        """What verification alone costs per GiB on this machine (hashlib's sha256, as the blob store hashes
        LFS files, over bytes already in memory), beside the Xet baseline, which verifies nothing."""
        piece = os.urandom(64 * MiB)
        start = time.process_time()
        hasher = hashlib.sha256()
        for _ in range(size // len(piece)):
            hasher.update(piece)
        per_gib = (time.process_time() - start) / (size // len(piece) * len(piece) / (1024 * MiB))
        what = "verification alone: sha256 of one GiB in memory vs that Xet baseline (s)"
        self.report("cpu", what, per_gib, xet_baseline, "s", per_gib / xet_baseline, "share of the baseline")

    def python_startup(self, env: dict) -> float:
        return min(timed([PY, "-c", "import huggingface_hub"], env=env) for _ in range(2))

    def row_4(self) -> None:
        size = max(64, self.args.size_mb // 2) * MiB
        self.big_repo("bench/shared", size)
        single = self.mount("hub-cache", "hub4a")
        path = self.snapshot_file(Path(single.mountpoint), "bench/shared", "model.safetensors")
        drop_caches()
        t1 = dd_read(path)
        self.unmount(single)
        self.hub.reset_stats()
        multi = self.mount("hub-cache", "hub4b")
        path = self.snapshot_file(Path(multi.mountpoint), "bench/shared", "model.safetensors")
        drop_caches()
        start = time.perf_counter()
        procs = [
            subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL) for _ in range(8)
        ]
        for p in procs:
            p.wait()
        t8 = time.perf_counter() - start
        upstream = self.hub.bytes_served("model.safetensors") / size
        self.report(
            "4",
            f"8 procs cold-read one {size // MiB} MiB blob: upstream bytes / size",
            upstream,
            1.0,
            "x",
            upstream,
            "= 1.00",
        )
        self.report("4", "8 procs cold-read: wall time vs 1 reader (s)", t8, t1, "s", t8 / t1, "<= 1.3")
        self.unmount(multi)

    def rows_5_6(self) -> None:
        n = self.args.files
        bucket = self.hub.add_bucket("bench/neff")
        version = bucket / "neuronxcc-2.21.18209.0+043b1bf7"
        local = self.work / "local-neff" / version.name
        for i in range(n):
            for base in (version, local):
                module = base / f"MODULE_{i:020d}+0badcafe"
                module.mkdir(parents=True)
                (module / "model.neff").write_bytes(b"n")
        self.hub.page_size = 1000
        handle = self.mount("neff", "neff56", "bench/neff")
        mounted = Path(handle.mountpoint) / version.name
        self.hub.reset_stats()
        start = time.perf_counter()
        os.listdir(mounted)
        cold = time.perf_counter() - start
        requests = len(self.hub.requests("/tree"))
        self.report(
            "6", f"ls of {n}-module dir, cold: listing requests", requests, 11, "req", requests / 11, "<= 11 requests"
        )
        ours = min(self._time(lambda: os.listdir(mounted)) for _ in range(5))
        base = min(self._time(lambda: os.listdir(local)) for _ in range(5))
        self.report(
            "6",
            f"ls of {n}-module dir, warm (ms); cold took {cold * 1000:.0f} ms",
            ours * 1e3,
            base * 1e3,
            "ms",
            ours / base,
            "<= 3x",
        )
        names = os.listdir(mounted)
        for name in names:  # warm the kernel and metadata caches
            os.stat(mounted / name)
        ours = min(self._time(lambda: [os.stat(mounted / nm) for nm in names]) for _ in range(3))
        base = min(self._time(lambda: [os.stat(local / nm) for nm in names]) for _ in range(3))
        self.report("5", f"stat of {n} entries, warm (ms)", ours * 1e3, base * 1e3, "ms", ours / base, "<= 3x")
        self.unmount(handle)

    @staticmethod
    def _time(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def row_7(self) -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("  7 skipped: torch/transformers not installed (HFFS_SKIP_ML=1?)")
            return
        model_dir = self.work / "tiny-llama"
        subprocess.run(
            [
                PY,
                "-c",
                f"""
import torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=8000)
transformers.LlamaForCausalLM(cfg).save_pretrained({str(model_dir)!r}, max_shard_size="8MB")
""",
            ],
            check=True,
        )
        files = {p.name: p for p in model_dir.iterdir()}
        self.hub.add_repo("bench/tiny-llama", files)

        def run(cache: str) -> float:
            return load_seconds("bench/tiny-llama", cache)

        # Best of 3, each cold run on a fresh mount and a fresh plain cache: one load is ~3 s of which
        # most is model construction, so single runs are noise-dominated.
        ours_cold = base_cold = ours_warm = base_warm = float("inf")
        for attempt in range(3):
            handle = self.mount("hub-cache", f"hub7-{attempt}")
            plain = str(self.work / f"plain-cache-7-{attempt}")
            ours_cold, base_cold = min(ours_cold, run(handle.mountpoint)), min(base_cold, run(plain))
            ours_warm, base_warm = min(ours_warm, run(handle.mountpoint)), min(base_warm, run(plain))
            self.unmount(handle)
        self.report(
            "7", "from_pretrained sharded, cold (s)", ours_cold, base_cold, "s", ours_cold / base_cold, "<= 1.0"
        )
        self.report(
            "7", "from_pretrained sharded, warm (s)", ours_warm, base_warm, "s", ours_warm / base_warm, "<= 1.1"
        )

    def row_ops(self) -> None:
        """Per-operation latency in a module directory of the NEFF view vs a local directory, one process."""
        self.hub.add_bucket("bench/ops")
        handle = self.mount("neff", "neffops", "bench/ops")
        module = "neuronxcc-2.21.0.0+abc/MODULE_x+y"
        ours, local = Path(handle.mountpoint) / module, self.work / "local-ops" / module
        for d in (ours, local):
            os.makedirs(d)
        n = self.args.ops_n
        out = subprocess.run(
            [PY, "-c", OPS_SCRIPT, json.dumps([str(ours), str(local)]), str(n)],
            check=True,
            capture_output=True,
            text=True,
        )
        times = json.loads(out.stdout)
        load = f"load {os.getloadavg()[0]:.1f}"
        for op, (mine, theirs) in times.items():
            mine, theirs = sorted(mine), sorted(theirs)
            med, base = mine[n // 2] / 1e3, theirs[n // 2] / 1e3
            p90 = f"p90 {mine[n * 9 // 10] / 1e3:.0f}/{theirs[n * 9 // 10] / 1e3:.0f} us"
            self.report("ops", f"{op}, median of {n} (us); {p90}, {load}", med, base, "us", med / base, "context")
        self.unmount(handle)

    def row_storm(self) -> None:
        """The compile storm through the NEFF view's root vs a local directory; then, where a second user can be
        made, again on an `allow_other` mount with half the compilers run as that user."""
        c, m, r = self.args.storm_compilers, self.args.storm_modules, self.args.storm_readers
        what = f"compile storm {c} compilers x {m} modules + {r} readers"
        self.hub.add_bucket("bench/storm")
        handle = self.mount("neff", "neffstorm", "bench/storm")
        ours, errors = self.storm(Path(handle.mountpoint), "ours")
        self.unmount(handle)
        local = self.work / "local-storm"
        local.mkdir()
        base, base_errors = self.storm(local, "local")
        load = f"load {os.getloadavg()[0]:.1f}"
        self.report("storm", f"{what}, {len(errors)}/{len(base_errors)} errors (s), {load}", ours, base, "s",
                    ours / base, "<= 2x, 0 errors")  # fmt: skip
        if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
            print("  storm with a second user skipped: needs root, useradd and setpriv")
            return
        name = f"hffs-bench-{secrets.token_hex(4)}"
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        try:
            ids = [
                int(subprocess.run(["id", flag, name], capture_output=True, check=True).stdout)
                for flag in "-u -g".split()
            ]
            self.work.chmod(0o755)  # the other user reaches the mountpoint and the local directory
            handle = self.mount("neff", "neffstorm2", "bench/storm", allow_other=True)
            ours, errors = self.storm(Path(handle.mountpoint), "ours, 2 users", other=(ids[0], ids[1]))
            self.unmount(handle)
            # The local directory laid out as the mount presents it: shared like /tmp (sticky, writable by all).
            local = self.work / "local-storm2"
            (local / STORM_VERSION).mkdir(parents=True)
            (local / "lock").touch()
            for path, mode in ((local, 0o1777), (local / STORM_VERSION, 0o1777), (local / "lock", 0o666)):
                path.chmod(mode)
            base, base_errors = self.storm(local, "local, 2 users", other=(ids[0], ids[1]))
        finally:
            subprocess.run(["userdel", name], check=False)
        load = f"load {os.getloadavg()[0]:.1f}"
        self.report("storm", f"{what}, allow_other, 2 users, {len(errors)}/{len(base_errors)} errors (s), {load}",
                    ours, base, "s", ours / base, "<= 2x, 0 errors")  # fmt: skip

    def storm(self, root: Path, label: str, other: tuple[int, int] | None = None) -> tuple[float, list[str]]:
        """Seconds from the start signal until the last compiler is done, and every error (printed)."""
        c, m, r = self.args.storm_compilers, self.args.storm_modules, self.args.storm_readers
        neff = self.args.storm_neff_kb * 1024
        as_other = ["setpriv", f"--reuid={other[0]}", f"--regid={other[1]}", "--clear-groups"] if other else []

        def start(argv: list[str]) -> subprocess.Popen:
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        compilers = [
            start(
                [
                    *(as_other if i % 2 else []),
                    PY,
                    "-c",
                    COMPILER_SCRIPT,
                    str(root),
                    STORM_VERSION,
                    str(i),
                    str(m),
                    str(neff),
                    str(64 * 1024),
                ]
            )  # fmt: skip
            for i in range(c)
        ]
        readers = [
            start([PY, "-c", READER_SCRIPT, str(root), STORM_VERSION, str(c), str(m), str(neff), str(i)])
            for i in range(r)
        ]
        for p in compilers + readers:
            p.stdout.readline()  # "ready"
        self.hub.reset_stats()
        go = time.monotonic()
        for p in compilers + readers:
            p.stdin.write(b"g")
            p.stdin.flush()
        results = [self._storm_result(p) for p in compilers]
        end = max((res.get("end", go) for res in results), default=go)
        results += [self._storm_result(p) for p in readers]
        errors = [e for res in results for e in res.get("errors", [])]
        lookups, reads = sum(res.get("lookups", 0) for res in results), sum(res.get("reads", 0) for res in results)
        upstream = len(self.hub.requests())
        print(f"    storm {label}: {end - go:.2f} s, readers {lookups} lookups, {reads} neff reads, "
              f"{upstream} upstream requests, {len(errors)} errors", flush=True)  # fmt: skip
        for error in errors[:20]:
            print(f"      {error}", flush=True)
        return end - go, errors

    @staticmethod
    def _storm_result(p: subprocess.Popen) -> dict:
        """Close the process's stdin (a reader's stop signal) and parse its last line."""
        p.stdin.close()
        out = p.stdout.read().decode(errors="replace")
        p.wait()
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"errors": [f"exit {p.returncode}: {out.strip()[-2000:]}"]}

    # -- the floor of the stack ----------------------------------------------------------------------
    @contextlib.contextmanager
    def passthrough(self, source: Path, binary: str | None) -> Iterator[Path]:
        """`source` served by a do-nothing FUSE filesystem: scripts/passthrough_fs.py on the project's binding,
        or `binary`, libfuse's C example `passthrough` (it mirrors /); yields where `source` shows in it."""
        mountpoint = Path(tempfile.mkdtemp(prefix="floor-", dir=self.work))
        if binary:
            argv, inside = [binary, "-f", "-o", "default_permissions", str(mountpoint)], Path(f"{mountpoint}{source}")
        else:
            script = Path(__file__).with_name("passthrough_fs.py")
            argv, inside = [PY, str(script), str(source), str(mountpoint)], mountpoint
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.ismount(mountpoint):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not mount {mountpoint} (exit {server.poll()})")
                time.sleep(0.05)
            yield inside
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, stderr=subprocess.DEVNULL)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def row_floor(self) -> None:
        """The compile storm and a snapshot walk through a do-nothing filesystem on the same FUSE binding (and,
        with --c-passthrough, libfuse's C example), beside the mount and a local directory in one run: what
        any filesystem on this stack pays, so what the view itself adds is the difference."""
        servers: list[tuple[str, str | None]] = [("do-nothing mfusepy passthrough", None)]
        if self.args.c_passthrough:
            servers.append(("libfuse's C example passthrough", self.args.c_passthrough))

        def load() -> str:
            return f"load {os.getloadavg()[0]:.1f}"

        local = self.work / "floor-storm-local"
        local.mkdir()
        base, _ = self.storm(local, "local")
        for i, (label, binary) in enumerate(servers):
            source = self.work / f"floor-storm-{i}"
            source.mkdir()
            with self.passthrough(source, binary) as root:
                took, errors = self.storm(root, label)
            self.report("floor", f"storm, {label}, {len(errors)} errors (s), {load()}", took, base, "s",
                        took / base, "the stack's floor")  # fmt: skip
        self.hub.add_bucket("bench/floor")
        handle = self.mount("neff", "floorstorm", "bench/floor")
        took, errors = self.storm(Path(handle.mountpoint), "ours")
        self.unmount(handle)
        self.report("floor", f"storm, the NEFF mount, {len(errors)} errors (s), {load()}", took, base, "s",
                    took / base, "<= 2x")  # fmt: skip

        files, commit = self.rows_dataset("bench/floorwalk", self.args.floor_walk_files)
        folder = "datasets--bench--floorwalk"
        snapshot = self.local_hub_tree("floor-walk", folder, files, commit)
        per = 1e6 / len(files)
        some_path, some_data = next(iter(files.items()))

        def cold_and_warm(top: Path) -> tuple[float, float]:
            cold = self._time(lambda: walk_files(top))
            warm = min(self._time(lambda: walk_files(top)) for _ in range(3))
            if (top / some_path).read_text() != some_data:  # os.walk would hide a filesystem that fails stats
                raise RuntimeError(f"{top / some_path} does not read back through the filesystem walked")
            return cold * per, warm * per

        drop_caches()
        local_cold, local_warm = cold_and_warm(snapshot)
        walked: list[tuple[str, tuple[float, float]]] = []
        for label, binary in servers:
            with self.passthrough(self.work / "floor-walk", binary) as root:
                walked.append((label, cold_and_warm(root / folder / "snapshots" / commit)))
        handle = self.mount("hub-cache", "floorwalk")
        walked.append(("the hub-cache mount", cold_and_warm(Path(handle.mountpoint) / folder / "snapshots" / commit)))
        self.unmount(handle)
        for label, (cold, warm) in walked:
            what = f"walk of {len(files)} files, {label}, cold / warm (us/entry), {load()}"
            self.report("floor", what.replace("cold / warm", "cold"), cold, local_cold, "us", cold / local_cold,
                        "<= 3x" if label.startswith("the") else "the stack's floor")  # fmt: skip
            self.report("floor", what.replace("cold / warm", "warm"), warm, local_warm, "us", warm / local_warm,
                        "<= 1.5x" if label.startswith("the") else "the stack's floor")  # fmt: skip

    # -- large repos (issue 31) -------------------------------------------------------------------
    def rows_dataset(self, repo_id: str, count: int) -> tuple[dict[str, str], str]:
        """A dataset of `count` small JSON rows, 1,000 to a directory (as `datasets` lays them out)."""
        files = {f"data/part-{i // 1000:03d}/row-{i:06d}.json": json.dumps({"row": i}) for i in range(count)}
        files["README.md"] = "# rows\n"
        return files, self.hub.add_repo(repo_id, files, repo_type="dataset")

    def local_hub_tree(self, name: str, folder: str, files: dict[str, str], commit: str) -> Path:
        """`files` laid out as a local hub cache under work/`name`/`folder` (relative symlinks from the
        snapshot into blobs/), the baseline of walks; returns the snapshot directory."""
        local = self.work / name / folder
        snapshot = local / "snapshots" / commit
        for i, (path, data) in enumerate(sorted(files.items())):
            blob = local / "blobs" / f"{i:040x}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_text(data)
            link = snapshot / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return snapshot

    @staticmethod
    def daemon_memory(pid: int) -> tuple[float, float]:
        """(VmRSS, VmHWM) of a daemon, in MB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1e3, int(fields["VmHWM"].split()[0]) / 1e3

    def row_11(self) -> None:
        """First read of one file against the repo's size: a 50-file dataset is the baseline."""
        from huggingface_hub import HfApi

        sizes = [int(n) for n in self.args.large_files.split(",")]
        handle = self.mount("hub-cache", "hub11")
        root = Path(handle.mountpoint)

        def first_read(count: int) -> tuple[float, int]:
            """Best of 3 first reads, each in a directory not listed yet (the machine's noise is large);
            and the metadata requests of the first."""
            repo_id = f"bench/rows{count}"
            files, commit = self.rows_dataset(repo_id, count)
            folder = root / ("datasets--" + repo_id.replace("/", "--"))
            (folder / "refs" / "main").read_text()  # the repo resolved: not part of the first read
            # The emulator indexes a commit's tree on its first listing (the Hub has it indexed): untimed.
            HfApi(endpoint=self.hub.url).get_paths_info(repo_id, ["README.md"], repo_type="dataset")
            names = sorted(files)
            times, requests = [], []
            for trial in range(3):
                name = names[min(count - 1, (trial + 1) * count // 4)]
                self.hub.reset_stats()
                start = time.perf_counter()
                (folder / "snapshots" / commit / name).read_bytes()
                times.append(time.perf_counter() - start)
                requests.append(len(self.hub.requests("/api/")))
            return min(times), requests[0]

        base, base_requests = first_read(50)
        for count in sizes:
            ours, requests = first_read(count)
            self.report(
                "11",
                f"first read, {count}-file dataset (ms; {requests} vs {base_requests} metadata requests)",
                ours * 1e3,
                base * 1e3,
                "ms",
                ours / base,
                "~1x a 50-file repo",
            )
        rss, peak = self.daemon_memory(handle.pid)
        self.report(
            "11", f"daemon RSS after those first reads (MB; peak {peak:.0f})", rss, 300, "MB", rss / 300, "bounded"
        )
        self.unmount(handle)

    def row_12(self) -> None:
        """`os.walk` of a dataset's snapshot (stat through each symlink, as loaders do), cold then warm,
        against the same tree as a local hub cache (relative symlinks into blobs/)."""
        count = self.args.walk_files
        files, commit = self.rows_dataset("bench/walk", count)
        snapshot = self.local_hub_tree("walk-local", "datasets--bench--walk", files, commit)
        inodes_before = kernel_fuse_inodes()
        handle = self.mount("hub-cache", "hub12")
        mounted = Path(handle.mountpoint) / "datasets--bench--walk" / "snapshots" / commit
        self.hub.reset_stats()
        cold = self._time(lambda: walk_files(mounted))
        requests = len(self.hub.requests("/tree/"))
        warm = min(self._time(lambda: walk_files(mounted)) for _ in range(3))
        warm_requests = len(self.hub.requests("/tree/")) - requests
        inodes_after = kernel_fuse_inodes()  # before drop_caches, which makes the kernel forget them
        rss_walked, _ = self.daemon_memory(handle.pid)
        drop_caches()
        local_cold = self._time(lambda: walk_files(snapshot))
        local_warm = min(self._time(lambda: walk_files(snapshot)) for _ in range(3))
        per = 1e6 / len(files)
        self.report(
            "12",
            f"walk of {count} files, cold (us/entry; {requests} listing requests)",
            cold * per,
            local_cold * per,
            "us",
            cold / local_cold,
            "<= 3x",
        )
        self.report(
            "12",
            f"walk of {count} files, warm (us/entry; {warm_requests} listing requests)",
            warm * per,
            local_warm * per,
            "us",
            warm / local_warm,
            "<= 1.5x",
        )
        rss, peak = self.daemon_memory(handle.pid)
        held = ""
        if inodes_before is not None and inodes_after is not None:
            held = (
                f"; {rss_walked:.0f} MB right after them, while the kernel held {inodes_after - inodes_before} more "
                "FUSE inodes, one libfuse node each; the figure is after drop_caches made it forget them"
            )
        what = f"daemon RSS after the walks (MB; peak {peak:.0f}{held})"
        self.report("12", what, rss, 300, "MB", rss / 300, "bounded")
        self.unmount(handle)

    def row_8(self) -> None:
        """Daemon peak RSS (VmHWM) while 8 readers stream 8 different blobs cold: the HTTP path, then the Xet
        path (unique bytes, as trained weights are)."""
        per = max(32, self.args.size_mb // 4) * MiB
        xet_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
        for path, env, unique in (("HTTP", dict(os.environ), False), ("Xet", xet_env, True)):
            repos = [f"bench/rss-{path.lower()}{i}" for i in range(8)]
            for i, repo in enumerate(repos):
                src = self.work / f"rss-{path.lower()}-{i}.bin"
                make_file(src, per, unique)
                self.hub.add_repo(repo, {"model.safetensors": src})
            if path == "Xet":
                self.hub.prepare_xet()  # conversion to Xet is not what is measured
            handle = self.mount("hub-cache", f"hub8-{path.lower()}", env=env)
            files = [self.snapshot_file(Path(handle.mountpoint), repo, "model.safetensors") for repo in repos]
            readers = [
                subprocess.Popen(["dd", f"if={f}", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL) for f in files
            ]
            for reader in readers:
                reader.wait()
            _, peak = self.daemon_memory(handle.pid)  # VmHWM: the high-water mark, read once at the end
            self.unmount(handle)
            what = f"daemon peak RSS, 8 readers x {per // MiB} MiB cold, {path} path (MB)"
            self.report("8", what, peak, 200, "MB", peak / 200, "<= 200 MB")


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the big blob (rows 1-4, 8)")
    parser.add_argument("--files", type=int, default=10_000, help="entries for rows 5-6")
    parser.add_argument(
        "--rows",
        default="1,2,3,4,5,6,7,8,9",
        help="also 3n (needs --net), 10 (xet), ops (per-operation latency of the compile path), storm (compile storm),"
        " 11 (first read against repo size), 12 (walks against a local cache dir), cpu (CPU per cold GiB, HTTP and"
        " Xet paths, vs hf_hub_download + one read), floor (the storm and a walk through a do-nothing filesystem on"
        " the same FUSE binding)",
    )
    parser.add_argument(
        "--large-files", default="5000,50000,500000", help="row 11: dataset sizes (files) to read a first file of"
    )
    parser.add_argument("--walk-files", type=int, default=50_000, help="row 12: files of the walked dataset")
    parser.add_argument("--net", default=None, metavar="MBPS,MS", help="simulate a network for rows 3n, 9, 10 and cpu")
    parser.add_argument("--net-size-mb", type=int, default=512, help="size of the blob of row 3n")
    parser.add_argument("--repeat", type=int, default=2, help="rows 9, 10 and cpu: best of this many runs")
    parser.add_argument("--ops-n", type=int, default=2000, help="row ops: iterations of each operation")
    parser.add_argument("--storm-compilers", type=int, default=32, help="row storm: compiler processes")
    parser.add_argument("--storm-modules", type=int, default=12, help="row storm: modules per compiler")
    parser.add_argument("--storm-readers", type=int, default=8, help="row storm: reader processes")
    parser.add_argument("--storm-neff-kb", type=int, default=1024, help="row storm: size of each model.neff")
    parser.add_argument("--floor-walk-files", type=int, default=20_000, help="row floor: files of the walked dataset")
    parser.add_argument(
        "--c-passthrough",
        default=None,
        metavar="BIN",
        help="row floor: also libfuse's example/passthrough (C, high-level API) built against the installed libfuse",
    )
    parser.add_argument("--json", default=None, help="write all rows to this file")
    parser.add_argument("--work-dir", default=None, help="where to put data (default: system temp)")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    bench = Bench(args)
    try:
        print(f"hffs-neuron benchmarks ({os.cpu_count()} cores); emulator at {bench.hub.url}")
        if wanted & {"1", "2", "3"}:
            bench.rows_1_2_3()
        if "4" in wanted:
            bench.row_4()
        if wanted & {"5", "6"}:
            bench.rows_5_6()
        if "7" in wanted:
            bench.row_7()
        if "8" in wanted:
            bench.row_8()
        if "11" in wanted:
            bench.row_11()
        if "12" in wanted:
            bench.row_12()
        if "3n" in wanted:
            bench.row_3n()
        if "9" in wanted:
            bench.row_9()
        if "10" in wanted:
            bench.row_10()
        if "cpu" in wanted:
            bench.row_cpu()
        if "floor" in wanted:
            bench.row_floor()
        if "ops" in wanted:
            bench.row_ops()
        if "storm" in wanted:
            bench.row_storm()
    finally:
        bench.close()
    if args.json:
        Path(args.json).write_text(json.dumps(bench.rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
