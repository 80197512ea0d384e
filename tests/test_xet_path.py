"""The mount's Xet path (`--xet auto`): hf_xet fills the store's private temp file, verified and renamed;
any Xet failure falls back to HTTP Range (a file is never half from each); status counts both paths.

Daemons here run with xet on (the suite's default environment disables it for HTTP-path tests).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_TOKEN, Mounts, run_parallel

from hffs_neuron.mount import status
from hffs_neuron.store.verify import xet_hash
from hffs_neuron.testing.hub_emulator import HubEmulator

pytestmark = pytest.mark.timeout(180)

DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def xet_env(runtime_env: dict[str, str]) -> dict[str, str]:
    env = dict(runtime_env)
    env.pop("HF_HUB_DISABLE_XET", None)
    return env


def state_of(mp: Path) -> dict:
    (state,) = status(mp)
    return state


def xet_hash_of(hub: HubEmulator, bucket: str, path: str) -> str:
    return xet_hash(hub.bucket_dir(bucket) / path)


def test_bucket_file_is_fetched_over_xet_once(hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]) -> None:
    hub.add_bucket("org/x", {"d/big.bin": DATA, "d/small.txt": b"hello"})
    hub.prepare_xet()
    mp = Path(mounts("neff", "org/x", env=xet_env).mountpoint)
    hub.reset_stats()
    reader = f"import sys; sys.stdout.write(str(len(open({str(mp / 'd/big.bin')!r}, 'rb').read())))"
    outputs = run_parallel([[sys.executable, "-c", reader]] * 4, env=xet_env, timeout=90)
    assert outputs == [str(len(DATA))] * 4
    assert (mp / "d/big.bin").read_bytes() == DATA
    assert hub.bytes_served("d/big.bin") == 0  # nothing over HTTP Range
    assert hub.bytes_served(xet_hash_of(hub, "org/x", "d/big.bin")) >= len(DATA) // 2  # one CAS transfer
    state = state_of(mp)
    assert state["transfers"]["xet"] == {"count": 1, "bytes": len(DATA)}
    assert state["transfers"]["http"]["count"] == 0
    assert state["xet"] == "on"
    # hf_xet's own files (its logs) live in the mount's cache dir, owner-only, and count as cache use.
    xet_dir = Path(state["cache"]["dir"]) / "xet"
    assert stat.S_IMODE(xet_dir.stat().st_mode) == 0o700 and any(xet_dir.rglob("*.log"))
    assert state["cache"]["used_bytes"] >= len(DATA) + sum(p.stat().st_size for p in xet_dir.rglob("*.log"))


def test_xet_off_and_hf_hub_disable_xet_use_http(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str], runtime_env: dict[str, str]
) -> None:
    hub.add_bucket("org/x", {"a.bin": DATA})
    hub.prepare_xet()
    off = Path(mounts("neff", "org/x", name="off", cache="c1", env=xet_env, xet="off").mountpoint)
    disabled = Path(mounts("neff", "org/x", name="dis", cache="c2", env=runtime_env).mountpoint)  # HF_HUB_DISABLE_XET=1
    for mp in (off, disabled):
        assert (mp / "a.bin").read_bytes() == DATA
        assert state_of(mp)["transfers"]["http"] == {"count": 1, "bytes": len(DATA)}
        assert state_of(mp)["transfers"]["xet"]["count"] == 0
        assert state_of(mp)["xet"] == "off"


@pytest.mark.parametrize(
    ("route", "status"),
    [("/v*/reconstructions/*", 404), ("/v1/xorb-data/*", 403), ("/api/buckets/*/xet-read-token", 401)],
)
def test_cas_faults_fall_back_to_http_with_whole_files(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str], route: str, status: int
) -> None:
    hub.add_bucket("org/x", {"a.bin": DATA, "b.bin": DATA[::-1]})
    hub.prepare_xet()
    hub.faults.add(route, "status", status=status)
    handle = mounts("neff", "org/x", env=xet_env, timeout=8)
    mp = Path(handle.mountpoint)
    assert (mp / "a.bin").read_bytes() == DATA
    assert (mp / "b.bin").read_bytes() == DATA[::-1]
    transfers = state_of(mp)["transfers"]
    assert transfers["http"]["count"] == 2 and transfers["xet"]["count"] == 0
    log = Path(state_of(mp)["log_file"]).read_text()
    assert log.count("xet path failed") == 1  # once per mount


def test_corrupt_cas_bytes_are_never_served(hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]) -> None:
    hub.add_bucket("org/x", {"a.bin": DATA})
    hub.prepare_xet()
    hub.faults.add("/v1/xorb-data/*", "corrupt")
    mp = Path(mounts("neff", "org/x", env=xet_env, timeout=8).mountpoint)
    assert (mp / "a.bin").read_bytes() == DATA  # xet bytes refused (or abandoned), then HTTP
    assert state_of(mp)["transfers"]["xet"]["count"] == 0


def test_stalled_cas_is_abandoned_within_the_deadline(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]
) -> None:
    hub.add_bucket("org/x", {"a.bin": DATA})
    hub.prepare_xet()
    hub.faults.add("/v1/xorb-data/*", "stall", seconds=60)
    mp = Path(mounts("neff", "org/x", env=xet_env, timeout=4).mountpoint)
    assert (mp / "a.bin").read_bytes() == DATA
    assert state_of(mp)["transfers"]["http"]["count"] == 1
    cache_tmp = Path(state_of(mp)["cache"]["dir"]) / "blobs-store" / "tmp"
    assert list(cache_tmp.iterdir()) == []  # the abandoned temp file was discarded


@pytest.mark.parametrize("xet_route", ["/v1/xorb-data/*", "/v*/reconstructions/*"])
def test_a_hub_stalled_on_both_paths_costs_one_deadline(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str], xet_route: str
) -> None:
    # Xet and HTTP Range both accept and never answer (a Hub that is down): the HTTP fallback gets what
    # is left of the open's wait, so the read fails within --timeout + 2 s (README "Errors a reader can
    # see"), not after a second --timeout; once the Hub answers, the same mount serves the file.
    hub.add_bucket("org/x", {"a.bin": DATA})
    hub.prepare_xet()
    mp = Path(mounts("neff", "org/x", env=xet_env, timeout=3).mountpoint)
    assert (mp / "a.bin").stat().st_size == len(DATA)  # metadata first: only the read is timed
    hub.faults.add(xet_route, "stall", seconds=60)
    hub.faults.add("/buckets/org/x/resolve/*", "stall", seconds=60, methods=("GET",))
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        (mp / "a.bin").read_bytes()
    took = time.monotonic() - started
    assert failed.value.errno == errno.EIO
    assert took < 3 + 2, f"EIO after {took:.1f}s"
    hub.faults.clear()
    assert (mp / "a.bin").read_bytes() == DATA


def test_hub_repo_lfs_file_over_xet_is_sha256_checked(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]
) -> None:
    hub.add_repo("org/model", {"config.json": b"{}", "model.safetensors": DATA})
    hub.prepare_xet()
    mp = Path(mounts("hub-cache", env=xet_env, repos=["org/model"]).mountpoint)
    snapshots = mp / "models--org--model" / "snapshots"
    (commit,) = os.listdir(snapshots)
    assert (snapshots / commit / "model.safetensors").read_bytes() == DATA
    assert (snapshots / commit / "config.json").read_bytes() == b"{}"
    transfers = state_of(mp)["transfers"]
    assert transfers["xet"] == {"count": 1, "bytes": len(DATA)}  # the LFS file
    assert transfers["http"]["count"] == 1  # the small git file has no xet hash


def test_gated_repo_over_xet_uses_the_mounts_token(hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]) -> None:
    hub.add_repo("org/gated", {"model.safetensors": DATA}, gated=True)
    hub.prepare_xet()
    mp = Path(mounts("hub-cache", env=xet_env, repos=["org/gated"], token=TEST_TOKEN).mountpoint)
    snapshots = mp / "models--org--gated" / "snapshots"
    (commit,) = os.listdir(snapshots)
    hub.reset_stats()
    assert (snapshots / commit / "model.safetensors").read_bytes() == DATA
    assert state_of(mp)["transfers"]["xet"]["count"] == 1
    assert [r.status for r in hub.requests("/xet-read-token/")] == [200]


def test_short_lived_cas_tokens_are_refreshed_through_the_token_route(
    mounts: Mounts, xet_env: dict[str, str], tmp_path: Path
) -> None:
    emulator = HubEmulator(tmp_path / "short-tokens", xet_token_ttl=1).start()
    try:
        emulator.add_bucket("org/x", {"a.bin": DATA, "b.bin": DATA[::-1]})
        emulator.prepare_xet()
        mp = Path(mounts("neff", "org/x", env=xet_env, endpoint=emulator.url).mountpoint)
        assert (mp / "a.bin").read_bytes() == DATA
        time.sleep(1.5)  # the first token has expired
        assert (mp / "b.bin").read_bytes() == DATA[::-1]
        assert state_of(mp)["transfers"]["xet"]["count"] == 2
        assert len(emulator.requests("/xet-read-token", method="GET")) >= 2
    finally:
        mounts.close()
        emulator.stop()


def test_xet_transfer_is_split_into_ranges_by_the_scheduler(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]
) -> None:
    # 1 MiB pieces from 1 MiB on: the 3 MiB file goes as 4 ranges, each its own hf_xet stream.
    env = dict(xet_env, HFFS_XET_PIECE_SIZE=str(1024 * 1024), HFFS_PARALLEL_THRESHOLD=str(1024 * 1024))
    hub.add_repo("org/model", {"model.safetensors": DATA})
    hub.prepare_xet()
    mp = Path(mounts("hub-cache", env=env, repos=["org/model"]).mountpoint)
    snapshots = mp / "models--org--model" / "snapshots"
    (commit,) = os.listdir(snapshots)
    hub.reset_stats()
    assert (snapshots / commit / "model.safetensors").read_bytes() == DATA
    ranges = sorted(
        tuple(int(x) for x in r.range_header.removeprefix("bytes=").split("-"))
        for r in hub.requests("/reconstructions/", method="GET")
        if r.status in (200, 206) and r.range_header
    )
    mib = 1024 * 1024
    assert ranges == [(0, mib - 1), (mib, 2 * mib - 1), (2 * mib, 3 * mib - 1), (3 * mib, len(DATA) - 1)]
    assert hub.bytes_served("model.safetensors") == 0  # nothing over HTTP Range
    transfers = state_of(mp)["transfers"]
    assert transfers["xet"] == {"count": 1, "bytes": len(DATA)} and transfers["http"]["count"] == 0


def test_stalled_token_route_answers_within_the_deadline(
    hub: HubEmulator, mounts: Mounts, xet_env: dict[str, str]
) -> None:
    # The token request goes through the mount's own client (deadline --timeout, attempts a third of
    # it), not huggingface_hub's session (no timeout): a token route that accepts and never answers
    # costs the read at most --timeout, then HTTP Range serves it. Once the route answers again (and the
    # pause after a failure is over), a new file goes over Xet.
    env = dict(xet_env, HFFS_XET_PAUSE_AFTER_FAILURE="1")
    hub.add_bucket("org/x", {"a.bin": DATA, "b.bin": DATA[::-1]})
    hub.prepare_xet()
    hub.faults.add("/api/buckets/*/xet-read-token", "stall", seconds=60)
    mp = Path(mounts("neff", "org/x", env=env, timeout=4).mountpoint)
    assert (mp / "a.bin").stat().st_size == len(DATA)  # metadata first: only the read is timed
    started = time.monotonic()
    assert (mp / "a.bin").read_bytes() == DATA
    assert time.monotonic() - started < 4 + 2
    transfers = state_of(mp)["transfers"]
    assert transfers["http"]["count"] == 1 and transfers["xet"]["count"] == 0
    hub.faults.clear()
    time.sleep(1.5)  # the Xet path's pause after a failure is over
    started = time.monotonic()
    assert (mp / "b.bin").read_bytes() == DATA[::-1]
    assert time.monotonic() - started < 4 + 2
    assert state_of(mp)["transfers"]["xet"] == {"count": 1, "bytes": len(DATA)}
