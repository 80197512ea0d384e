"""The Slurm prolog/epilog pair run as root with a job's environment (issue 27): the settings file is
exported to mountctl, a setting that is set but empty turns its part off, the lock is a root-only
directory that a planted symlink cannot redirect, and a held lock makes the prolog wait, then fail.

mountctl is reached through a wrapper that logs each command line (with the HF_ENDPOINT it was given)
and refuses any path under /mnt, so a script that falls back to its defaults never touches the host.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hffs_neuron import constants
from hffs_neuron.runtime import mountpoint_status
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

SLURM = Path(__file__).resolve().parent.parent / "scripts" / "deploy" / "slurm"
MOUNTCTL = str(Path(sys.executable).parent / "mountctl")
BUCKET = "ops-team/neuron-cache"


@dataclass
class Node:
    tmp: Path
    env: dict[str, str]  # the job's environment: no HF_ENDPOINT, no HFFS_* setting of the conf file
    conf: Path
    log: Path  # one line per mountctl call: "HF_ENDPOINT=... | argv"
    lock: Path
    neff: Path
    hub_mount: Path
    bucket: dict
    endpoint: str  # the emulator's

    def write_conf(self, **overrides: str) -> None:
        settings = {
            "HF_ENDPOINT": self.endpoint,
            "HFFS_NEFF_BUCKET": BUCKET,
            "HFFS_NEFF_MOUNT": str(self.neff),
            "HFFS_HUB_MOUNT": str(self.hub_mount),
            "HFFS_CACHE_DIR": str(self.tmp / "cache"),
            "HFFS_CACHE_SIZE": "1G",
            "HFFS_TOKEN_FILE": str(self.tmp / "no-token"),
            "HFFS_RUNTIME_DIR": str(self.tmp / "run"),
            **overrides,
        }
        self.conf.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))

    def run(self, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SLURM / script)], env={**self.env, **extra}, capture_output=True, text=True, timeout=120
        )

    def calls(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def node(tmp_path: Path, hub: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    assert os.geteuid() == 0, "the Slurm scripts run as root"
    bucket = build_neff_bucket(hub, BUCKET)
    monkeypatch.setattr(constants, "RUNTIME_DIR", tmp_path / "run")
    log = tmp_path / "mountctl.log"
    wrapper = tmp_path / "mountctl"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'printf "HF_ENDPOINT=%s | %s\\n" "${{HF_ENDPOINT-}}" "$*" >> {log}\n'
        'for arg in "$@"; do case $arg in /mnt/*) echo "test wrapper: refusing $arg" >&2; exit 97;; esac; done\n'
        f'exec {MOUNTCTL} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HFFS_", "HF_ENDPOINT", "HF_TOKEN"))}
    lock = tmp_path / "slurm-lock"
    env.update(
        HFFS_MOUNTCTL=str(wrapper),  # also in the environment: a script that ignores the conf still logs
        HFFS_SLURM_CONF=str(tmp_path / "hffs-neuron.conf"),
        HFFS_SLURM_LOCK_DIR=str(lock),
        HFFS_LOCK_FILE=str(lock),  # the former scripts' lock setting: the same path, for comparison
    )
    conf = tmp_path / "hffs-neuron.conf"
    result = Node(tmp_path, env, conf, log, lock, tmp_path / "neff", tmp_path / "hub", bucket, hub.url)
    try:
        yield result
    finally:
        for mountpoint in (result.neff, result.hub_mount):
            if os.path.ismount(mountpoint) or mountpoint_status(str(mountpoint)) == "stale":
                subprocess.run(
                    [MOUNTCTL, "umount", "--force", str(mountpoint)],
                    env={**os.environ, "HFFS_RUNTIME_DIR": str(tmp_path / "run")},
                    capture_output=True,
                    timeout=60,
                )
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30)


def _complete_file(node: Node) -> tuple[str, int]:
    module = node.bucket["complete"][0]
    path = next(p for p in node.bucket["files"] if p.startswith(module + "/") and p.endswith(".neff"))
    return path, node.bucket["files"][path]


@pytest.mark.timeout(180)
def test_settings_file_is_exported_to_mountctl(node: Node) -> None:
    node.write_conf()  # HF_ENDPOINT is only in the file: the emulator is reachable only if it is exported
    result = node.run("prolog.sh")
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(node.neff) and os.path.ismount(node.hub_mount)
    path, size = _complete_file(node)
    assert (node.neff / path).stat().st_size == size
    assert len((node.neff / path).read_bytes()) == size
    mounts = [line for line in node.calls().splitlines() if "| mount " in line]
    assert len(mounts) == 2 and all(line.startswith(f"HF_ENDPOINT={node.endpoint} |") for line in mounts)
    info = os.lstat(node.lock)  # created root's alone
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == 0

    result = node.run("epilog.sh", HFFS_SLURM_UNMOUNT="1")
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(node.neff) and not os.path.ismount(node.hub_mount)


@pytest.mark.timeout(180)
def test_empty_setting_turns_the_hub_cache_mount_off(node: Node) -> None:
    node.write_conf(HFFS_HUB_MOUNT="", HFFS_PUBLISH_FROM="")
    node.env["HF_ENDPOINT"] = node.endpoint  # this test is about empty values only
    result = node.run("prolog.sh")
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(node.neff) and not os.path.ismount(node.hub_mount)
    result = node.run("epilog.sh", HFFS_SLURM_UNMOUNT="1")
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(node.neff)
    calls = node.calls()
    assert "mount neff" in calls and "--publish-from" not in calls
    assert "hub-cache" not in calls and "/mnt/hffs/hub" not in calls and str(node.hub_mount) not in calls


@pytest.mark.timeout(120)
def test_a_planted_symlink_or_foreign_lock_directory_is_refused(node: Node) -> None:
    node.write_conf()
    victim = node.tmp / "victim"
    victim.write_text("precious\n")
    node.lock.symlink_to(victim)  # what a user would plant if the lock lived in a directory they can write
    for script in ("prolog.sh", "epilog.sh"):
        result = node.run(script)
        assert victim.read_text() == "precious\n", f"{script} followed the symlink"
        assert result.returncode == 1, f"{script}: {result.stderr}"
        assert len(result.stderr.splitlines()) == 1 and "symlink" in result.stderr, result.stderr
    node.lock.unlink()
    node.lock.symlink_to(node.tmp, target_is_directory=True)  # a link to a directory is refused too
    assert node.run("prolog.sh").returncode == 1
    node.lock.unlink()
    node.lock.mkdir(mode=0o755)
    os.chmod(node.lock, 0o755)  # a directory others could enter: not the lock
    result = node.run("prolog.sh")
    assert result.returncode == 1 and "0700" in result.stderr, result.stderr
    assert node.calls() == "" and not os.path.ismount(node.neff)  # refused before any mount


@pytest.mark.timeout(120)
def test_a_held_lock_makes_the_prolog_wait_then_fail(node: Node) -> None:
    node.write_conf()
    node.lock.mkdir(mode=0o700)
    holder = subprocess.Popen(["flock", str(node.lock), "sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", str(node.lock), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        start = time.monotonic()
        result = node.run("prolog.sh", HFFS_SLURM_LOCK_WAIT="2")
        waited = time.monotonic() - start
        assert result.returncode == 1 and "held" in result.stderr, result.stderr
        assert 1.8 <= waited < 30, waited
        assert node.calls() == "" and not os.path.ismount(node.neff)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    result = node.run("prolog.sh", HFFS_SLURM_LOCK_WAIT="2")
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(node.neff) and os.path.ismount(node.hub_mount)
    assert node.run("epilog.sh", HFFS_SLURM_UNMOUNT="1").returncode == 0
    assert not os.path.ismount(node.neff) and not os.path.ismount(node.hub_mount)
