"""Hostile remote names never escape the mount; tokens never leak into logs, state or cache files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.testing.hub_emulator import HubEmulator

HOSTILE_NAMES = [
    "../escape.neff",
    "/etc/hffs-escape",
    "neuronxcc-1/MODULE_ok/../../../escape",
    "neuronxcc-1/MODULE_ok/nul\x00name",
    "neuronxcc-1/MODULE_ok/ctrl\x07name",
    "neuronxcc-1/MODULE_ok/" + "L" * 300,
    "neuronxcc-1/MODULE_ok//double",
    "neuronxcc-1/MODULE_ok/./dot",
]


def _file_item(path: str, data: bytes = b"evil") -> dict:
    return {"type": "file", "path": path, "size": len(data), "xetHash": "ab" * 32, "mtime": "2024-01-01T00:00:00Z"}


@pytest.mark.timeout(120)
def test_hostile_bucket_names_are_dropped_and_logged(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    good = b"NEFF" * 1000
    hub.add_bucket("hostile/cache", {"neuronxcc-1/MODULE_ok/model.neff": good, "neuronxcc-1/MODULE_ok/model.done": b""})
    hub.add_listing_override(
        "hostile/cache",
        [_file_item(name) for name in HOSTILE_NAMES]
        + [{"type": "directory", "path": "neuronxcc-1/MODULE_ok/dup"}, _file_item("neuronxcc-1/MODULE_ok/dup")],
    )
    handle = mounts("neff", "hostile/cache", log_file=str(tmp_path / "neff.log"))
    root = Path(handle.mountpoint)
    module = root / "neuronxcc-1" / "MODULE_ok"

    assert sorted(os.listdir(root)) == ["neuronxcc-1"]
    assert sorted(os.listdir(module)) == ["dup", "model.done", "model.neff"]
    assert (module / "dup").is_dir()  # a name that is both: the directory wins
    assert (module / "model.neff").read_bytes() == good  # the rest of the tree is served
    with pytest.raises(OSError) as exc:
        os.stat(module / "ctrl\x07name")
    assert exc.value.errno == errno.ENOENT
    # Nothing was created outside the mount.
    leaked = [p for p in tmp_path.rglob("*escape*")] + [Path("/etc/hffs-escape")]
    assert not [p for p in leaked if p.exists()]
    log = (tmp_path / "neff.log").read_text()
    assert "unsafe name" in log and "both a file and a directory" in log


@pytest.mark.timeout(120)
def test_hostile_repo_tree_names_are_dropped(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    commit = hub.add_repo("hostile/model", {"config.json": b"{}"})
    hub.add_listing_override(
        "hostile/model",
        [
            {"type": "file", "path": "../../../evil.txt", "oid": "1" * 40, "size": 4},
            {"type": "file", "path": "/abs.txt", "oid": "2" * 40, "size": 4},
            {"type": "file", "path": "sub/\x00nul", "oid": "3" * 40, "size": 4},
        ],
        repo_type="model",
    )
    handle = mounts("hub-cache", log_file=str(tmp_path / "hub.log"))
    snapshot = Path(handle.mountpoint) / "models--hostile--model" / "snapshots" / commit
    assert os.listdir(snapshot) == ["config.json"]
    assert (snapshot / "config.json").read_bytes() == b"{}"
    assert "unsafe name" in (tmp_path / "hub.log").read_text()


@pytest.mark.timeout(180)
def test_token_never_leaks(hub: HubEmulator, hub_token: str, mounts: Mounts, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    commit = hub.add_repo("secret/gated", {"model.safetensors": data, "config.json": b"{}"}, gated=True)
    hub.add_bucket("secret/cache", {"neuronxcc-1/MODULE_1/model.neff": data})
    log_hub, log_neff = tmp_path / "hub.log", tmp_path / "neff.log"
    gated = mounts("hub-cache", name="hub", token=hub_token, log_file=str(log_hub), log_level="DEBUG")
    neff = mounts("neff", "secret/cache", name="neff", token=hub_token, log_file=str(log_neff), log_level="DEBUG")
    snapshot = Path(gated.mountpoint) / "models--secret--gated" / "snapshots" / commit
    assert (snapshot / "model.safetensors").read_bytes() == data  # the token works...
    assert (Path(neff.mountpoint) / "neuronxcc-1/MODULE_1/model.neff").read_bytes() == data
    status = subprocess.run(
        [sys.executable, "-m", "mountctl", "status", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HFFS_RUNTIME_DIR=str(tmp_path / "run")),
        check=True,
    )
    assert json.loads(status.stdout)["mounts"]
    # ...and appears nowhere: not in status output, logs, state files, cache file names or contents.
    assert hub_token not in status.stdout + status.stderr
    for path in tmp_path.rglob("*"):
        if path in (Path(gated.mountpoint), Path(neff.mountpoint)) or Path(gated.mountpoint) in path.parents:
            continue
        if Path(neff.mountpoint) in path.parents:
            continue
        assert hub_token not in path.name, path
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert hub_token.encode() not in path.read_bytes(), path
    for handle in (gated, neff):
        cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes()
        assert hub_token.encode() not in cmdline  # not visible in `ps` either


@pytest.mark.timeout(120)
def test_gated_repo_without_token_is_eacces_with_a_hint(hub: HubEmulator, mounts: Mounts, tmp_path: Path) -> None:
    commit = hub.add_repo("secret/gated", {"model.safetensors": os.urandom(20_000)}, gated=True)
    handle = mounts("hub-cache", log_file=str(tmp_path / "hub.log"))
    blob = Path(handle.mountpoint) / "models--secret--gated" / "snapshots" / commit / "model.safetensors"
    with pytest.raises(OSError) as exc:
        blob.read_bytes()
    assert exc.value.errno == errno.EACCES
    assert (
        "this mount's token (--token-file at mount time) has no access to secret/gated"
        in (tmp_path / "hub.log").read_text()
    )
