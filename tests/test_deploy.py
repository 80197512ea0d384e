"""Fleet deployment files under scripts/deploy/: every Kubernetes manifest parses, every `mountctl` command
line in a manifest or script is accepted by the real argument parser, the DaemonSet has what a FUSE
daemon needs, and the Slurm prolog/epilog pair really mounts, keeps, recovers and unmounts.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hffs_neuron.runtime import mountpoint_status, read_state
from hffs_neuron.testing.hub_emulator import HubEmulator
from mountctl.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "scripts" / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
MOUNTCTL = str(Path(sys.executable).parent / "mountctl")
_SHELL_SEPARATORS = {"&&", "||", ";", "|", "!", "if", "then", "elif", "else", "fi", "do", "done", "while"}


def _documents() -> Iterator[tuple[Path, Any]]:
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield path, document


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _from_shell(text: str) -> Iterator[list[str]]:
    """mountctl argv in shell text, with `${NAME:-default}` -> default, other variables -> "x"."""
    text = text.replace("\\\n", " ")
    text = re.sub(r'"\$\{?(HFFS_)?MOUNTCTL(:-[^}]*)?\}?"', "mountctl", text)
    text = re.sub(r'"\$\{token\[@\]\}"', "--token-file x", text)
    text = re.sub(r'"\$\{publish_from\[@\]\}"', "--publish-from x", text)
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{?\w+\}?", "x", text)
    for line in text.splitlines():
        if "mountctl" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.replace(";", " ; "), comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in _SHELL_SEPARATORS or word.startswith((">", "2>")):
                if command and os.path.basename(command[0]) == "mountctl":
                    yield command[1:]
                command = []
            else:
                command.append(word)


def mountctl_command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path, document in _documents():
        for node in _walk(document):
            if isinstance(node, list) and node and all(isinstance(w, str) for w in node):
                if os.path.basename(node[0]) == "mountctl":
                    found.append((path.name, node[1:]))
                elif node[0] in ("sh", "bash") and any("mountctl" in w for w in node):
                    found += [(path.name, argv) for argv in _from_shell(node[-1])]
    for path in SCRIPTS:
        found += [(path.name, argv) for argv in _from_shell(path.read_text())]
    return found


def test_every_mountctl_command_line_is_accepted_by_the_parser() -> None:
    lines = mountctl_command_lines()
    commands = {(name, argv[0], argv[1] if argv[0] == "mount" else "") for name, argv in lines}
    # What the deployment needs: both views mounted, readiness, clean unmount, in both kinds of files.
    for expected in (
        ("hffs-neuron.yaml", "mount", "neff"),
        ("hffs-neuron.yaml", "mount", "hub-cache"),
        ("hffs-neuron.yaml", "status", ""),
        ("hffs-neuron.yaml", "umount", ""),
        ("prolog.sh", "mount", "neff"),
        ("prolog.sh", "mount", "hub-cache"),
        ("epilog.sh", "umount", ""),
    ):
        assert expected in commands, f"{expected} missing from {sorted(commands)}"
    parser = build_parser()
    for name, argv in lines:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: mountctl {shlex.join(argv)} is refused by the parser")
        if args.command == "mount":
            assert args.allow_other and args.token_file, f"{name}: {argv}: shared by the node's users, token in a file"
        if args.command == "status":
            assert args.json and args.check, f"{name}: {argv}: readiness needs a failing exit code"


def test_daemonset_has_what_a_fuse_daemon_needs() -> None:
    (daemonset,) = [d for _, d in _documents() if d.get("kind") == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True  # stale compile locks are attributed by pid
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes["cache"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert "secretName" in volumes["token"]["secret"]
    for container in pod["containers"]:
        assert container["securityContext"]["privileged"] is True
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["mounts"]["mountPropagation"] == "Bidirectional"
        assert {"fuse", "cache", "token"} <= set(mounts)
        command = container["command"]
        assert "--foreground" in command  # the container's lifetime is the mount's lifetime
        mountpoint = command[command.index("--foreground") - 1]
        assert container["readinessProbe"]["exec"]["command"][:3] == ["mountctl", "status", mountpoint]
        assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["mountctl", "umount"]
        assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == mountpoint
        # Metrics on the pod's own address (downward API), never every interface.
        addr = command[command.index("--metrics-addr") + 1]
        assert addr.startswith("$(POD_IP):"), addr
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        ports = {p["containerPort"] for p in container["ports"]}
        assert int(addr.rsplit(":", 1)[1]) in ports
    # ... and only the scraper may reach those ports.
    (policy,) = [d for _, d in _documents() if d.get("kind") == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert policy["spec"]["podSelector"] == daemonset["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    metrics_ports = {p["containerPort"] for c in pod["containers"] for p in c["ports"]}
    for rule in policy["spec"]["ingress"]:
        assert rule["from"] and all(peer.get("podSelector", {}).get("matchLabels") for peer in rule["from"])
        assert {p["port"] for p in rule["ports"]} == metrics_ports
    workload = next(d for _, d in _documents() if d.get("kind") == "Pod")
    for mount in workload["spec"]["containers"][0]["volumeMounts"]:
        assert mount["mountPropagation"] == "HostToContainer"


# -- the Slurm pair, run for real -------------------------------------------------------------------
@pytest.fixture
def slurm_env(tmp_path: Path, hub: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    from hffs_neuron import constants

    hub.add_bucket("ops-team/slurm-cache", {"neuronxcc-2/MODULE_1+abcdef01/model.neff": b"neff" * 100})
    runtime = tmp_path / "run"
    monkeypatch.setattr(constants, "RUNTIME_DIR", runtime)
    env = dict(
        os.environ,
        HFFS_MOUNTCTL=MOUNTCTL,
        HFFS_NEFF_BUCKET="ops-team/slurm-cache",
        HFFS_NEFF_MOUNT=str(tmp_path / "neuron-cache"),
        HFFS_HUB_MOUNT=str(tmp_path / "hub"),
        HFFS_CACHE_DIR=str(tmp_path / "cache"),
        HFFS_CACHE_SIZE="1G",
        HFFS_TOKEN_FILE=str(tmp_path / "no-token"),
        HFFS_RUNTIME_DIR=str(runtime),
        HFFS_SLURM_LOCK_DIR=str(tmp_path / "slurm-lock"),
    )
    try:
        yield env
    finally:
        for name in ("neuron-cache", "hub"):
            subprocess.run(["fusermount3", "-uz", str(tmp_path / name)], capture_output=True, timeout=30)


def _run(script: str, env: dict[str, str], **extra: str) -> None:
    result = subprocess.run(
        ["bash", str(DEPLOY / "slurm" / script)], env={**env, **extra}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.timeout(180)
def test_slurm_prolog_mounts_once_and_epilog_recovers_and_unmounts(slurm_env: dict[str, str]) -> None:
    neff, hub = Path(slurm_env["HFFS_NEFF_MOUNT"]), Path(slurm_env["HFFS_HUB_MOUNT"])
    _run("prolog.sh", slurm_env)
    assert os.path.ismount(neff) and os.path.ismount(hub)
    assert (neff / "neuronxcc-2" / "MODULE_1+abcdef01" / "model.neff").read_bytes() == b"neff" * 100
    pids = read_state(str(neff))["pid"], read_state(str(hub))["pid"]

    _run("prolog.sh", slurm_env)  # the next job on the node: the running mounts are kept
    _run("epilog.sh", slurm_env)
    assert (read_state(str(neff))["pid"], read_state(str(hub))["pid"]) == pids

    os.kill(pids[0], signal.SIGKILL)  # a crashed daemon: the epilog clears it, the next prolog remounts
    _run("epilog.sh", slurm_env)
    assert mountpoint_status(str(neff)) == "ok"
    _run("prolog.sh", slurm_env)
    assert os.path.ismount(neff) and read_state(str(neff))["pid"] != pids[0]

    _run("epilog.sh", slurm_env, HFFS_SLURM_UNMOUNT="1")
    assert not os.path.ismount(neff) and not os.path.ismount(hub)
    assert read_state(str(neff)) is None and read_state(str(hub)) is None
