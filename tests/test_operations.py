"""What an operator relies on: offline mounts, messages that name the token that counts, status of every
mount on the host, and the metrics server under load.

Real daemons against the local Hub emulator; the emulator's request accounting is the witness for what
a mount asked the Hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Mounts

from hffs_neuron.mount import status
from hffs_neuron.testing.hub_emulator import HubEmulator

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
    cached = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, "HFFS-Test/Offline", "config.json"],
        env=client,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cached.returncode == 0 and '{"cached": true}' in cached.stdout, cached.stderr
    missing = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, "HFFS-Test/Offline", "weights.bin"],
        env=client,
        capture_output=True,
        text=True,
        timeout=60,
    )
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
