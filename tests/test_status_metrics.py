"""Operating a mount: live `mountctl status` over the control socket, its fallback for a dead daemon,
`--watch`, `--check`, and the Prometheus endpoint (`--metrics-addr`), scraped over HTTP and parsed with
prometheus_client's own parser after real reads through real mounts.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Mounts
from prometheus_client.parser import text_string_to_metric_families

from hffs_neuron import telemetry
from hffs_neuron.errors import MountError, UsageError
from hffs_neuron.runtime import read_state
from hffs_neuron.testing.hub_emulator import HubEmulator

pytestmark = pytest.mark.timeout(120)

MOUNTCTL = str(Path(sys.executable).parent / "mountctl")
BUCKET = "ops-team/neuron-cache"
MODULE = "neuronxcc-2.21.18209.0+043b1bf7/MODULE_1111111111111111+abcdef01"


@pytest.fixture
def files(hub: HubEmulator) -> dict[str, bytes]:
    data = {
        f"{MODULE}/model.neff": os.urandom(3 * 1024 * 1024 + 17),
        f"{MODULE}/model.done": b"",
        f"{MODULE}/compile_flags.json": b'["--target=trn1"]',
    }
    hub.add_bucket(BUCKET, data)
    return data


def mountctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MOUNTCTL, *args], env=env, capture_output=True, text=True, timeout=60)


def status_json(env: dict[str, str], mountpoint: Path) -> dict:
    result = mountctl(env, "status", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    (state,) = json.loads(result.stdout)["mounts"]
    return state


def test_status_is_live_right_after_a_read(
    hub: HubEmulator, files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str], hub_token: str
) -> None:
    mp = Path(mounts("neff", BUCKET, token=hub_token).mountpoint)
    neff = files[f"{MODULE}/model.neff"]
    before = status_json(runtime_env, mp)
    assert before["live"] and before["counters"]["fetches"] == 0

    assert (mp / MODULE / "model.neff").read_bytes() == neff
    state = status_json(runtime_env, mp)  # at once: no waiting for a state file to be rewritten
    c = state["counters"]
    assert (c["fetches"], c["bytes_fetched"], c["misses"], c["hits"]) == (1, len(neff), 1, 0)
    assert state["transfers"] == {"http": {"count": 1, "bytes": len(neff)}, "xet": {"count": 0, "bytes": 0}}
    assert state["cache"]["used_bytes"] >= len(neff) and state["cache"]["limit_bytes"] == 50 * 1024**3
    assert state["cache"]["dir"] == state["cache_dir"]
    assert c["http_requests"] >= 1 and c["http_status"].get("2xx", 0) >= 1
    # The whole schema of README "Status and metrics", with neutral values for parts other subsystems fill in.
    assert (state["view"], state["source"], state["mountpoint"]) == ("neff", BUCKET, str(mp))
    assert state["alive"] is True and state["pid"] > 0 and state["uptime_s"] >= 0
    assert state["in_flight"] == []
    assert state["read_ahead"] == {"queued": 0, "in_flight": 0, "done": 0}
    assert state["publish"] == {
        "mode": "off",
        "published": 0,
        "pending": 0,
        "failed": [],
        "untrusted": [],
        "conflicts": [],
    }
    assert state["follow"] in ("events", "probe", "ttl") and state["stale_locks"] == []

    assert (mp / MODULE / "model.neff").read_bytes() == neff  # page cache: may not even reach the daemon
    with pytest.raises(FileNotFoundError):
        os.stat(mp / MODULE / "model.log")
    c = status_json(runtime_env, mp)["counters"]
    assert c["fetches"] == 1 and c["errors"].get("ENOENT", 0) >= 1

    # Nothing the control socket says carries the token (it answers its owner only: test_operations.py).
    text = mountctl(runtime_env, "status").stdout + mountctl(runtime_env, "status", "--json").stdout
    assert hub_token not in text
    assert "misses 1  fetches 1  fetched 3.0 MiB" in text, text


def test_dead_daemon_shows_its_last_saved_state(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    handle = mounts("neff", BUCKET)
    mp = Path(handle.mountpoint)
    (mp / MODULE / "model.neff").read_bytes()
    deadline = time.monotonic() + 10  # the daemon saves its state once a second
    while (read_state(str(mp)) or {}).get("counters", {}).get("fetches") != 1:
        assert time.monotonic() < deadline, "the state file never recorded the fetch"
        time.sleep(0.1)
    os.kill(handle.pid, signal.SIGKILL)
    handle.process.wait(timeout=10)

    state = status_json(runtime_env, mp)
    assert (state["alive"], state["live"], state["health"]) == (False, False, "dead")
    assert state["counters"]["fetches"] == 1 and state["cache"]["used_bytes"] >= len(files[f"{MODULE}/model.neff"])
    text = mountctl(runtime_env, "status", str(mp)).stdout
    assert "DEAD daemon" in text and "fetches 1" in text
    check = mountctl(runtime_env, "status", str(mp), "--check")
    assert check.returncode == 3 and "not running" in check.stderr


def test_watch_refreshes_until_interrupted_and_check_passes(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    mp = Path(mounts("neff", BUCKET).mountpoint)
    assert mountctl(runtime_env, "status", str(mp), "--json", "--check").returncode == 0
    watch = subprocess.Popen(
        [MOUNTCTL, "status", "--watch", "--interval", "0.2"],
        env=runtime_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert out.count(f"{mp}: neff view of {BUCKET}") >= 2


def test_watch_into_a_pipe_that_closes_ends_quietly(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    mp = mounts("neff", BUCKET).mountpoint
    result = subprocess.run(
        f"{MOUNTCTL} status {mp} --watch --interval 0.1 | head -n 1",
        shell=True,
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=60,
        executable="/bin/bash",
    )
    assert result.stdout.count("\n") == 1 and "neff view of" in result.stdout
    assert result.stderr == ""  # no "mountctl: : Broken pipe"
    piped = subprocess.run(
        ["/bin/bash", "-o", "pipefail", "-c", f"{MOUNTCTL} status {mp} --watch --interval 0.1 | head -n 1 >/dev/null"],
        env=runtime_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr


@pytest.mark.timeout(60)
def test_watch_on_a_small_terminal_fits_it_in_the_alternate_screen(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    import fcntl
    import pty
    import struct
    import termios

    for n in range(3):  # more lines than the terminal holds
        mounts("neff", BUCKET, name=f"mnt{n}", cache=f"cache{n}")
    rows, columns = 8, 50
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    watch = subprocess.Popen(
        [MOUNTCTL, "status", "--watch", "--interval", "0.2"], env=runtime_env, stdout=follower, stderr=follower
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                output += os.read(leader, 65536)
            except OSError:
                break
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=30)
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        os.close(leader)
    text = output.decode(errors="replace")
    assert watch.returncode == 0
    assert text.startswith("\x1b[?1049h") and text.rstrip().endswith("\x1b[?1049l")  # the screen comes back
    frames = [f for f in text.split("\x1b[H\x1b[2J")[1:] if f.strip()]
    assert len(frames) >= 2
    for frame in frames:
        lines = frame.replace("\x1b[?1049l", "").replace("\r", "").split("\n")
        assert len(lines) <= rows - 1 and all(len(line) <= columns for line in lines), lines
    assert "more lines: a taller terminal" in frames[0]


# -- Prometheus ----------------------------------------------------------------------------------------
def scrape(address: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from /metrics, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_endpoint_after_real_reads(
    hub: HubEmulator, files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str], hub_token: str
) -> None:
    mp = Path(mounts("neff", BUCKET, token=hub_token, metrics_addr="127.0.0.1:0").mountpoint)
    address = status_json(runtime_env, mp)["metrics_addr"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    neff = files[f"{MODULE}/model.neff"]
    assert (mp / MODULE / "model.neff").read_bytes() == neff
    assert (mp / MODULE / "compile_flags.json").read_bytes() == files[f"{MODULE}/compile_flags.json"]
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.stat(mp / MODULE / "model.log")

    m = scrape(address)
    assert m["hffs_cache_misses_total"][()] == 2 and m["hffs_cache_hits_total"][()] == 0
    assert m["hffs_transfers_total"][(("path", "http"),)] == 2
    assert m["hffs_transfer_bytes_total"][(("path", "http"),)] == len(neff) + len(files[f"{MODULE}/compile_flags.json"])
    assert m["hffs_transfers_total"][(("path", "xet"),)] == 0
    assert m["hffs_errors_total"][(("errno", "ENOENT"),)] >= 1
    assert m["hffs_upstream_responses_total"][(("status_class", "2xx"),)] >= 2
    assert m["hffs_cache_used_bytes"][()] >= len(neff)
    assert m["hffs_fetches_in_flight"][()] == 0 and m["hffs_stale_locks"][()] == 0
    assert m["hffs_fuse_operation_seconds_count"][(("operation", "open"),)] >= 2
    assert m["hffs_upstream_request_seconds_count"][(("status_class", "2xx"),)] >= 2
    # Labels come from small fixed sets: no file names, no token.
    labels: dict[str, set[str]] = {}
    for samples in m.values():
        for key in samples:
            for name, value in key:
                labels.setdefault(name, set()).add(value)
    assert set(labels) <= {"path", "errno", "status_class", "operation", "kind", "le"}
    assert labels["path"] <= {"http", "xet"} and labels["errno"] <= set(errno.errorcode.values())
    assert labels["status_class"] <= {"2xx", "3xx", "4xx", "5xx", "error"}
    assert all(op.isidentifier() and "model" not in op for op in labels["operation"])
    assert not any(hub_token in value for values in labels.values() for value in values)


@pytest.mark.timeout(90)
def test_metrics_server_keeps_threads_bounded_under_400_idle_connections(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    import socket

    handle = mounts("neff", BUCKET, metrics_addr="127.0.0.1:0")
    address = status_json(runtime_env, Path(handle.mountpoint))["metrics_addr"]
    host, port = address.rsplit(":", 1)
    scrape(address)
    threads_before = len(os.listdir(f"/proc/{handle.pid}/task"))
    idle = []
    try:
        for n in range(400):  # half-sent requests, never finished
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /metr" if n % 2 else b"")
            idle.append(sock)
        started = time.monotonic()
        assert "hffs_cache_hits_total" in scrape(address)  # answered while all 400 wait
        assert time.monotonic() - started < 5
        assert len(os.listdir(f"/proc/{handle.pid}/task")) <= threads_before + 1
        # Each idle connection is closed once its time is up (5 s), none kept forever.
        time.sleep(telemetry.METRICS_TIMEOUT + 1.5)
        for sock in idle:
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.timeout(60)
def test_scrapes_reuse_the_cache_disk_use_figure(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    mp = Path(mounts("neff", BUCKET, metrics_addr="127.0.0.1:0").mountpoint)
    state = status_json(runtime_env, mp)
    first = scrape(state["metrics_addr"])["hffs_cache_used_bytes"][()]
    (Path(state["cache"]["dir"]) / "xet" / "more.bin").write_bytes(b"x" * 1_000_000)  # counted as cache use
    assert scrape(state["metrics_addr"])["hffs_cache_used_bytes"][()] == first  # no walk of the cache per scrape
    assert status_json(runtime_env, mp)["cache"]["used_bytes"] >= first + 1_000_000  # status measures it now


@pytest.mark.timeout(120)
def test_xet_requests_are_counted_as_the_hub_saw_them(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    data = os.urandom(40 * 1024 * 1024)  # more than one Xet piece: several streams
    hub.add_bucket("org/xet-counted", {"big.bin": data, "small.bin": b"small"})
    hub.prepare_xet()
    xet_env = {k: v for k, v in runtime_env.items() if k != "HF_HUB_DISABLE_XET"}
    mp = Path(mounts("neff", "org/xet-counted", env=xet_env, metrics_addr="127.0.0.1:0").mountpoint)
    hub.reset_stats()
    assert (mp / "big.bin").read_bytes() == data and (mp / "small.bin").read_bytes() == b"small"
    state = status_json(runtime_env, mp)
    assert state["transfers"]["xet"]["count"] == 2
    counted = state["counters"]["xet_requests"]
    assert counted["token"] == len(hub.requests("/xet-read-token")) >= 1
    assert counted["reconstruction"] == len(hub.requests("/reconstructions/")) >= 2
    samples = scrape(state["metrics_addr"])["hffs_xet_requests_total"]
    assert samples[(("kind", "token"),)] == counted["token"]
    assert samples[(("kind", "reconstruction"),)] == counted["reconstruction"]


def test_metrics_addr_is_off_by_default_and_refused_when_bad_or_taken(
    files: dict[str, bytes], mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    mp = Path(mounts("neff", BUCKET, metrics_addr="127.0.0.1:0").mountpoint)
    taken = status_json(runtime_env, mp)["metrics_addr"]
    with pytest.raises(UsageError, match="HOST:PORT"):
        mounts("neff", BUCKET, name="bad", metrics_addr="localhost")
    with pytest.raises(MountError, match="--metrics-addr"):
        mounts("neff", BUCKET, name="taken", cache="cache2", metrics_addr=taken)
    assert (
        status_json(runtime_env, Path(mounts("neff", BUCKET, name="plain", cache="cache3").mountpoint))["metrics_addr"]
        is None
    )


def test_metrics_addr_three_ways() -> None:
    """CLI flag, fstab option (mount.hffs) and environment default (HFFS_METRICS_ADDR)."""
    from mountctl.cli import build_parser, mount_helper_argv

    argv, fake = mount_helper_argv(["neff:org/cache", "/mnt/nc", "-o", "metrics_addr=127.0.0.1:9100,_netdev"])
    assert not fake
    assert argv[argv.index("--metrics-addr") + 1] == "127.0.0.1:9100"
    assert build_parser().parse_args(argv).metrics_addr == "127.0.0.1:9100"
    env = dict(os.environ, HFFS_METRICS_ADDR="0.0.0.0:9200")
    code = "from mountctl.cli import build_parser as b; print(b().parse_args(['mount', 'hub-cache', 'm']).metrics_addr)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.0.0.0:9200"


def test_daemon_threads_are_reported_and_a_dead_one_fails_check(
    files: dict[str, bytes],
    mounts: Mounts,
    runtime_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`threads` lists the daemon's long-lived threads; `status --check` fails naming any that died. A real
    daemon's threads do not die on demand, so the dead one is put into its live answer as read here."""
    from mountctl import cli

    mount_module = importlib.import_module("hffs_neuron.mount")  # the package exports a function of that name

    mp = Path(mounts("neff", BUCKET, metrics_addr="127.0.0.1:0").mountpoint)
    threads = status_json(runtime_env, mp)["threads"]
    assert threads == {name: "ok" for name in ("hffs-stats", "hffs-status", "hffs-stale-locks", "hffs-metrics")}
    assert mountctl(runtime_env, "status", str(mp), "--check").returncode == 0

    real_query = mount_module.query_status

    def one_thread_dead(*args: object) -> dict | None:
        answer = real_query(*args)
        if answer is not None:
            answer["threads"]["hffs-stale-locks"] = "RuntimeError: boom"
        return answer

    monkeypatch.setattr(mount_module, "query_status", one_thread_dead)
    capsys.readouterr()
    assert cli.main(["status", str(mp), "--check"]) == 3
    out, err = capsys.readouterr()
    assert "DEAD thread hffs-stale-locks: RuntimeError: boom" in out
    assert f"mountctl: {mp}: daemon thread hffs-stale-locks died: RuntimeError: boom" in err.splitlines()
    assert "hffs-stats" not in err


def test_daemon_raises_its_open_file_limit(
    files: dict[str, bytes], mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon
    try:
        handle = mounts("neff", BUCKET)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{handle.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]
