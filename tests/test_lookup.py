"""`mountctl lookup`: the export configurations a Neuron cache holds for a model, from the model-repo
registry and from the bucket per-model area, newest compiler first, online and offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Mounts
from huggingface_hub import constants as hf_constants

from hffs_neuron import constants
from hffs_neuron.testing.hub_emulator import HubEmulator
from hffs_neuron.testing.sample_data import build_neff_bucket, build_neff_repo, build_sharded_model_repo
from mountctl.cli import main

pytestmark = pytest.mark.timeout(120)

REPO = "aws-neuron/optimum-neuron-cache"
MODEL = "HFFS-Test/Tiny-Sharded"


@pytest.fixture
def lookup_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`lookup_cli(*args) -> (exit code, stdout, stderr)` of `mountctl lookup ...`, run in this process with
    its own cache dir (where lookups are remembered)."""
    monkeypatch.setattr(constants, "CACHE_DIR", tmp_path / "cache")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["lookup", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _rows(out: str) -> list[list[str]]:
    """The table's rows under its header, split on runs of two spaces."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("compiler"))
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[header + 1 :]]


def test_registry_entries_newest_compiler_first(hub: HubEmulator, lookup_cli) -> None:
    build_neff_repo(hub, REPO)
    build_sharded_model_repo(hub, MODEL)  # its config.json says model_type llama
    hub.reset_stats()
    code, out, _ = lookup_cli(f"hf://{REPO}", MODEL)
    assert code == 0
    assert out.startswith(f"*** 3 entries found in cache for {MODEL} in hf://{REPO} ***")
    rows = _rows(out)
    assert [row[0] for row in rows] == ["2.21.18209.0+043b1bf7", "2.21.18209.0+043b1bf7", "2.19.8089.0+8ab9f450"]
    assert sorted((row[2], row[3], row[4], row[5]) for row in rows) == [
        ("1", "128", "2", "bf16"),
        ("1", "2048", "2", "fp16"),
        ("4", "4096", "8", "bf16"),
    ]
    assert all(row[1] == "text-generation" and row[6] == MODEL for row in rows)
    # The model type comes from the model's config: other types' registry folders are never listed,
    # nor are the version directories of modules.
    assert not hub.requests("/bert")
    assert not [r for r in hub.requests("/tree") if r.path.rstrip("/").endswith(("+043b1bf7", "+8ab9f450"))]


def test_task_filter_no_match_and_json(hub: HubEmulator, lookup_cli) -> None:
    build_neff_repo(hub, REPO)  # no model repos: every model type's folder is looked through
    code, out, _ = lookup_cli(f"hf://{REPO}", "HFFS-Test/Tiny-Bert", "--task", "feature-extraction", "--json")
    answer = json.loads(out)
    assert code == 0 and not answer["offline"] and answer["source"] == f"hf://{REPO}"
    found = [(e["batch_size"], e["sequence_length"], e["auto_cast_type"]) for e in answer["entries"]]
    assert found == [(8, 256, "fp32")]
    code, out, _ = lookup_cli(f"hf://{REPO}", "HFFS-Test/Tiny-Bert", "--task", "text-generation")
    assert (code, out.strip()) == (0, f"no cached configuration of HFFS-Test/Tiny-Bert in hf://{REPO}")
    code, out, _ = lookup_cli(f"hf://{REPO}", "Nobody/Nothing")
    assert (code, out.strip()) == (0, f"no cached configuration of Nobody/Nothing in hf://{REPO}")


def test_bucket_per_model_area(hub: HubEmulator, lookup_cli) -> None:
    bucket = build_neff_bucket(hub, "org/neuron-cache")
    code, out, _ = lookup_cli("org/neuron-cache", MODEL)
    assert code == 0 and out.startswith(f"*** 1 entries found in cache for {MODEL} in org/neuron-cache ***")
    (row,) = _rows(out)
    assert row[:6] == [bucket["compiler_versions"][0].split("-", 1)[1], "text-generation", "1", "128", "2", "bf16"]


def test_lookup_through_a_mount_and_offline(
    hub: HubEmulator, mounts: Mounts, lookup_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    build_neff_repo(hub, REPO)
    mp = mounts("neff", f"hf://{REPO}", cache="mount-cache").mountpoint
    code, online, _ = lookup_cli(mp, MODEL)
    assert code == 0 and "3 entries found" in online
    assert list((tmp_path / "mount-cache" / "lookup").glob("*.json"))  # remembered in the mount's cache dir
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    hub.reset_stats()
    code, offline, _ = lookup_cli(mp, MODEL)
    assert code == 0 and hub.requests() == []
    assert "(offline: as seen" in offline.splitlines()[0] and _rows(offline) == _rows(online)
    code, out, _ = lookup_cli(mp, MODEL, "--task", "feature-extraction")
    assert "no cached configuration" in out
    code, _, err = lookup_cli(mp, "Never/Seen")
    assert code == 6 and "never looked up" in err and len(err.strip().splitlines()) == 1
    # A hub that stops answering is offline too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    hub.faults.add("*", "status", status=503)
    monkeypatch.setattr(constants, "RETRY_BASE_WAIT", 0.01)
    code, out, _ = lookup_cli(mp, MODEL, "--json")
    assert code == 0 and json.loads(out)["offline"] and len(json.loads(out)["entries"]) == 3


def test_bad_source_and_model_id_are_one_line(lookup_cli) -> None:
    code, _, err = lookup_cli("hf://spaces/org/app", MODEL)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = lookup_cli(f"hf://{REPO}", "not-a-model")
    assert code == 2 and "ORG/NAME" in err
