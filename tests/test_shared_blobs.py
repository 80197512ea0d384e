"""huggingface_hub's shared blob store (xet on): `<cache>/blobs/<2 hex>/<xet hash>`, marker
`.huggingface-shared-blobs`, each repo's `blobs/<etag>` a relative symlink into it.

A backing directory written that way is served without refetching (the links are shown as links and the
kernel resolves them through the mount), and clients with xet on keep working through the mount.
Real huggingface_hub with hf_xet on, against the emulator's Xet CAS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.mount import status
from hffs_neuron.store.verify import xet_hash
from hffs_neuron.testing.hub_emulator import HubEmulator

pytestmark = pytest.mark.timeout(180)

DATA = os.urandom(2 * 1024 * 1024 + 5)
DOWNLOAD = (
    "import sys; from huggingface_hub import hf_hub_download; "
    "p = hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3]); "
    "sys.stdout.write(str(open(p, 'rb').read() == open(sys.argv[4], 'rb').read()))"
)


@pytest.fixture
def xet_env(runtime_env: dict[str, str]) -> dict[str, str]:
    env = dict(runtime_env)
    env.pop("HF_HUB_DISABLE_XET", None)
    return env


def download(env: dict[str, str], repo: str, name: str, cache: Path, expected: Path) -> None:
    argv = [sys.executable, "-c", DOWNLOAD, repo, name, str(cache), str(expected)]
    assert run_parallel([argv], env=env, timeout=120) == ["True"]


def test_backing_with_shared_blobs_is_served_without_refetching(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str], tmp_path: Path
) -> None:
    commit = hub.add_repo("org/shared", {"config.json": b"{}", "model.safetensors": DATA})
    hub.prepare_xet()
    expected = tmp_path / "expected"
    expected.write_bytes(DATA)
    backing = tmp_path / "backing"
    download(xet_env, "org/shared", "model.safetensors", backing, expected)  # the client, no mount
    digest = xet_hash(expected)
    shared = backing / "blobs" / digest[:2] / digest
    assert shared.read_bytes() == DATA and (backing / "blobs" / ".huggingface-shared-blobs").exists()
    (link,) = (backing / "models--org--shared" / "blobs").iterdir()
    assert link.is_symlink() and not os.readlink(link).startswith("/")

    mp = Path(mounts("hub-cache", env=xet_env, backing=str(backing), repos=["org/shared"]).mountpoint)
    hub.reset_stats()
    through = mp / "models--org--shared" / "snapshots" / commit / "model.safetensors"
    assert through.read_bytes() == DATA
    assert os.readlink(mp / "models--org--shared" / "blobs" / link.name) == os.readlink(link)  # shown as a link
    assert (mp / "blobs" / digest[:2] / digest).read_bytes() == DATA
    assert hub.bytes_served("model.safetensors") == 0 and hub.bytes_served(digest) == 0  # nothing refetched
    (state,) = status(mp)
    assert state["transfers"]["xet"]["count"] == 0 and state["transfers"]["http"]["count"] == 0

    # A client with xet on, using the mount as its cache: served, nothing refetched.
    download(xet_env, "org/shared", "model.safetensors", mp, expected)
    assert hub.bytes_served(digest) == 0


def test_clients_with_xet_on_download_through_the_mount(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str], tmp_path: Path
) -> None:
    hub.add_repo("org/fresh", {"config.json": b"{}", "model.safetensors": DATA})
    hub.add_repo("org/other", {"weights.bin": DATA[::-1]})
    hub.prepare_xet()
    expected, reversed_ = tmp_path / "expected", tmp_path / "reversed"
    expected.write_bytes(DATA)
    reversed_.write_bytes(DATA[::-1])
    backing = tmp_path / "backing"
    backing.mkdir()
    mp = Path(mounts("hub-cache", env=xet_env, backing=str(backing)).mountpoint)
    download(xet_env, "org/fresh", "model.safetensors", mp, expected)
    download(xet_env, "org/other", "weights.bin", mp, reversed_)
    download(xet_env, "org/fresh", "model.safetensors", mp, expected)  # again: from the cache
    (state,) = status(mp)
    assert state["transfers"]["xet"]["count"] + state["transfers"]["http"]["count"] <= 2
