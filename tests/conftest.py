"""Session-wide local Hub emulator and a clean huggingface_hub environment for every test.

The emulator starts in ``pytest_configure`` because huggingface_hub reads ``HF_ENDPOINT`` and
friends once, at import time: the environment must be set before any test module imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hffs_neuron.testing.hub_emulator import HubEmulator

#: Token accepted by the emulator for gated repos.
TEST_TOKEN = "hf_emulator_test_token"

_state: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    session_dir = Path(tempfile.mkdtemp(prefix="hffs-tests-"))
    emulator = HubEmulator(session_dir / "hub", tokens=[TEST_TOKEN]).start()
    _state.update(dir=session_dir, emulator=emulator)
    for leaked in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        os.environ.pop(leaked, None)
    os.environ.update(
        HF_ENDPOINT=emulator.url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(session_dir / "hf_home"),  # no saved token can leak in
        HF_HUB_ETAG_TIMEOUT="10",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    emulator = _state.pop("emulator", None)
    if isinstance(emulator, HubEmulator):
        emulator.stop()
    session_dir = _state.pop("dir", None)
    if isinstance(session_dir, Path):
        shutil.rmtree(session_dir, ignore_errors=True)


@pytest.fixture
def hub() -> Iterator[HubEmulator]:
    """The session's emulator, emptied: no repos, buckets, stats or faults, default settings."""
    emulator = _state["emulator"]
    assert isinstance(emulator, HubEmulator)
    emulator.reset()
    yield emulator
    emulator.faults.clear()


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HF_HUB_CACHE (env var and the already-imported huggingface_hub constant)."""
    from huggingface_hub import constants  # imported late: only after pytest_configure set the env

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_token() -> str:
    """A token the emulator accepts for gated repos."""
    return TEST_TOKEN
