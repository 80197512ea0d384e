"""Never a hung mount, proven route by route (issue 26): every upstream route x stall / black hole / trickle.

Each case is a fresh real mount (`--timeout 3`) against the session's emulator, with one route of one
repo or bucket made to misbehave (fault patterns name that repo or bucket only, so cases run side by
side): a route that accepts and never answers (stall), one that never reads the request (black hole),
or one that sends its body below the floor (trickle, 20 B/s). Then a cold read as a client does it,
each step one timed FUSE call:

- hub-cache view: `refs/main`, the snapshot's listing, a read of the weights;
- NEFF view: a listing of a version never listed, a probe of a module added upstream after its
  version was listed, a read of a NEFF.

Asserted for every step: it returns within `--timeout` + `SLACK`, with the bytes or EIO (never ENOENT,
never anything else); routes with a second way to the bytes (the Xet routes fall back to HTTP Range)
and routes no read waits on (the event feed, uploads) give the bytes. Meanwhile a file cached before
the fault opens and reads at once. Once the fault is removed, the same mount serves every step's right
answer within the negative TTL plus the bound (nothing failed is remembered).

Resolve HEAD: the mount never sends one (asserted over every case); it learns sizes and hashes from
listings.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.mount import status
from hffs_neuron.store.verify import xet_hash
from hffs_neuron.testing.emulator.faults import FaultRule
from hffs_neuron.testing.hub_emulator import HubEmulator

TIMEOUT = 3.0
# The stated constant of README "Errors a reader can see": a FUSE call returns within --timeout + 2 s.
SLACK = 2.0
BOUND = TIMEOUT + SLACK
NEGATIVE_TTL = 1.0
# A cached file must keep opening while a route stalls: well under the bound.
CACHED_BOUND = 1.0
# How long a faulty route holds a connection: far beyond the bound, so only the mount can end a wait.
HOLD = 40.0
FAULTS: dict[str, dict] = {
    "stall": {"kind": "stall", "seconds": HOLD},
    "blackhole": {"kind": "blackhole", "seconds": HOLD},
    "trickle": {"kind": "trickle", "rate_bps": 20, "seconds": HOLD},
}
VERSION = "neuronxcc-2.0.0"
NEW_VERSION = "neuronxcc-3.0.0"
# Cases run this many at a time (each its own daemon): the matrix fits CI time on 2 cores.
PARALLEL = 9

MiB = 1024 * 1024


@dataclass
class Case:
    view: str  # "hub-cache" or "neff"
    route: str
    fault: str
    xet: bool = True
    # Where no step may fail: the route has a second way to the bytes, or no read waits on it.
    served: bool = False
    before_mount: bool = False  # a long-lived route (the event feed): the fault must meet its first request
    name: str = ""
    data: bytes = b""
    rules: list[FaultRule] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.view}-{self.route}-{self.fault}"


# route -> (fault patterns for the case's repo or bucket `{rid}`, or file `{xh}` (its xet hash); methods)
HUB_ROUTES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "repo-info": (["/api/models/{rid}/revision/*"], ("GET",)),
    "tree-pages": (["/api/models/{rid}/tree/*"], ("GET",)),
    "resolve-get": (["/{rid}/resolve/*"], ("GET",)),
    "xet-token": (["/api/models/{rid}/xet-read-token/*"], ("GET",)),
    "cas-reconstruction": (["/v*/reconstructions/{xh}*"], ("GET",)),
    "xorb-data": (["/v1/xorb-data/{xh}/*"], ("GET",)),
}
BUCKET_ROUTES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "bucket-listing": (["/api/buckets/{rid}/tree*"], ("GET",)),
    "paths-info": (["/api/buckets/{rid}/paths-info"], ("POST",)),
    "resolve-get": (["/buckets/{rid}/resolve/*"], ("GET",)),
    "xet-token": (["/api/buckets/{rid}/xet-read-token"], ("GET",)),
    "cas-reconstruction": (["/v*/reconstructions/{xh}*"], ("GET",)),
    "xorb-data": (["/v1/xorb-data/{xh}/*"], ("GET",)),
    "event-feed": (["/api/buckets/{rid}/events*"], ("GET",)),
    "upload": (["/api/buckets/{rid}/xet-write-token", "/api/buckets/{rid}/batch"], ("GET", "POST")),
}
_XET_ROUTES = {"xet-token", "cas-reconstruction", "xorb-data"}
_SERVED = _XET_ROUTES | {"event-feed", "upload"}


def _cases() -> list[Case]:
    cases = []
    for view, routes in (("hub-cache", HUB_ROUTES), ("neff", BUCKET_ROUTES)):
        for route in routes:
            for fault in FAULTS:
                cases.append(
                    Case(
                        view,
                        route,
                        fault,
                        xet=route != "resolve-get",  # with Xet on, file bytes never use resolve
                        served=route in _SERVED,
                        # A long-lived stream, or a token the cached file's read would fetch first.
                        before_mount=route == "event-feed" or (view == "neff" and route == "xet-token"),
                    )
                )
    return cases


def _errno_or(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as exc:
        return exc.errno


@dataclass
class Outcome:
    steps: list[tuple[str, object, float]] = field(default_factory=list)  # (step, result or errno, seconds)
    cached: list[float] = field(default_factory=list)  # seconds per open+read of the cached file
    recovered: dict[str, float] = field(default_factory=dict)  # step -> seconds after the fault went
    problems: list[str] = field(default_factory=list)
    fired: int = 0  # requests the fault met
    log: str = ""  # the daemon's log, shown for a case that failed


class Matrix:
    """The content of every case, made before any mount starts (one `prepare_xet` for all)."""

    def __init__(self, hub: HubEmulator, mounts: Mounts, env: dict[str, str]):
        self.hub, self.mounts, self.env = hub, mounts, env
        self.commits: dict[str, str] = {}

    def add(self, case: Case) -> None:
        case.name = f"stall/{case.id}"
        case.data = os.urandom(MiB + len(case.id))
        if case.view == "hub-cache":
            self.commits[case.name] = self.hub.add_repo(
                case.name, {"model.safetensors": case.data, "extra.safetensors": case.data[::-1]}
            )
            self.commits[case.name + "-warm"] = self.hub.add_repo(case.name + "-warm", {"w.safetensors": b"w" * 5000})
        else:
            self.hub.add_bucket(
                case.name,
                {
                    "neuronxcc-1.0.0/MODULE_warm+1/model.neff": b"warm" * 1000,
                    "neuronxcc-1.0.0/MODULE_warm+1/model.done": b"",
                    f"{VERSION}/MODULE_cold+1/model.neff": case.data,
                    f"{VERSION}/MODULE_cold+1/model.done": b"",
                    f"{VERSION}/MODULE_cold+1/model.hlo_module.pb": case.data[::-1],
                    f"{NEW_VERSION}/MODULE_other+1/model.neff": b"other",
                    f"{NEW_VERSION}/MODULE_other+1/model.done": b"",
                },
            )

    def add_faults(self, case: Case) -> None:
        patterns, methods = (HUB_ROUTES if case.view == "hub-cache" else BUCKET_ROUTES)[case.route]
        xh = _xet_hash_of(case.data)
        for pattern in patterns:
            case.rules.append(
                self.hub.faults.add(pattern.format(rid=case.name, xh=xh), methods=methods, **FAULTS[case.fault])
            )

    def clear_faults(self, case: Case) -> None:
        for rule in case.rules:
            self.hub.faults.remove(rule)

    # -- one case -------------------------------------------------------------------------------
    def run(self, case: Case) -> Outcome:
        out = Outcome()
        env = dict(self.env, HFFS_XET_PAUSE_AFTER_FAILURE="1")
        options: dict = dict(timeout=TIMEOUT, negative_ttl=NEGATIVE_TTL, xet="auto" if case.xet else "off")
        if case.view == "neff" and case.route == "upload":
            options["publish"] = True
        if case.before_mount:
            self.add_faults(case)
        source = case.name if case.view == "neff" else ""
        handle = self.mounts(case.view, source, name=f"mnt-{case.id}", cache=f"cache-{case.id}", env=env, **options)
        mp = Path(handle.mountpoint)
        cached, steps, expected, extra = self._layout(case, mp)
        assert cached.read_bytes() is not None  # cached before the fault
        if not case.before_mount:
            self.add_faults(case)
        done = threading.Event()

        def cold() -> None:
            try:
                for step, fn in steps.items():
                    start = time.monotonic()
                    out.steps.append((step, _errno_or(fn), time.monotonic() - start))
            finally:
                done.set()

        if case.route == "upload":  # a module compiled now: its publishing meets the fault
            module = mp / VERSION / "MODULE_local+1"
            start = time.monotonic()
            module.mkdir()
            (module / "model.neff").write_bytes(b"local neff")
            (module / "model.done").write_bytes(b"")
            out.steps.append(("local-compile", True, time.monotonic() - start))
        worker = threading.Thread(target=cold, name=f"cold-{case.id}")
        worker.start()
        # Until the cold steps are done and (uploads: the publisher is stuck on the fault) or a bound.
        until = time.monotonic() + NEGATIVE_TTL + 2 * BOUND
        while True:
            start = time.monotonic()
            with open(cached, "rb") as f:  # an open reaches the daemon (never answered by the kernel)
                f.read()
            out.cached.append(time.monotonic() - start)
            publishing = case.route == "upload" and not any(rule.fired for rule in case.rules)
            if done.wait(0.3) and (not publishing or time.monotonic() > until):
                break
        worker.join()
        out.fired = sum(rule.fired for rule in case.rules)  # `add` returned the live rules
        self.clear_faults(case)
        cleared = time.monotonic()
        for step, fn in steps.items():
            while True:
                result = _errno_or(fn)
                if result == expected[step]:
                    out.recovered[step] = time.monotonic() - cleared
                    break
                if time.monotonic() - cleared > NEGATIVE_TTL + BOUND:
                    out.problems.append(f"{step}: {_show(result)} after recovery, expected {_show(expected[step])}")
                    break
                time.sleep(0.1)
        if case.route == "upload":
            published = self.hub.bucket_dir(case.name) / VERSION / "MODULE_local+1" / "model.done"
            deadline = time.monotonic() + 30
            while not published.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not published.exists():
                out.problems.append("the local module was not published after the upload routes recovered")
        if case.xet and case.route in _XET_ROUTES:  # a file not read yet goes over Xet again
            before = _xet_transfers(mp)
            time.sleep(1.2)  # HFFS_XET_PAUSE_AFTER_FAILURE
            if extra.read_bytes() != case.data[::-1]:
                out.problems.append("wrong bytes after recovery")
            out.recovered["xet-transfers"] = _xet_transfers(mp) - before
        (state,) = status(mp)
        out.log = Path(state["log_file"]).read_text(errors="replace")
        self.mounts.unmount(handle)
        return out

    def _layout(self, case: Case, mp: Path) -> tuple[Path, dict[str, Callable[[], object]], dict[str, object], Path]:
        """The cached file (read here), the cold steps, each step's right answer, a file read after recovery."""
        if case.view == "hub-cache":
            warm_repo = mp / f"models--{case.name.replace('/', '--')}-warm"
            cached = warm_repo / "snapshots" / self.commits[case.name + "-warm"] / "w.safetensors"
            cached.read_bytes()
            repo = mp / f"models--{case.name.replace('/', '--')}"
            commit = self.commits[case.name]
            snapshot = repo / "snapshots" / commit
            steps = {
                "refs": (repo / "refs" / "main").read_text,
                "listing": lambda: sorted(os.listdir(snapshot)),
                "read": (snapshot / "model.safetensors").read_bytes,
            }
            expected = {"refs": commit, "listing": ["extra.safetensors", "model.safetensors"], "read": case.data}
            return cached, steps, expected, snapshot / "extra.safetensors"
        cached = mp / "neuronxcc-1.0.0" / "MODULE_warm+1" / "model.neff"
        cached.read_bytes()
        os.listdir(mp / VERSION)  # listed now; the module below is added upstream after
        bucket = self.hub.bucket_dir(case.name)
        (bucket / VERSION / "MODULE_new+1").mkdir()
        (bucket / VERSION / "MODULE_new+1" / "model.neff").write_bytes(b"new")
        (bucket / VERSION / "MODULE_new+1" / "model.done").write_bytes(b"")
        time.sleep(NEGATIVE_TTL + 0.2)  # the version's listing is old enough for a probe
        steps = {
            "listing": lambda: sorted(os.listdir(mp / NEW_VERSION)),
            "probe": lambda: os.stat(mp / VERSION / "MODULE_new+1" / "model.done").st_size,
            "read": (mp / VERSION / "MODULE_cold+1" / "model.neff").read_bytes,
        }
        expected = {"listing": ["MODULE_other+1"], "probe": 0, "read": case.data}
        return cached, steps, expected, mp / VERSION / "MODULE_cold+1" / "model.hlo_module.pb"


def _xet_transfers(mp: Path) -> int:
    (state,) = status(mp)
    return state["transfers"]["xet"]["count"]


def _xet_hash_of(data: bytes) -> str:
    """The xet hash of `data`, as the Hub lists it (CAS routes carry it in their path)."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        return xet_hash(f.name)


def _show(result: object) -> str:
    if isinstance(result, int) and result in errno.errorcode and not isinstance(result, bool):
        return errno.errorcode[result]
    if isinstance(result, bytes):
        return f"<{len(result)} bytes>"
    return repr(result)[:80]


def _check(case: Case, out: Outcome) -> list[str]:
    problems = list(out.problems)
    for step, result, seconds in out.steps:
        if seconds > BOUND:
            problems.append(f"{step} took {seconds:.1f}s (bound {BOUND:.0f}s)")
        if isinstance(result, int) and not isinstance(result, bool) and result in errno.errorcode:
            if result != errno.EIO:
                problems.append(f"{step}: {errno.errorcode[result]}, expected the bytes or EIO")
            elif case.served:
                problems.append(f"{step}: EIO, expected the bytes (the route has another way, or none waits on it)")
    failed = any(isinstance(r, int) and not isinstance(r, bool) for _, r, _ in out.steps)
    if not case.served and not failed and out.fired:
        problems.append(f"no step failed, yet the fault met {out.fired} requests")
    slow = [s for s in out.cached if s > CACHED_BOUND]
    if not out.cached:
        problems.append("the cached file was never read during the fault")
    if slow:
        problems.append(f"the cached file took {max(slow):.1f}s to open and read during the fault")
    if case.xet and case.route in _XET_ROUTES and out.recovered.get("xet-transfers") != 1:
        problems.append("a new file did not go over Xet after the route recovered")
    return problems


@pytest.mark.timeout(300)
def test_stall_matrix(hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]) -> None:
    env = dict(runtime_env)
    env.pop("HF_HUB_DISABLE_XET", None)  # the Xet routes are part of the matrix
    matrix = Matrix(hub, mounts, env)
    cases = _cases()
    for case in cases:
        matrix.add(case)
    hub.prepare_xet()
    hub.reset_stats()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        outcomes = list(pool.map(_guarded(matrix), cases))
    report, failures = [], []
    for case, out in zip(cases, outcomes, strict=True):
        problems = out.problems if isinstance(out, Failed) else _check(case, out)
        steps = ", ".join(f"{s}={_show(r)} {t:.1f}s" for s, r, t in getattr(out, "steps", []))
        fired = getattr(out, "fired", "?")
        report.append(f"{case.id}: {steps}; fault met {fired} requests" + ("" if fired else " (route not used)"))
        failures += [f"{case.id}: {p}" for p in problems]
        if problems and getattr(out, "log", ""):
            print(f"--- {case.id}: daemon log (tail)\n" + "\n".join(out.log.splitlines()[-25:]))
    print("\n" + "\n".join(report) + f"\nmatrix: {len(cases)} cases in {time.monotonic() - started:.0f}s")
    heads = [r.path for r in hub.requests("/stall/", method="HEAD")]
    assert heads == [], f"the mount sent HEAD requests: {heads[:5]}"
    assert not failures, "\n".join(failures)


@dataclass
class Failed:
    problems: list[str]


def _guarded(matrix: Matrix) -> Callable[[Case], Outcome | Failed]:
    def run(case: Case) -> Outcome | Failed:
        try:
            return matrix.run(case)
        except Exception as exc:  # noqa: BLE001 - one case's error is reported with the others
            matrix.clear_faults(case)
            return Failed([f"{type(exc).__name__}: {exc}"])

    return run
