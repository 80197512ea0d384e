"""The emulator's network simulation: a bandwidth cap per TCP connection and a latency per request.

Timing is checked with loose lower bounds only: enough to show the throttle acts, never a ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import hf_hub_download

from hffs_neuron.testing.hub_emulator import EmulatorClient, HubEmulator

SIZE = 20 * 10**6  # 20 MB: 0.2 s at 100 MB/s
DATA = os.urandom(SIZE)


@pytest.fixture
def big_url(hub: HubEmulator) -> str:
    hub.add_repo("Org/Net", {"big.bin": DATA, "small.txt": b"x"})
    return f"{hub.url}/Org/Net/resolve/main/big.bin"


def _timed_get(url: str, **kwargs: object) -> tuple[bytes, float]:
    start = time.monotonic()
    with httpx2.Client(timeout=30) as client:  # its own connection
        body = client.get(url, **kwargs).content
    return body, time.monotonic() - start


def test_off_by_default(hub: HubEmulator, big_url: str) -> None:
    assert hub.network.conn_mbps is None and hub.network.latency_ms == 0
    body, _ = _timed_get(big_url)
    assert body == DATA


def test_bandwidth_cap_per_connection(hub: HubEmulator, big_url: str) -> None:
    hub.set_network(conn_mbps=100)
    body, elapsed = _timed_get(big_url)
    assert body == DATA and elapsed >= 0.18
    assert hub.bytes_served("big.bin") == SIZE  # paced writes are counted like sendfile ones

    # Ranged reads and in-memory bodies are paced too.
    body, elapsed = _timed_get(big_url, headers={"Range": f"bytes=0-{SIZE // 2 - 1}"})
    assert body == DATA[: SIZE // 2] and elapsed >= 0.09

    # Two connections in parallel: each still gets its own full cap (the aggregate doubles).
    results: list[tuple[bytes, float]] = []
    threads = [threading.Thread(target=lambda: results.append(_timed_get(big_url))) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    wall = time.monotonic() - start
    assert [body == DATA for body, _ in results] == [True, True]
    assert all(elapsed >= 0.18 for _, elapsed in results)
    print(f"two connections: {2 * SIZE / wall / 1e6:.0f} MB/s aggregate at a 100 MB/s cap per connection")


def test_latency_per_request(hub: HubEmulator, big_url: str, hf_cache: Path) -> None:
    hub.set_network(latency_ms=100)
    start = time.monotonic()
    with httpx2.Client(timeout=30) as client:
        for _ in range(3):
            assert client.get(big_url.replace("big.bin", "small.txt")).content == b"x"
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert Path(hf_hub_download("Org/Net", "small.txt", cache_dir=hf_cache)).read_bytes() == b"x"
    assert time.monotonic() - start >= 0.1  # at least one request (HEAD/GET), each delayed


def test_reset_and_control_route(hub: HubEmulator, big_url: str) -> None:
    client = EmulatorClient(hub.url)
    client.set_network(conn_mbps=50, latency_ms=10)
    assert (hub.network.conn_mbps, hub.network.latency_ms) == (50, 10)
    with pytest.raises(ValueError):
        hub.set_network(conn_mbps=0)
    hub.reset()
    assert hub.network.conn_mbps is None and hub.network.latency_ms == 0


def test_constructor_and_command_line(tmp_path: Path) -> None:
    with HubEmulator(tmp_path / "a", conn_mbps=100, latency_ms=5) as emulator:
        assert (emulator.network.conn_mbps, emulator.network.latency_ms) == (100, 5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hffs_neuron.testing.hub_emulator", "--root", str(tmp_path / "b")]
        + ["--latency-ms", "300", "--conn-mbps", "100", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[1]
        start = time.monotonic()
        assert httpx2.get(f"{url}/api/agent-harnesses", timeout=30).status_code == 200
        assert time.monotonic() - start >= 0.3
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
