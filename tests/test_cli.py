"""`mountctl` end to end: the real console script in a subprocess, real FUSE mounts, the local Hub emulator.

Every command and every documented error is exercised the way a user meets it: exit code, one line on
stderr, what is (or is not) mounted afterwards, and that no token is ever printed or recorded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hffs_neuron.process_tuning import with_huge_page_malloc
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket, build_neff_repo

BIN = Path(sys.executable).parent
MOUNTCTL = str(BIN / "mountctl")
MOUNT_HFFS = str(BIN / "mount.hffs")
BUCKET = "aws-neuron/optimum-neuron-cache"
SECRET = "hf_cli_secret_token_4242"  # accepted by no one: only for leak checks


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy (bounded: state files update once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"  # a zombie nobody reaps is gone as far as we care


class Cli:
    """Runs the installed console scripts with an isolated runtime dir, HF_HOME and cache dir."""

    def __init__(self, tmp: Path, hub: HubEmulator):
        self.tmp = tmp
        self.hub = hub
        self.runtime = tmp / "run"
        self.cache = tmp / "home" / "hffs-neuron"  # the default: under $HF_HOME
        self.env = dict(os.environ, HF_ENDPOINT=hub.url, HFFS_RUNTIME_DIR=str(self.runtime), HF_HOME=str(tmp / "home"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HFFS_CACHE_DIR"):
            self.env.pop(name, None)
        self.outputs: list[str] = []  # everything any command printed, for the token-leak check
        self.mountpoints: list[Path] = []
        self._count = 0

    def run(
        self, *args: str, env: dict[str, str] | None = None, script: str = MOUNTCTL, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [script, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def ok(self, *args: str, **kwargs: object) -> str:
        result = self.run(*args, **kwargs)  # type: ignore[arg-type]
        assert result.returncode == 0, f"mountctl {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def fails(self, code: int, *args: str, **kwargs: object) -> str:
        """Run, expect exit `code` and exactly one `mountctl: ...` line on stderr; return that line."""
        result = self.run(*args, **kwargs)  # type: ignore[arg-type]
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, f"expected exit {code}, got {result.returncode}: {result.stderr}"
        assert len(lines) == 1 and lines[0].startswith("mountctl: "), result.stderr
        return lines[0]

    def mountpoint(self) -> Path:
        self._count += 1
        path = self.tmp / f"mnt{self._count}"
        path.mkdir()
        self.mountpoints.append(path)
        return path

    def mount_neff(self, mp: Path, *extra: str) -> int:
        out = self.ok("mount", "neff", BUCKET, str(mp), *extra)
        assert f"mounted neff view on {mp}" in out
        assert os.path.ismount(mp)
        return self.state(mp)["pid"]

    def status(self, mp: Path | None = None) -> list[dict]:
        """`status --json` of `mp`, or of every mount of this test (status lists every mount on the host)."""
        mounts = json.loads(self.ok("status", *([str(mp)] if mp else []), "--json"))["mounts"]
        return [s for s in mounts if mp or s["mountpoint"].startswith(f"{self.tmp}/")]

    def state(self, mp: Path) -> dict:
        (state,) = self.status(mp)
        return state

    def leftovers(self) -> list[str]:
        """Daemons still running for one of this test's mountpoints (nothing may be left half-done)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "hffs_neuron.daemon" in cmdline and str(self.tmp) in cmdline and not pid_gone(int(proc.name)):
                found.append(proc.name)
        return found

    def cleanup(self) -> None:
        """Detach every mount of this test and stop its daemons, whatever state the test left them in."""
        for mp in self.mountpoints:
            subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True, timeout=30)
        for pid in self.leftovers():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cli(tmp_path: Path, hub: HubEmulator) -> Iterator[Cli]:
    c = Cli(tmp_path, hub)
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def bucket(hub: HubEmulator) -> dict:
    return build_neff_bucket(hub, BUCKET)


def a_neff(bucket: dict) -> tuple[str, bytes]:
    """(bucket-relative path, bytes) of the largest sample NEFF."""
    path = max((p for p in bucket["files"] if p.endswith("model.neff")), key=bucket["files"].get)
    return path, (bucket["dir"] / path).read_bytes()


# -- the happy paths ------------------------------------------------------------------------------
def test_version(cli: Cli) -> None:
    from hffs_neuron import __version__

    assert cli.ok("--version").strip() == f"mountctl (hffs-neuron) {__version__}"


def test_help_documents_exit_codes(cli: Cli) -> None:
    out = cli.ok("--help")
    assert "exit codes" in out and "access denied" in out
    for command in ("mount", "umount", "status", "prefetch", "push", "cache"):
        assert command in out


@pytest.mark.timeout(120)
def test_mount_status_umount_cycles(cli: Cli, bucket: dict) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    assert cli.status() == []
    for cycle in range(2):  # the same mountpoint can be reused after a clean unmount
        pid = cli.mount_neff(mp)
        state = cli.state(mp)
        for key in ("pid", "view", "source", "mountpoint", "uptime", "cache_used", "alive", "health", "mounted"):
            assert key in state, key
        for key in ("hits", "misses", "fetches", "bytes_fetched", "http_requests"):
            assert isinstance(state["counters"][key], int), key
        assert isinstance(state["in_flight"], list)
        assert (state["view"], state["source"], state["mountpoint"]) == ("neff", BUCKET, str(mp))
        assert (state["alive"], state["health"], state["mounted"]) == (True, "running", True)
        before = state["counters"]

        assert (mp / path).read_bytes() == data
        if cycle == 0:  # a transfer: misses, bytes fetched and http requests go up
            after = wait_for(
                lambda: (s := cli.state(mp))["counters"]["bytes_fetched"] >= len(data) and s,  # noqa: B023
                what="counters to show the fetch",
            )
            assert after["counters"]["misses"] > before["misses"]
            assert after["counters"]["http_requests"] > before["http_requests"]
        else:  # the blob store outlives the mount: a hit, nothing fetched
            after = wait_for(
                lambda: (s := cli.state(mp))["counters"]["hits"] > before["hits"] and s,  # noqa: B023
                what="counters to show the hit",
            )
            assert after["counters"]["bytes_fetched"] == 0
        assert after["cache_used"] >= len(data)
        text = cli.ok("status")
        assert f"{mp}: neff view of {BUCKET} (running, pid {pid}" in text and "misses" in text

        assert "unmounted" in cli.ok("umount", str(mp))
        assert not os.path.ismount(mp) and os.listdir(mp) == []
        wait_for(lambda: pid_gone(pid), what="the daemon to exit")  # noqa: B023
        assert cli.status() == []
    assert "not mounted" in cli.fails(3, "umount", str(mp))
    assert "no hffs mount here" in cli.fails(3, "status", str(mp))


@pytest.mark.timeout(60)
def test_hub_cache_mount_pins_repo(cli: Cli, hub: HubEmulator) -> None:
    commit = hub.add_repo("HFFS-Test/Cli-Model", {"config.json": b'{"model_type": "llama"}', "README.md": b"hi"})
    mp = cli.mountpoint()
    out = cli.ok("mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Cli-Model@main", "--cache-size", "1G")
    assert f"mounted hub-cache view on {mp}" in out
    try:
        folder = mp / "models--HFFS-Test--Cli-Model"
        assert (folder / "refs" / "main").read_text() == commit
        assert (folder / "snapshots" / commit / "config.json").read_bytes() == b'{"model_type": "llama"}'
        assert cli.state(mp)["view"] == "hub-cache"
    finally:
        cli.ok("umount", str(mp))


@pytest.mark.timeout(60)
def test_sigterm_unmounts_cleanly(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    pid = cli.mount_neff(mp)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: pid_gone(pid) and not os.path.ismount(mp), what="the daemon to unmount and exit")
    assert os.listdir(mp) == []
    assert list(cli.runtime.glob("*.json")) == []  # its runtime state went with it
    assert cli.status() == []


@pytest.mark.timeout(60)
def test_foreground_stays_attached_and_exits_on_sigint(cli: Cli, bucket: dict) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    proc = subprocess.Popen(
        [MOUNTCTL, "mount", "neff", BUCKET, str(mp), "--foreground", "--log-file", str(cli.tmp / "fg.log")],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: cli.status(), what="the foreground mount to record its state")
        assert cli.state(mp)["pid"] == proc.pid  # no daemon behind it: this very process serves
        assert (mp / path).read_bytes() == data
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not os.path.ismount(mp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_dead_daemon_status_force_umount_and_stale_recovery(cli: Cli, bucket: dict) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    pid = cli.mount_neff(mp)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid), what="the daemon to die")
    state = cli.state(mp)
    assert (state["alive"], state["health"], state["mounted"]) == (False, "dead", False)
    assert "DEAD daemon" in cli.ok("status", str(mp))
    with pytest.raises(OSError) as exc:
        os.listdir(mp)
    assert exc.value.errno == errno.ENOTCONN

    assert "cleared a stale mount" in cli.ok("umount", "--force", str(mp))
    assert cli.status() == []
    pid = cli.mount_neff(mp)  # the same mountpoint works again
    assert (mp / path).read_bytes() == data

    # Mounting straight onto a stale mountpoint recovers it too.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid), what="the daemon to die")
    result = cli.run("mount", "neff", BUCKET, str(mp))
    assert result.returncode == 0, result.stderr
    assert "stale" in result.stderr  # says what it did
    assert (mp / path).read_bytes() == data
    assert cli.state(mp)["health"] == "running"
    cli.ok("umount", str(mp))


@pytest.mark.timeout(60)
def test_busy_umount_names_the_user_and_force_detaches(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    pid = cli.mount_neff(mp)
    user = subprocess.Popen(["sleep", "60"], cwd=mp)
    try:
        line = cli.fails(3, "umount", str(mp))
        assert "busy" in line and f"sleep (pid {user.pid})" in line and "--force" in line
        assert os.path.ismount(mp) and cli.state(mp)["health"] == "running"  # nothing was torn down

        assert "detached" in cli.ok("umount", "--force", str(mp))
        assert not os.path.ismount(mp)
        assert cli.status() == []
        assert not pid_gone(pid)  # still serving the process inside...
    finally:
        user.kill()
        user.wait()
    wait_for(lambda: pid_gone(pid), what="the daemon to exit once its last user left")
    cli.mount_neff(mp)  # ...and the mountpoint is free again
    cli.ok("umount", str(mp))


@pytest.mark.timeout(90)
def test_prefetch_concurrent_with_readers_fetches_once(cli: Cli, hub: HubEmulator, bucket: dict) -> None:
    version = bucket["compiler_versions"][0]
    module = f"{version}/MODULE_99999999999999999999+0000beef"
    rel = f"{module}/model.neff"
    data = os.urandom(8 * 1024 * 1024 + 123)
    hub.add_bucket(BUCKET, {rel: data, f"{module}/compile_flags.json": b"[]", f"{module}/model.done": b""})
    # A slow start keeps the transfer in flight while the prefetch and every reader ask for it.
    hub.faults.add("*/resolve/*MODULE_99999999999999999999*", "latency", seconds=3.0)
    mp = cli.mountpoint()
    cli.mount_neff(mp)
    hub.reset_stats()
    reader = "import hashlib, sys; h = hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest(); print(h)"
    readers = [
        subprocess.Popen([sys.executable, "-c", reader, str(mp / rel)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    prefetch = subprocess.Popen(
        [MOUNTCTL, "prefetch", str(mp / version), "--jobs", "4"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Meanwhile `status` shows the fetch in flight, with its progress.
    fetching = wait_for(lambda: cli.state(mp)["in_flight"], what="the fetch to show in status")
    assert any(f["total"] == len(data) and 0 <= f["done"] <= f["total"] and f["name"] for f in fetching)
    assert "fetching " in cli.ok("status", str(mp))
    out, err = prefetch.communicate(timeout=60)
    result = subprocess.CompletedProcess(prefetch.args, prefetch.returncode, out, err)
    digests = [r.communicate(timeout=60)[0].strip() for r in readers]
    assert result.returncode == 0, result.stderr
    assert "prefetched" in result.stdout and "prefetch" in result.stderr  # summary + tqdm bar
    assert digests == [hashlib.sha256(data).hexdigest()] * 3
    assert hub.bytes_served("0000beef/model.neff") == len(data)  # one transfer for everyone
    counters = wait_for(lambda: (c := cli.state(mp)["counters"])["bytes_fetched"] >= len(data) and c)
    assert counters["fetches"] >= 1

    # A second prefetch is all hits: nothing more is transferred.
    cli.ok("prefetch", str(mp / rel))
    assert hub.bytes_served("0000beef/model.neff") == len(data)
    assert "not inside a running hffs mount" in cli.fails(3, "prefetch", str(cli.tmp))
    assert "no such file" in cli.fails(4, "prefetch", str(mp / "nope"))  # exit 4: not found, as documented
    cli.ok("umount", str(mp))


@pytest.mark.timeout(60)
def test_cache_du_and_prune(cli: Cli, bucket: dict) -> None:
    path, data = a_neff(bucket)
    cache = str(cli.tmp / "cache")
    assert "0 B in 0 blobs" in cli.ok("cache", "du", "--cache-dir", cache)
    mp = cli.mountpoint()
    cli.mount_neff(mp, "--cache-dir", cache)
    assert (mp / path).read_bytes() == data
    du = cli.ok("cache", "du", "--cache-dir", cache)
    assert "in 1 blobs" in du
    cli.ok("umount", str(mp))
    assert "freed 0 B" in cli.ok("cache", "prune", "--cache-dir", cache, "--max-size", "1G")  # under the limit
    assert "0 B left" in cli.ok("cache", "prune", "--cache-dir", cache)
    assert "0 B in 0 blobs" in cli.ok("cache", "du", "--cache-dir", cache)
    assert "bad size" in cli.fails(2, "cache", "prune", "--cache-dir", cache, "--max-size", "lots")
    # The default cache dir lives under $HF_HOME.
    assert str(cli.cache) in cli.ok("cache", "du")


@pytest.mark.timeout(60)
def test_push_dry_run_lists_complete_local_modules(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    cli.mount_neff(mp)
    module = mp / bucket["compiler_versions"][0] / "MODULE_12345678901234567890+abcdef12"
    module.mkdir()
    for name, content in (("model.hlo_module.pb", b"hlo"), ("compile_flags.json", b"[]"), ("model.neff", b"neff")):
        (module / name).write_bytes(content)
    (module / "model.done").touch()
    out = cli.ok("push", str(mp), "--dry-run")
    assert f"would push {bucket['compiler_versions'][0]}/{module.name} (4 files)" in out
    assert "not an hffs mount" in cli.fails(3, "push", str(cli.tmp))
    cli.ok("umount", str(mp))


@pytest.mark.timeout(60)
def test_mount_hffs_helper_maps_fstab_options(cli: Cli, bucket: dict) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    cache = cli.tmp / "fstab-cache"
    opts = (
        f"ro,_netdev,nofail,cache_dir={cache},cache_size=1G,metadata_ttl=30s,publish,"
        "stale_lock_grace=3s,keep_stale_locks,nofollow_events,xet=off"
    )
    out = cli.ok(f"neff:{BUCKET}", str(mp), "-o", opts, script=MOUNT_HFFS)
    assert "mounted neff view" in out
    assert (mp / path).read_bytes() == data
    assert cli.state(mp)["cache_dir"] == str(cache)
    assert cli.state(mp)["options"]["publish"] is True
    options = cli.state(mp)["options"]
    assert (options["stale_lock_grace"], options["keep_stale_locks"], options["follow_events"]) == (3.0, True, False)
    assert cli.state(mp)["options"]["xet"] == "off"
    assert "publish (on-completion): published 0" in cli.ok("status", str(mp))
    with pytest.raises(OSError) as exc:
        (mp / "new-file").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    cli.ok("umount", str(mp))
    assert "token_file" in cli.fails(2, f"neff:{BUCKET}", str(mp), "-o", f"token={SECRET}", script=MOUNT_HFFS)
    assert "unknown option" in cli.fails(2, f"neff:{BUCKET}", str(mp), "-o", "frobnicate", script=MOUNT_HFFS)
    assert SECRET not in "".join(cli.outputs)


# -- fstab through mount(8): the helper linked into /sbin as util-linux finds it ------------------------
def mountinfo(mp: Path) -> list[tuple[str, str]]:
    """(fstype, source) of each mount on `mp` in /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        if fields.split()[4] == str(mp):
            fstype, source = tail.split()[:2]
            found.append((fstype, source))
    return found


@pytest.fixture
def sbin_helpers() -> Iterator[None]:
    """/sbin/mount.hffs and /sbin/mount.fuse.hffs -> this venv's mount.hffs, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper in /sbin needs root")
    links = [Path("/sbin/mount.hffs"), Path("/sbin/mount.fuse.hffs")]
    if any(link.exists() or link.is_symlink() for link in links):
        pytest.skip("a mount.hffs helper is already installed in /sbin")
    try:
        for link in links:
            link.symlink_to(MOUNT_HFFS)
        yield
    finally:
        for link in links:
            link.unlink(missing_ok=True)


@pytest.mark.timeout(120)
def test_fstab_mount_a_twice_mounts_once_under_the_fstab_source(cli: Cli, bucket: dict, sbin_helpers: None) -> None:
    path, data = a_neff(bucket)
    nc, hf = cli.mountpoint(), cli.mountpoint()
    fstab = cli.tmp / "fstab"
    fstab.write_text(
        f"neff:{BUCKET}  {nc}  hffs  cache_dir={cli.tmp / 'fstab-cache'},_netdev,nofail  0 0\n"
        f"hub-cache  {hf}  hffs  _netdev,nofail  0 0\n"
    )
    for _ in range(2):  # the second `mount -a` finds both mounted: rc 0, nothing mounted twice
        result = subprocess.run(
            ["mount", "--fstab", str(fstab), "-a"], env=cli.env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert mountinfo(nc) == [("fuse.hffs", f"neff:{BUCKET}")]
        assert mountinfo(hf) == [("fuse.hffs", "hub-cache")]
    assert (nc / path).read_bytes() == data
    findmnt = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(nc)], capture_output=True, text=True)
    assert findmnt.stdout.split() == [f"neff:{BUCKET}", "fuse.hffs"]
    df = subprocess.run(["df", "--output=source", str(hf)], capture_output=True, text=True)
    assert df.stdout.split()[-1] == "hub-cache"
    assert (cli.state(nc)["fsname"], cli.state(hf)["fsname"]) == (f"neff:{BUCKET}", "hub-cache")
    for mp in (nc, hf):
        cli.ok("umount", str(mp))
    assert_nothing_left(cli, nc)


@pytest.mark.timeout(120)
def test_mount_t_fuse_hffs_and_hffs_and_mountctl_name_the_source(cli: Cli, bucket: dict, sbin_helpers: None) -> None:
    path, data = a_neff(bucket)
    a, b, c = cli.mountpoint(), cli.mountpoint(), cli.mountpoint()
    # One cache dir each: the same bucket twice in one cache dir is refused.
    opts = [f"cache_dir={cli.tmp / name}" for name in ("cache-a", "cache-b")]

    def mount(*args: str) -> None:
        result = subprocess.run(["mount", *args], env=cli.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    mount("-t", "fuse.hffs", "-o", opts[0], f"neff:{BUCKET}", str(a))  # the type mount(8) itself reports
    mount("-t", "hffs", "-o", opts[1], BUCKET, str(b))  # a bare bucket id: shown as written
    cli.ok("mount", "neff", BUCKET, str(c), "--cache-dir", str(cli.tmp / "cache-c"))
    assert mountinfo(a) == [("fuse.hffs", f"neff:{BUCKET}")]
    assert mountinfo(b) == [("fuse.hffs", BUCKET)]
    assert mountinfo(c) == [("fuse.hffs", BUCKET)]  # the source's canonical form (hffs_neuron/sources.py)
    # An fstab line in the canonical form matches the mount `mountctl mount` made: `mount -a` leaves it be.
    fstab = cli.tmp / "fstab"
    fstab.write_text(f"{BUCKET}  {c}  hffs  cache_dir={cli.tmp / 'cache-c'},nofail  0 0\n")
    again = subprocess.run(["mount", "--fstab", str(fstab), "-a"], env=cli.env, capture_output=True, text=True)
    assert again.returncode == 0 and mountinfo(c) == [("fuse.hffs", BUCKET)], again.stderr
    for mp in (a, b, c):
        assert (mp / path).read_bytes() == data
        findmnt = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mp)], capture_output=True, text=True)
        assert findmnt.stdout.strip() == mountinfo(mp)[0][1]
        cli.ok("umount", str(mp))
    assert_nothing_left(cli, a)


# -- errors: one line, the right exit code, nothing left behind ------------------------------------
def assert_nothing_left(cli: Cli, mp: Path | None = None) -> None:
    if mp is not None and mp.is_dir():
        assert not os.path.ismount(mp)
    assert list(cli.runtime.glob("*.json")) == []
    assert cli.leftovers() == []


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("missing", 3, "does not exist; create it with: mkdir -p"),
        ("file", 3, "not a directory"),
        ("non-empty", 3, "not empty"),
    ],
)
def test_bad_mountpoints(cli: Cli, bucket: dict, setup: str, code: int, message: str) -> None:
    mp = cli.tmp / "target"
    if setup == "file":
        mp.write_text("x")
    elif setup == "non-empty":
        mp.mkdir()
        (mp / "something").write_text("x")
    assert message in cli.fails(code, "mount", "neff", BUCKET, str(mp))
    assert_nothing_left(cli)


@pytest.mark.timeout(60)
def test_already_mounted(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    pid = cli.mount_neff(mp)
    line = cli.fails(3, "mount", "neff", BUCKET, str(mp))
    assert "already mounted" in line and f"mountctl umount {mp}" in line
    assert cli.state(mp)["pid"] == pid  # the running mount is untouched
    cli.ok("umount", str(mp))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["mount", "neff", "not-a-bucket-id", "{mp}"], 2, "invalid bucket id"),
        (["mount", "neff", "../etc/passwd", "{mp}"], 2, "invalid bucket id"),
        (["mount", "hub-cache", "{mp}", "--repo", "a/b/c/d"], 2, "'a/b/c/d'"),
        (["mount", "neff", BUCKET, "{mp}", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["mount", "neff", BUCKET, "{mp}", "--cache-size", "12X"], 2, "bad size '12X'"),
        (["mount", "neff", BUCKET, "{mp}", "--metadata-ttl", "5y"], 2, "bad duration '5y'"),
        (["mount", "neff", BUCKET, "{mp}", "--negative-ttl", "soon"], 2, "bad duration 'soon'"),
        (["mount", "neff", BUCKET, "{mp}", "--timeout", "-1"], 2, "bad duration '-1'"),
        (["mount", "neff", BUCKET, "{mp}", "--log-level", "LOUD"], 2, "bad log level"),
        (["mount", "neff", BUCKET, "{mp}", "--token-file", "/nonexistent/token"], 2, "--token-file"),
        (["mount", "hub-cache", "{mp}", "--backing", "/nonexistent/dir"], 2, "--backing"),
        (["mount", "neff", "Nobody/Nothing", "{mp}"], 4, "not found"),
        (["mount", "hub-cache", "{mp}", "--repo", "Nobody/Nothing"], 4, "not found"),
        (["mount", "neff", BUCKET, "{mp}", "--cache-dir", "/proc/hffs-cache"], 3, "/proc/hffs-cache"),
        (["frobnicate"], 2, "invalid choice"),
        (["cache", "explode"], 2, "invalid choice"),
    ],
)
def test_usage_and_not_found_errors(cli: Cli, bucket: dict, args: list[str], code: int, message: str) -> None:
    mp = cli.mountpoint()
    line = cli.fails(code, *[a.format(mp=mp) for a in args])
    assert message in line
    assert_nothing_left(cli, mp)


def test_gated_repo_needs_a_token(cli: Cli, hub: HubEmulator, hub_token: str) -> None:
    hub.add_repo("HFFS-Test/Gated", {"config.json": b"{}"}, gated=True)
    mp = cli.mountpoint()
    line = cli.fails(5, "mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Gated")
    assert "this mount's token (--token-file at mount time) has no access to HFFS-Test/Gated" in line
    assert_nothing_left(cli, mp)
    cli.ok("mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Gated", "--token", hub_token)
    cli.ok("umount", str(mp))


def test_unauthorized_bucket_names_the_mount_token(cli: Cli, hub: HubEmulator, bucket: dict) -> None:
    for status in (401, 403):
        hub.faults.clear()
        hub.faults.add("/api/buckets/*", "status", status=status)
        mp = cli.mountpoint()
        line = cli.fails(5, "mount", "neff", BUCKET, str(mp))
        assert f"HTTP {status}" in line and "--token-file" in line
        assert_nothing_left(cli, mp)


# -- mount-time checks: definite answers fail, transient ones warn -----------------------------------
def test_a_token_the_hub_refuses_fails_the_mount(cli: Cli, hub: HubEmulator, bucket: dict, hub_token: str) -> None:
    hub.add_repo("HFFS-Test/Public", {"config.json": b"{}"})
    token_file = cli.tmp / "token"
    token_file.write_text(SECRET)
    for args in (["neff", BUCKET, "{mp}"], ["hub-cache", "{mp}"], ["hub-cache", "{mp}", "--repo", "HFFS-Test/Public"]):
        mp = cli.mountpoint()
        line = cli.fails(5, "mount", *[a.format(mp=mp) for a in args], "--token-file", str(token_file))
        assert "refuses this mount's token" in line and "whoami" in line, line
        assert_nothing_left(cli, mp)
    assert len(hub.requests("/api/whoami-v2")) == 3
    # The same mounts with a valid token, and with none: the checks pass and say so in status.
    token_file.write_text(hub_token)
    mp = cli.mountpoint()
    cli.ok("mount", "neff", BUCKET, str(mp), "--token-file", str(token_file))
    assert cli.state(mp)["checks"] == {"endpoint": "ok", "token": "ok", "source": "ok"}
    cli.ok("umount", str(mp))
    cli.ok("mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Public")
    assert cli.state(mp)["checks"] == {"endpoint": "ok", "token": "absent", "source": "ok"}
    cli.ok("umount", str(mp))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["neff", "HFFS-Test/No-Such-Bucket", "{mp}"], 4, "bucket HFFS-Test/No-Such-Bucket: not found"),
        (["hub-cache", "{mp}", "--repo", "HFFS-Test/Public", "--repo", "HFFS-Test/No-Such-Repo"], 4, "not found"),
        (["hub-cache", "{mp}", "--repo", "HFFS-Test/Public@no-such-branch"], 4, "not found"),
    ],
)
def test_a_missing_source_fails_the_mount(cli: Cli, hub: HubEmulator, args: list[str], code: int, message: str) -> None:
    hub.add_repo("HFFS-Test/Public", {"config.json": b"{}"})
    mp = cli.mountpoint()
    assert message in cli.fails(code, "mount", *[a.format(mp=mp) for a in args])
    assert_nothing_left(cli, mp)


def _warned(cli: Cli, mp: Path, check: str, *words: str) -> None:
    """The mount is up, its status (JSON and text) and its log carry the warning of `check`."""
    state = cli.state(mp)
    assert state["health"] == "running"
    assert state["checks"][check].startswith("warning: ") and all(w in state["checks"][check] for w in words)
    assert f"WARNING at mount time, {check}:" in cli.ok("status", str(mp))
    assert f"mount-time check of the {check}" in Path(state["log_file"]).read_text()
    cli.ok("status", str(mp), "--check")  # a Hub blip never fails a readiness probe or a Slurm prolog


@pytest.mark.timeout(90)
def test_an_unreachable_endpoint_mounts_with_a_warning(cli: Cli) -> None:
    mp = cli.mountpoint()
    started = time.monotonic()
    cli.ok("mount", "neff", BUCKET, str(mp), "--endpoint", "http://127.0.0.1:1", timeout=45)
    assert time.monotonic() - started < 30  # the mount-time deadline, not the 120 s of a live mount
    _warned(cli, mp, "endpoint", "http://127.0.0.1:1", "unreachable")
    assert cli.state(mp)["checks"]["source"] == "not checked: the endpoint did not answer"
    cli.ok("umount", str(mp))


@pytest.mark.timeout(120)
def test_a_failing_hub_mounts_with_a_warning_and_serves_once_it_recovers(
    cli: Cli, hub: HubEmulator, bucket: dict
) -> None:
    path, data = a_neff(bucket)
    hub.add_repo("HFFS-Test/Public", {"config.json": b"{}"})
    mp = cli.mountpoint()
    hub.faults.add("/api/whoami-v2", "status", status=503)
    cli.ok("mount", "neff", BUCKET, str(mp), timeout=45)
    _warned(cli, mp, "endpoint", "503")
    hub.faults.clear()
    assert (mp / path).read_bytes() == data  # the bucket, mounted unresolved, answers once the Hub does
    cli.ok("umount", str(mp))

    hub.faults.add("/api/buckets/*", "status", status=503)
    cli.ok("mount", "neff", BUCKET, str(mp), timeout=45)
    _warned(cli, mp, "source", BUCKET, "503")
    hub.faults.clear()
    assert (mp / path).read_bytes() == data
    cli.ok("umount", str(mp))

    hub.faults.add("/api/models/*", "status", status=503)
    cli.ok("mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Public", timeout=45)
    _warned(cli, mp, "source", "HFFS-Test/Public@main", "503")
    hub.faults.clear()
    assert (mp / "models--HFFS-Test--Public" / "refs" / "main").exists()  # resolved on its first lookup
    cli.ok("umount", str(mp))

    # A repo source: mounted unresolved through the blip, its commit resolved on the first listing.
    repo = build_neff_repo(hub, "HFFS-Test/Neff-Repo-Blip")
    neff = next(p for p in repo["data"] if p.endswith("model.neff"))
    hub.faults.add("/api/models/*", "status", status=503)
    cli.ok("mount", "neff", "hf://HFFS-Test/Neff-Repo-Blip", str(mp), timeout=45)
    _warned(cli, mp, "source", "hf://HFFS-Test/Neff-Repo-Blip", "503", "resolved on first use")
    with pytest.raises(OSError) as failed:
        os.listdir(mp)
    assert failed.value.errno == errno.EIO  # still failing: EIO, never an empty cache
    hub.faults.clear()
    assert (mp / neff).read_bytes() == repo["data"][neff]
    cli.ok("umount", str(mp))


def test_no_check_mounts_without_asking_the_hub(cli: Cli, hub: HubEmulator, bucket: dict) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    hub.reset_stats()
    cli.ok("mount", "neff", BUCKET, str(mp), "--no-check", "--no-follow-events")
    assert hub.requests() == []
    assert cli.state(mp)["checks"] == dict.fromkeys(("endpoint", "token", "source"), "skipped: --no-check")
    assert (mp / path).read_bytes() == data
    cli.ok("umount", str(mp))
    # fstab: nocheck
    assert cli.run(f"neff:{BUCKET}", str(mp), "-f", "-o", "nocheck", script=MOUNT_HFFS).returncode == 0


def test_missing_fuse_pieces(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    no_path = dict(cli.env, PATH="/nonexistent")  # the console script's shebang is absolute
    assert "fusermount3 not found" in cli.fails(3, "mount", "neff", BUCKET, str(mp), env=no_path)
    no_lib = dict(cli.env, FUSE_LIBRARY_NAME="hffs-no-such-fuse")
    assert "libfuse3 not found" in cli.fails(3, "mount", "neff", BUCKET, str(mp), env=no_lib)
    no_lib = dict(cli.env, FUSE_LIBRARY_PATH="/nonexistent/libfuse3.so.3")
    assert "libfuse not found" in cli.fails(3, "mount", "neff", BUCKET, str(mp), env=no_lib)
    assert_nothing_left(cli, mp)


# -- secrets --------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_tokens_are_never_printed_or_recorded(cli: Cli, hub: HubEmulator, bucket: dict, hub_token: str) -> None:
    hub.add_repo("HFFS-Test/Gated", {"config.json": b"{}"}, gated=True)
    path, data = a_neff(bucket)
    token_file = cli.tmp / "token"
    token_file.write_text(hub_token + "\n")
    mp1, mp2, mp3 = cli.mountpoint(), cli.mountpoint(), cli.mountpoint()
    env_token = dict(cli.env, HF_TOKEN=hub_token)
    debug = ("--log-level", "DEBUG")

    cli.ok("mount", "hub-cache", str(mp1), "--repo", "HFFS-Test/Gated", "--token-file", str(token_file), *debug)
    cli.ok("mount", "neff", BUCKET, str(mp2), "--token", hub_token, *debug)
    cli.ok("mount", "hub-cache", str(mp3), "--repo", "HFFS-Test/Gated", *debug, env=env_token)
    assert (mp2 / path).read_bytes() == data
    for mp in (mp1, mp2, mp3):
        cmdline = Path(f"/proc/{cli.state(mp)['pid']}/cmdline").read_bytes()
        assert hub_token.encode() not in cmdline  # `ps` never shows it
        environ = Path(f"/proc/{cli.state(mp)['pid']}/environ").read_bytes().split(b"\0")
        assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ  # see with_huge_page_malloc
    cli.ok("prefetch", str(mp2 / path), env=env_token)
    time.sleep(1.2)  # let the daemons write their state files once more, counters included
    cli.ok("status", env=env_token)
    cli.ok("status", "--json", env=env_token)
    # Errors that echo arguments back must mask the token too.
    cli.fails(2, "mount", "neff", hub_token, str(cli.tmp / "x"), "--token", hub_token)
    cli.fails(2, "mount", "neff", BUCKET, str(mp1), "--token", hub_token, hub_token)
    cli.fails(5, "mount", "neff", "Nobody/Nothing", str(cli.mountpoint()), "--token", SECRET)
    cli.fails(2, "mount", "neff", BUCKET, str(cli.tmp / "x"), "--token-file", str(token_file), f"--x={hub_token}")
    for mp in (mp1, mp2, mp3):
        cli.ok("umount", str(mp), env=env_token)

    printed = "".join(cli.outputs)
    assert hub_token not in printed and SECRET not in printed
    files = [p for p in cli.tmp.rglob("*") if p.is_file() and p != token_file]
    assert any(p.suffix == ".log" for p in files)  # the daemons did log (at DEBUG)
    for p in files:
        content = p.read_bytes()
        assert hub_token.encode() not in content and SECRET.encode() not in content, p


def test_daemon_log_has_its_stderr(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    log = cli.tmp / "logs" / "daemon.log"
    cli.fails(4, "mount", "neff", "Nobody/Nothing", str(mp), "--log-file", str(log))
    # The daemon's own stderr (where libfuse and Python print their errors) is in the log file.
    assert "hffs daemon: bucket Nobody/Nothing: not found" in log.read_text()
    cli.mount_neff(mp, "--log-file", str(log))
    assert cli.state(mp)["log_file"] == str(log)
    assert str(log) in cli.ok("status")
    cli.ok("umount", str(mp))
    assert f"mounting neff view of {BUCKET}" in log.read_text()


@pytest.mark.timeout(60)
def test_python_api_mirrors_the_cli(cli: Cli, bucket: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import hffs_neuron
    from hffs_neuron import constants

    monkeypatch.setattr(constants, "RUNTIME_DIR", cli.runtime)  # read at import time, like the CLI's env
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    cache = cli.tmp / "api-cache"
    cli.mount_neff(mp, "--cache-dir", str(cache))
    (state,) = hffs_neuron.status(mp)
    assert (state["view"], state["health"]) == ("neff", "running")
    result = hffs_neuron.prefetch([mp / path])
    assert (result.files, result.bytes, result.failures) == (1, len(data), [])
    assert hffs_neuron.cache_usage(cache) == (len(data), 1)
    assert "unmounted" in hffs_neuron.unmount(mp)
    assert [s for s in hffs_neuron.status() if s["mountpoint"] == str(mp)] == []
    assert hffs_neuron.cache_prune(cache, "0") == (len(data), 0)


# -- hardening: tokens, config and logs out of other users' reach ------------------------------------
def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


# Processes started under this see each other's /proc/<pid>/fd only while dumpable: same uid, same
# capabilities, and no CAP_SYS_PTRACE to override PR_SET_DUMPABLE 0.
NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"]


def _ptrace_readable(pid: int) -> bool:
    result = subprocess.run([*NO_PTRACE, "readlink", f"/proc/{pid}/fd/0"], capture_output=True, timeout=10)
    return result.returncode == 0


@pytest.mark.timeout(90)
def test_literal_token_is_hidden_from_the_process_list(cli: Cli, bucket: dict, hub_token: str) -> None:
    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    proc = subprocess.Popen(
        [MOUNTCTL, "mount", "neff", BUCKET, str(mp), "--foreground", "--token", hub_token],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.path.ismount(mp) and cli.status(), what="the foreground mount")
        assert (mp / path).read_bytes() == data
        cmdline = _cmdline(proc.pid)
        assert hub_token.encode() not in cmdline, cmdline  # what `ps` and every local user see
        assert b"--token ***" in cmdline and str(mp).encode() in cmdline
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert hub_token not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_token_from_standard_input(cli: Cli, hub: HubEmulator, hub_token: str) -> None:
    hub.add_repo("HFFS-Test/Gated", {"config.json": b"{}"}, gated=True)
    mp = cli.mountpoint()
    args = [MOUNTCTL, "mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Gated", "--token", "-"]
    result = subprocess.run(args, input=hub_token + "\n", env=cli.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # a gated repo: the token from stdin was used
    assert hub_token.encode() not in _cmdline(cli.state(mp)["pid"])
    cli.ok("umount", str(mp))
    result = subprocess.run(args, input="", env=cli.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--token is empty" in result.stderr
    assert "--token-file" in cli.ok("mount", "neff", "--help")  # the help names the safe ways


@pytest.mark.timeout(90)
def test_daemon_config_is_not_on_its_command_line(cli: Cli, hub: HubEmulator) -> None:
    hub.add_repo("HFFS-Test/Secret-Project-X", {"config.json": b"{}"})
    mp = cli.mountpoint()
    cache = cli.tmp / "secret-cache-dir"
    cli.ok("mount", "hub-cache", str(mp), "--repo", "HFFS-Test/Secret-Project-X", "--cache-dir", str(cache))
    state = cli.state(mp)
    cmdline = _cmdline(state["pid"])
    assert b"Secret-Project-X" not in cmdline and str(cache).encode() not in cmdline, cmdline
    assert str(mp).encode() in cmdline  # only the (public) mountpoint, to tell daemons apart
    assert state["options"]["repos"] == ["HFFS-Test/Secret-Project-X"]  # the config did arrive
    assert (mp / "models--HFFS-Test--Secret-Project-X" / "refs" / "main").exists()
    cli.ok("umount", str(mp))


@pytest.mark.timeout(120)
def test_private_modes_and_no_core_dumps(cli: Cli, bucket: dict) -> None:
    control = subprocess.Popen([*NO_PTRACE, "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: _cmdline(control.pid).startswith(b"sleep"), what="the control process")
        if not _ptrace_readable(control.pid):
            pytest.skip("setpriv cannot drop CAP_SYS_PTRACE here")
        cli.runtime.mkdir(mode=0o755)
        cli.runtime.chmod(0o755)  # as an older version left it: tightened, with a warning
        mp, fg = cli.mountpoint(), cli.mountpoint()
        out = cli.ok(*NO_PTRACE[1:], MOUNTCTL, "mount", "neff", BUCKET, str(mp), script=NO_PTRACE[0])
        assert "mounted neff view" in out
        pid = cli.state(mp)["pid"]
        fg_log = cli.tmp / "logs" / "fg.log"
        proc = subprocess.Popen(
            # Its own cache dir: one mount per bucket layer on a host.
            [*NO_PTRACE, MOUNTCTL, "mount", "neff", BUCKET, str(fg), "--foreground", "--log-file", str(fg_log)]
            + ["--cache-dir", str(cli.tmp / "fg-cache")],
            env=cli.env,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: os.path.ismount(fg) and len(cli.status()) == 2, what="the foreground mount")
            for daemon in (pid, proc.pid):
                limits = Path(f"/proc/{daemon}/limits").read_text()
                (core,) = [line for line in limits.splitlines() if line.startswith("Max core file size")]
                assert core.split()[4:6] == ["0", "0"], core
                assert not _ptrace_readable(daemon)  # PR_SET_DUMPABLE 0
            mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
            assert mode(cli.runtime) == 0o700
            states = list(cli.runtime.glob("*.json"))
            assert len(states) == 2 and all(mode(s) == 0o600 for s in states)
            assert mode(cli.state(mp)["log_file"]) == 0o600 and mode(fg_log) == 0o600
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        cli.ok("umount", str(mp))
    finally:
        control.kill()
        control.wait()


@pytest.mark.parametrize("foreground", [False, True])
@pytest.mark.timeout(60)
def test_log_file_symlink_is_refused(cli: Cli, bucket: dict, foreground: bool) -> None:
    victim = cli.tmp / "victim"
    victim.write_text("precious\n")
    link = cli.tmp / "planted.log"
    link.symlink_to(victim)
    mp = cli.mountpoint()
    line = cli.fails(3, "mount", "neff", BUCKET, str(mp), "--log-file", str(link), *(["--foreground"] * foreground))
    assert str(link) in line and "symbolic link" in line
    assert victim.read_text() == "precious\n" and link.is_symlink()
    assert_nothing_left(cli, mp)


@pytest.mark.timeout(90)
def test_mount_hffs_refuses_token_options_in_any_spelling(cli: Cli, bucket: dict) -> None:
    mp = cli.mountpoint()
    for key in ("token", "Token", "TOKEN", "hf_token", "HF-Token"):
        line = cli.fails(2, f"neff:{BUCKET}", str(mp), "-o", f"ro,{key}={SECRET}", script=MOUNT_HFFS)
        assert "token_file" in line and SECRET not in line, line
    line = cli.fails(2, f"neff:{BUCKET}", str(mp), "-o", f"acess_tokn={SECRET}", script=MOUNT_HFFS)
    assert "unknown option 'acess_tokn=...'" in line  # a misspelt key: its value is never shown
    assert SECRET not in "".join(cli.outputs)
    assert_nothing_left(cli, mp)


@pytest.mark.timeout(90)
def test_mount_hffs_x_options_fake_mode_and_option_like_sources(cli: Cli, bucket: dict) -> None:
    from mountctl.cli import build_parser, mount_helper_argv

    path, data = a_neff(bucket)
    mp = cli.mountpoint()
    cache = cli.tmp / "fstab-cache"
    systemd = "x-systemd.automount,x-systemd.requires=network-online.target,x-gvfs-hide,comment=systemd.automount"
    opts = f"{systemd},_netdev,cache_dir={cache}"
    # -f: everything is checked, nothing is mounted.
    assert cli.run(f"neff:{BUCKET}", str(mp), "-f", "-o", opts, script=MOUNT_HFFS).returncode == 0
    assert cli.run(f"neff:{BUCKET}", str(mp), "-fnv", "-o", opts, script=MOUNT_HFFS).returncode == 0
    assert not os.path.ismount(mp) and cli.status() == []
    assert "bad size" in cli.fails(2, f"neff:{BUCKET}", str(mp), "-f", "-o", "cache_size=12X", script=MOUNT_HFFS)
    # The same options for real: x- options are ignored, the mount works.
    assert "mounted neff view" in cli.ok(f"neff:{BUCKET}", str(mp), "-o", opts, script=MOUNT_HFFS)
    assert (mp / path).read_bytes() == data
    cli.ok("umount", str(mp))

    # A source that looks like an option stays a source: with this Python's argparse subparsers...
    mapped, fake = mount_helper_argv([f"neff:--token={SECRET}", str(mp), "-o", "ro"])
    args = build_parser().parse_args(mapped)
    assert (args.bucket_id, args.token, args.read_only, fake) == (f"--token={SECRET}", None, True, False)
    args = build_parser().parse_args(mount_helper_argv(["hub-cache", "--foreground"])[0])
    assert (args.mountpoint, args.foreground) == ("--foreground", False)
    # ... and end to end: a bad bucket id, never a token, and never printed.
    line = cli.fails(2, f"neff:--token={SECRET}", str(mp), script=MOUNT_HFFS)
    assert "invalid bucket id" in line and SECRET not in "".join(cli.outputs)
    assert_nothing_left(cli, mp)


def test_daemon_malloc_uses_huge_pages_and_keeps_the_users_tunables() -> None:
    assert with_huge_page_malloc(None) == "glibc.malloc.hugetlb=1"
    assert with_huge_page_malloc("glibc.malloc.arena_max=4") == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert with_huge_page_malloc("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"  # the user's choice wins
