"""transformers `from_pretrained` of a sharded safetensors checkpoint through a hub-cache mount.

The checkpoint is a real (tiny) Llama saved by transformers with torch on CPU, published into the
emulator; four processes load it at once (mmap'ing the shards through FUSE), online and offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounts, run_parallel

from hffs_neuron.testing.hub_emulator import HubEmulator

# Four casings of one repo id: four processes, one repo folder, one transfer per shard.
REPO_IDS = ["Tiny/Llama-Sharded", "tiny/llama-sharded", "TINY/LLAMA-SHARDED", "Tiny/Llama-Sharded"]

# sha256 over (name, bytes) of every state_dict tensor, sorted by name: "identical weights".
STATE_HASH = r"""
import hashlib
def state_hash(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
"""

SAVE = (
    STATE_HASH
    + r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)
model = LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1], max_shard_size="100KB")
print(state_hash(model))
"""
)

LOAD = (
    STATE_HASH
    + r"""
import sys
from transformers import AutoModelForCausalLM
print(state_hash(AutoModelForCausalLM.from_pretrained(sys.argv[1])))
"""
)


def _python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(directory of the saved checkpoint, its state_dict hash), built once for the module."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:  # the `ml` extra is part of the dev setup: make its absence loud
        pytest.fail(f"torch/transformers missing from the venv: {exc}")
    directory = tmp_path_factory.mktemp("checkpoint")
    digest = _python(SAVE, str(directory))
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (directory / "model.safetensors.index.json").is_file()
    return directory, digest


@pytest.fixture
def published(hub: HubEmulator, checkpoint: tuple[Path, str]) -> dict[str, Path]:
    """The checkpoint committed to `Tiny/Llama-Sharded` on the emulator: {repo path: local file}."""
    directory, _ = checkpoint
    files = {p.name: p for p in sorted(directory.iterdir()) if p.is_file()}
    hub.add_repo(REPO_IDS[0], files)
    hub.reset_stats()
    return files


@pytest.fixture
def mounted(tmp_path: Path, hub: HubEmulator, mounts: Mounts) -> Callable[[], Path]:
    """Factory: a hub-cache mount at a new mountpoint; all share one cache, backing dir and log."""
    (tmp_path / "backing").mkdir()
    count = 0

    def _mount() -> Path:
        nonlocal count
        name, count = f"mnt{count}", count + 1
        handle = mounts(
            "hub-cache", name=name, backing=str(tmp_path / "backing"), log_file=str(tmp_path / "daemon.log")
        )
        return Path(handle.mountpoint)

    return _mount


def load_in_parallel(mountpoint: Path, *, offline: bool, timeout: float = 180) -> list[str]:
    """Run from_pretrained in one process per repo-id casing, all at once; their state hashes."""
    env = dict(os.environ, HF_HUB_CACHE=str(mountpoint))
    env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    argvs = [[sys.executable, "-c", LOAD, repo_id] for repo_id in REPO_IDS]
    return [out.strip().splitlines()[-1] for out in run_parallel(argvs, env=env, timeout=timeout)]


def assert_each_file_served_once(hub: HubEmulator, files: dict[str, Path]) -> None:
    for name, path in files.items():
        served = hub.bytes_served(f"/{name}")
        # config/generation_config may be read by transformers or not; a shard must be read exactly once.
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            assert served == path.stat().st_size, name
        else:
            assert served in (0, path.stat().st_size), name


@pytest.mark.timeout(400)
def test_parallel_from_pretrained_online_then_offline(
    hub: HubEmulator, checkpoint: tuple[Path, str], published: dict[str, Path], mounted: Callable[[], Path]
) -> None:
    _, expected = checkpoint
    mountpoint = mounted()
    assert load_in_parallel(mountpoint, offline=False) == [expected] * len(REPO_IDS)
    assert_each_file_served_once(hub, published)
    folders = [p.name for p in mountpoint.iterdir() if p.name.lower().startswith("models--")]
    assert folders == ["models--Tiny--Llama-Sharded"]

    assert load_in_parallel(mountpoint, offline=True) == [expected] * len(REPO_IDS)
    assert_each_file_served_once(hub, published)  # offline added no transfer


@pytest.mark.timeout(300)
def test_parallel_from_pretrained_offline_on_a_cold_mount(
    hub: HubEmulator, checkpoint: tuple[Path, str], published: dict[str, Path], mounted: Callable[[], Path]
) -> None:
    _, expected = checkpoint
    mountpoint = mounted()
    assert load_in_parallel(mountpoint, offline=True) == [expected] * len(REPO_IDS)
    assert_each_file_served_once(hub, published)
    assert not hub.requests("/resolve/", method="HEAD")  # the clients never asked the Hub themselves
    index = json.loads(published["model.safetensors.index.json"].read_text())
    assert len(set(index["weight_map"].values())) >= 3
