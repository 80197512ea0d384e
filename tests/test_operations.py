"""What an operator relies on: offline mounts, messages that name the token that counts, status of every
mount on the host, and the metrics server under load.

Real daemons against the local Hub emulator; the emulator's request accounting is the witness for what
a mount asked the Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Mounts, OtherUser

from hffs_neuron.mount import prefetch, status
from hffs_neuron.runtime import control_address
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket

DOWNLOAD = "from huggingface_hub import hf_hub_download as d; import sys; print(open(d(*sys.argv[1:])).read())"


@pytest.mark.timeout(120)
def test_offline_mount_serves_what_is_cached_and_never_calls_the_hub(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str], tmp_path: Path
) -> None:
    hub.add_repo("HFFS-Test/Offline", {"config.json": b'{"cached": true}', "weights.bin": os.urandom(4096)})
    backing = tmp_path / "hub-cache"
    backing.mkdir()
    # A hub cache filled earlier, online, without the mount: config.json only.
    fill = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, "HFFS-Test/Offline", "config.json"],
        env=dict(runtime_env, HF_HUB_CACHE=str(backing)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fill.returncode == 0, fill.stderr
    hub.reset_stats()
    offline = dict(runtime_env, HF_HUB_OFFLINE="1")
    m = mounts("hub-cache", backing=str(backing), repos=["HFFS-Test/Offline"], env=offline)
    (state,) = status(m.mountpoint)
    assert state["checks"] == dict.fromkeys(("endpoint", "token", "source"), "skipped: HF_HUB_OFFLINE=1")

    client = dict(offline, HF_HUB_CACHE=str(m.mountpoint))

    def download(filename: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-c", DOWNLOAD, "HFFS-Test/Offline", filename]
        return subprocess.run(argv, env=client, capture_output=True, text=True, timeout=60)

    cached = download("config.json")
    assert cached.returncode == 0 and '{"cached": true}' in cached.stdout, cached.stderr
    missing = download("weights.bin")
    assert missing.returncode != 0 and "LocalEntryNotFoundError" in missing.stderr  # not cached: offline's answer
    assert not (Path(m.mountpoint) / "models--HFFS-Test--Other").exists()
    assert hub.requests() == []  # neither the mount (checks, pins, lookups) nor its clients asked the Hub


@pytest.mark.timeout(90)
def test_eacces_on_a_gated_repo_names_the_mount_token_in_log_and_status(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    hub.add_repo("HFFS-Test/Gated", {"config.json": b"{}"}, gated=True)
    env = {k: v for k, v in runtime_env.items() if k != "HF_TOKEN"}
    m = mounts("hub-cache", env=env)
    folder = Path(m.mountpoint) / "models--HFFS-Test--Gated" / "snapshots"
    snapshot = next(folder.iterdir())
    for _ in range(2):
        with pytest.raises(PermissionError):
            (snapshot / "config.json").read_bytes()
    message = "this mount's token (--token-file at mount time) has no access to HFFS-Test/Gated"
    (state,) = status(m.mountpoint)
    assert state["access_denied"] == [{"repo": "HFFS-Test/Gated", "count": 2, "message": message}]
    assert message in Path(state["log_file"]).read_text()
    assert "set HF_TOKEN" not in Path(state["log_file"]).read_text()  # a client's HF_TOKEN cannot help


# -- every mount on the host, whatever runtime dir started it --------------------------------------
MOUNTCTL = str(Path(sys.executable).parent / "mountctl")
BUCKET = "HFFS-Test/ops-cache"
ASK_AS_ANOTHER_USER = r"""
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect("\0" + sys.argv[1])  # an abstract name: argv cannot hold its leading NUL
    try:
        s.sendall(b"status\n")
        print(repr(s.recv(65536)))
    except OSError:  # hung up on before the request was sent
        print(repr(b""))
"""


def run_mountctl(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MOUNTCTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_status_and_cache_find_every_mount_whatever_runtime_dir_started_it(
    hub: HubEmulator, shared_mounts: Mounts, runtime_env: dict[str, str], other_user: OtherUser, tmp_path: Path
) -> None:
    build_neff_bucket(hub, BUCKET)
    m = shared_mounts("neff", BUCKET)
    mp = os.path.realpath(m.mountpoint)
    # An admin's plain `mountctl status`, with another runtime dir than the one that started the mount.
    admin = dict(runtime_env, HFFS_RUNTIME_DIR=str(tmp_path / "admin-run"))
    result = run_mountctl("status", "--json", env=admin)
    assert result.returncode == 0, result.stderr
    (state,) = [s for s in json.loads(result.stdout)["mounts"] if s["mountpoint"] == mp]
    assert (state["live"], state["health"], state["fsname"]) == (True, "running", BUCKET)
    assert run_mountctl("status", mp, "--check", env=admin).returncode == 0
    du = run_mountctl("cache", "du", env=admin)
    assert du.returncode == 0 and f"under {os.path.realpath(state['cache_dir'])}" in du.stdout, du.stdout + du.stderr

    # Another user sees the mount and its source, and that it is not theirs; its daemon says nothing to them.
    user = {k: v for k, v in runtime_env.items() if k != "HFFS_RUNTIME_DIR"}  # their own, under their home
    mine = other_user.run([MOUNTCTL, "status"], env=user)
    assert mine.returncode == 0, mine.stderr
    assert f"{mp}: {BUCKET} (not yours: mounted by uid 0)" in mine.stdout
    as_json = other_user.run([MOUNTCTL, "status", "--json"], env=user)
    (theirs,) = [s for s in json.loads(as_json.stdout)["mounts"] if s["mountpoint"] == mp]
    assert theirs["health"] == "not yours" and "counters" not in theirs and "options" not in theirs
    asked = other_user.python(ASK_AS_ANOTHER_USER, control_address(mp).lstrip("\0"), env=user)
    assert asked.returncode == 0 and asked.stdout.strip() == "b''", asked.stdout + asked.stderr


@pytest.mark.timeout(120)
def test_prefetch_reports_bytes_during_a_file_and_counts_each_blob_once(
    hub: HubEmulator, mounts: Mounts, runtime_env: dict[str, str]
) -> None:
    weights = os.urandom(12 * 1024 * 1024)
    commit = hub.add_repo("HFFS-Test/Prefetch", {"config.json": b"{}", "model.safetensors": weights})
    m = mounts("hub-cache", repos=["HFFS-Test/Prefetch"], read_ahead="off", max_connections=1)
    folder = Path(m.mountpoint) / "models--HFFS-Test--Prefetch"
    hub.set_network(conn_mbps=4.0)  # 12 MiB in about 3 s
    totals: list[int] = []
    seen: list[int] = []
    try:
        result = prefetch([folder], on_total=totals.append, on_progress=seen.append)
    finally:
        hub.set_network(None)
    paths = [Path(root) / n for root, _, names in os.walk(folder) for n in names]  # blobs/, snapshots/, refs/
    unique = {os.path.realpath(p): p.stat().st_size for p in paths}
    size = sum(unique.values())
    assert size < sum(p.stat().st_size for p in paths)  # snapshots/ link into blobs/: counted once
    assert totals == [size] and (result.files, result.bytes) == (len(unique), size)
    assert seen == sorted(seen) and seen[-1] == size
    assert any(0 < n < len(weights) for n in seen), seen  # the bar moved while the big file was on its way
    assert (folder / "snapshots" / commit / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (0o755, "its group can read (not change); other users can read (not change)"),
        (0o775, "its group can read and change; other users can read (not change)"),
        (0o700, None),
    ],
)
def test_backing_warning_says_what_its_mode_allows(mounts: Mounts, tmp_path: Path, mode: int, said: str | None) -> None:
    backing = tmp_path / f"backing-{mode:o}"
    backing.mkdir()
    backing.chmod(mode)
    m = mounts("hub-cache", backing=str(backing))
    log = Path(status(m.mountpoint)[0]["log_file"]).read_text()
    if said is None:
        assert "--backing" not in log
    else:
        assert f"--backing {backing} (mode {mode:04o}): {said} what it holds directly" in log


# -- the code's shape --------------------------------------------------------------------------------
def _module_level_imports(path: Path, package: str) -> set[str]:
    """Modules `path` imports at module level (`if TYPE_CHECKING:` blocks included), as dotted names."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        nodes = [*node.body] if isinstance(node, ast.If) else [node]
        for inner in nodes:
            if isinstance(inner, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - inner.level + 1] if inner.level else []
                target = ".".join([*base, inner.module] if inner.module else base)
                found |= {target, *(f"{target}.{alias.name}" for alias in inner.names)}
            elif isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names}
    return found


@pytest.mark.parametrize("package", ["hffs_neuron.views", "hffs_neuron.testing.emulator"])
def test_no_import_circle_within_the_views_or_the_emulator(package: str) -> None:
    import hffs_neuron

    folder = Path(hffs_neuron.__file__).parent.parent / package.replace(".", "/")
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {name: _module_level_imports(path, package) & set(modules) for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    circles = sorted(name for name in modules if reaches(name, name, set()))
    assert circles == [], f"modules in an import circle: {circles}"
