"""Remote control of an emulator running in another process, over its ``/_emulator/*`` routes."""

from __future__ import annotations

import json
import urllib.request
from typing import Any
from urllib.parse import urlencode

from hffs_neuron.testing.emulator.accounting import RequestRecord


class EmulatorClient:
    """Drive the stats, faults and network profile of an emulator running in another process, over its HTTP port."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, route: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(
            f"{self.url}{route}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def _stats(self, path_contains: str = "", method: str | None = None) -> dict[str, Any]:
        params = {"path_contains": path_contains, **({"method": method} if method else {})}
        return self._call("GET", f"/_emulator/stats?{urlencode(params)}")

    def bytes_served(self, path_contains: str = "") -> int:
        return int(self._stats(path_contains)["bytes_served"])

    def requests(self, path_contains: str = "", method: str | None = None) -> list[RequestRecord]:
        return [RequestRecord(**r) for r in self._stats(path_contains, method)["requests"]]

    def reset_stats(self) -> None:
        self._call("POST", "/_emulator/reset_stats")

    def faults_add(self, pattern: str, kind: str, **kwargs: Any) -> None:
        """Same arguments as :meth:`FaultInjector.add`."""
        if "methods" in kwargs:
            kwargs["methods"] = list(kwargs["methods"])
        self._call("POST", "/_emulator/faults", {"pattern": pattern, "kind": kind, **kwargs})

    def set_network(self, conn_mbps: float | None = None, latency_ms: float = 0.0) -> None:
        """Same arguments as :meth:`HubEmulator.set_network`."""
        self._call("POST", "/_emulator/network", {"conn_mbps": conn_mbps, "latency_ms": latency_ms})

    def faults_clear(self) -> None:
        self._call("POST", "/_emulator/clear_faults")

    def set_bucket_events(self, enabled: bool) -> None:
        """Serve the bucket event feed (``/api/buckets/{id}/events``) or answer it with 404."""
        self._call("POST", "/_emulator/bucket_events", {"enabled": enabled})
