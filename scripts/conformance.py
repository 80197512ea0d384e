"""Helper of scripts/conformance.sh: pjdfstest against a NEFF mount.

``mount WORKDIR``: start the Hub emulator with a NEFF bucket, mount a NEFF view with allow_other on
WORKDIR/mnt, create a module directory in it, print ``ready <module dir>`` and serve until SIGTERM or
SIGINT (or until the calling shell is gone); then unmount and stop the emulator.

``report LOG REFUSALS [--record]``: read ``prove -v`` output, compare the failed subtests with the
documented refusals and print the summary line (exit 1 on an unexpected failure). With ``--record``
the failures that are refusals (recognised from pjdfstest's messages, see ``REASONS``) are written
to REFUSALS; any other failure stays unexpected and is not written.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

MODULE = "neuronxcc-2.21.0.0+abc/MODULE_pjd+00000000"

# Why a subtest may fail on a NEFF mount although it passes on a local directory (README: refusals).
REASONS = {
    "device": "device nodes: mknod of a block or character device is refused with EPERM",
    "setid": "setuid/setgid bits: chmod and create with S_ISUID or S_ISGID are refused with EPERM",
    "link": "hard links: link is refused with EPERM",
    "estale": "fstat of an open file after its unlink: ESTALE (libfuse high-level API limitation)",
}
ORDER = list(REASONS)
HEADER = """\
# pjdfstest subtests that fail in a module directory of a NEFF mount because of deliberate,
# documented refusals (README). scripts/conformance.sh counts a failure listed here as a refusal
# and any other failure as unexpected. Regenerate with: scripts/conformance.sh --record [PJDFSTEST]
# Format: <test file under pjdfstest's tests/> <subtests: N or N-M, comma-separated>; a file's
# subtests may take several lines.
# Later subtests on a name whose creation was refused fail with it (ENOENT, wrong type, ...).
"""


# -- mount --------------------------------------------------------------------------------------------


def serve(workdir: Path) -> int:
    for sub in ("run", "hf", "hub", "cache", "mnt"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(workdir / "mnt", 0o755)
    env = {
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HFFS_RUNTIME_DIR": str(workdir / "run"),
        "HF_HOME": str(workdir / "hf"),
    }
    os.environ.update(env)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HFFS_PUBLISH"):
        os.environ.pop(key, None)
    # Imported only now: hffs_neuron reads its defaults (runtime dir, ...) from the environment.
    import hffs_neuron
    from hffs_neuron.testing.hub_emulator import HubEmulator
    from hffs_neuron.testing.sample_data import build_neff_bucket

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    parent = os.getppid()
    hub = HubEmulator(workdir / "hub").start()
    try:
        os.environ["HF_ENDPOINT"] = hub.url
        bucket = build_neff_bucket(hub)
        handle = hffs_neuron.mount(
            "neff",
            workdir / "mnt",
            bucket["bucket_id"],
            cache_dir=str(workdir / "cache"),
            allow_other=True,
            env=dict(os.environ),
        )
        try:
            module = workdir / "mnt" / MODULE
            module.mkdir(parents=True)
            print("ready", module, flush=True)
            while not stop and os.getppid() == parent:
                time.sleep(0.5)
        finally:
            print("conformance:", handle.unmount(force=True), file=sys.stderr, flush=True)
    finally:
        hub.stop()
    return 0


# -- report -------------------------------------------------------------------------------------------

HEAD = re.compile(r"^(?:\S*/)?tests/(\S+\.t) \.+ ?$")
RESULT = re.compile(r"^(not )?ok(?: (\d+))?(.*)$")
TRIED = re.compile(r"^ - tried '(.*)', expected (.*), got (.*)$")
NAME = re.compile(r"(?:pjdfstest_)?[0-9a-f]{32}")
OCTAL_MODE = re.compile(r"^0[0-7]{3,5}$")
# Operations that create a name, and which argument it is.
CREATE_OPS = {
    "create": 0,
    "open": 0,
    "mkdir": 0,
    "mkfifo": 0,
    "mknod": 0,
    "bind": 0,
    "symlink": 1,
    "link": 1,
    "rename": 1,
}
CASCADE_GAP = 10
LINE_WIDTH = 100  # of the recorded list
# What a step on a name whose creation (or link) was refused gets besides a wrong value.
CASCADE_ERRNOS = {"ENOENT", "EEXIST", "EADDRINUSE", "EISDIR", "ENOTDIR", "ENOTEMPTY"}


def parse(log: Path) -> tuple[int, list[tuple[str, int, str]]]:
    """Subtests counted (planned, or run where more), and failures as (file, number, message)."""
    total, failures = 0, []
    current: str | None = None
    plans: dict[str, int] = {}
    ran: dict[str, int] = defaultdict(int)
    for line in log.read_text(errors="replace").splitlines():
        head = HEAD.match(line)
        if head:
            current = head.group(1)
            continue
        if current is None:
            continue
        plan = re.match(r"^1\.\.(\d+)", line)
        if plan and current not in plans:
            plans[current] = int(plan.group(1))
            continue
        result = RESULT.match(line)
        if not result or (result.group(2) is None and not result.group(1)):
            continue  # "ok" alone closes a file in prove's output
        ran[current] += 1
        rest = result.group(3)
        if result.group(1) and "# TODO" not in rest and "# SKIP" not in rest:
            number = int(result.group(2) or 0)
            failures.append((current, number, rest.removeprefix(" - ").strip() or "(no message)"))
    for name in sorted(set(plans) | set(ran)):
        planned, done = plans.get(name, 0), ran[name]
        total += max(planned, done)
        if planned == 0:
            failures.append((name, 0, "no test plan: the test file did not run"))
        for number in range(done + 1, planned + 1):
            failures.append((name, number, f"not run: the test file stopped after {done} of {planned} subtests"))
    return total, failures


def ranges(numbers: list[int]) -> str:
    out, numbers = [], sorted(set(numbers))
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ",".join(out)


def load_refusals(path: Path) -> set[tuple[str, int]]:
    listed: set[tuple[str, int]] = set()
    if not path.exists():
        return listed
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, spec = line.partition(" ")
        try:
            for part in spec.replace(" ", ",").split(","):
                if not part:
                    continue
                low, _, high = part.partition("-")
                listed.update((name, n) for n in range(int(low), int(high or low) + 1))
        except ValueError:
            sys.exit(f"conformance: {path}:{lineno}: expected '<test file> N[-M][,N[-M]...]', got {raw!r}")
    return listed


def refusal_of(name: str, message: str) -> str | None:
    """The deliberate refusal a failed command shows, from pjdfstest's 'tried ..., got ...' message."""
    tried = TRIED.match(" - " + message)
    if not tried:
        return None
    command, got = tried.group(1), tried.group(3)
    if name == "unlink/14.t" and got == "ESTALE" and "unlink" in command and "fstat" in command:
        return "estale"
    if got != "EPERM":
        return None
    for words in steps(command):
        if not words:
            continue
        if words[0] == "mknod" and len(words) > 2 and words[2] in ("b", "c"):
            return "device"
        if words[0] == "link":
            return "link"
        if any(OCTAL_MODE.match(w) and int(w, 8) & 0o6000 for w in words[1:]):
            return "setid"
    return None


def steps(command: str) -> list[list[str]]:
    """The words of each step of a pjdfstest command ('-u U -g G op args : op args ...')."""
    return [re.sub(r"^-u \S+ -g \S+ ", "", step.strip()).split() for step in command.split(" : ")]


def names_of(command: str, expected: str) -> tuple[set[str], set[str]]:
    """Names a command creates (where it is expected to succeed) and names it uses."""
    created, used = set(), set()
    for words in steps(command):
        if not words:
            continue
        position = CREATE_OPS.get(words[0])
        if words[0] == "open" and not any("O_CREAT" in w for w in words):
            position = None
        for i, word in enumerate(words[1:]):
            found = NAME.findall(word)
            if i == position and expected == "0" and found:
                created.add(found[-1])
                found = found[:-1]
            used.update(found)
    return created, used - created


def classify(failures: list[tuple[str, int, str]]) -> dict[tuple[str, int], str]:
    """Reason per failure that is a refusal, or a later step that fails because of one (a cascade).

    A failure that is not a refusal follows the latest failure (within CASCADE_GAP subtests) on one
    of its names, else the test file's latest failure, when it finds an object missing, present or
    different (an errno of CASCADE_ERRNOS, a wrong value, a bare test_check); creating a name anew
    does not follow that name's failures unless it fails because the name exists. Following an
    unexpected failure keeps it unexpected; a permission error (EACCES, EPERM, ...) never follows.
    """
    reasons: dict[tuple[str, int], str] = {}
    chains: dict[tuple[str, str], tuple[str | None, int]] = {}  # (test file, name) -> (reason, last subtest)
    last: dict[str, tuple[str | None, int]] = {}  # test file -> its latest failure
    for name, number, message in failures:
        reason = refusal_of(name, message)
        tried = TRIED.match(" - " + message)
        created, used = names_of(tried.group(1), tried.group(2)) if tried else (set(), set())
        got = tried.group(3) if tried else ""
        if reason is None and (not tried or not got.startswith("E") or got in CASCADE_ERRNOS):
            # Follow the latest failure on one of its names, else the file's latest failure, if near;
            # that failure may itself be unexpected, and so is then this one.
            linked = used | (created if got in CASCADE_ERRNOS else set())
            near = [c for n in linked if (c := chains.get((name, n))) and number - c[1] <= CASCADE_GAP]
            if not near and name in last and number - last[name][1] <= CASCADE_GAP:
                near = [last[name]]
            if near:
                reason = max(near, key=lambda c: c[1])[0]
        for n in created | used:
            chains[(name, n)] = (reason, number)
        last[name] = (reason, number)
        if reason:
            reasons[(name, number)] = reason
    return reasons


def record(path: Path, reasons: dict[tuple[str, int], str]) -> None:
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for (name, number), reason in reasons.items():
        groups[reason][name].append(number)
    lines = [HEADER]
    for reason in ORDER:
        if reason in groups:
            lines.append(f"\n# {REASONS[reason]}\n")
            for name in sorted(groups[reason], key=lambda s: (s.split("/")[0], s)):
                line = name
                for part in ranges(groups[reason][name]).split(","):
                    if len(line) + len(part) + 1 > LINE_WIDTH and line != name:
                        lines.append(line + "\n")
                        line = name
                    line += ("," if line != name else " ") + part
                lines.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def report(log: Path, refusals: Path, do_record: bool, limit: int) -> int:
    total, failures = parse(log)
    if total == 0:
        print(f"conformance: prove ran no pjdfstest subtest (output: {log})")
        return 1
    if do_record:
        reasons = classify(failures)
        record(refusals, reasons)
        listed = set(reasons)
    else:
        listed = load_refusals(refusals)
    unexpected = [f for f in failures if (f[0], f[1]) not in listed]
    refused = len(failures) - len(unexpected)
    print(
        f"conformance: {total} subtests, {len(failures)} failed: {refused} documented refusals, "
        f"{len(unexpected)} unexpected"
    )
    for name, number, message in unexpected[:limit]:
        print(f"  {name} {number}: {message}")
    if len(unexpected) > limit:
        print(f"  ... and {len(unexpected) - limit} more (scripts/conformance.sh --log FILE keeps pjdfstest's output)")
    if do_record:
        print(f"conformance: recorded {refused} refusals in {refusals}", file=sys.stderr)
    else:
        stale = listed - {(f[0], f[1]) for f in failures}
        if stale:
            print(
                f"conformance: note: {len(stale)} listed refusals passed; the list is stale "
                "(scripts/conformance.sh --record)",
                file=sys.stderr,
            )
    return 1 if unexpected else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_mount = sub.add_parser("mount")
    p_mount.add_argument("workdir", type=Path)
    p_report = sub.add_parser("report")
    p_report.add_argument("log", type=Path)
    p_report.add_argument("refusals", type=Path)
    p_report.add_argument("--record", action="store_true")
    p_report.add_argument("--limit", type=int, default=300, help="unexpected failures printed at most")
    args = parser.parse_args(argv)
    if args.command == "mount":
        return serve(args.workdir)
    return report(args.log, args.refusals, args.record, args.limit)


if __name__ == "__main__":
    raise SystemExit(main())
