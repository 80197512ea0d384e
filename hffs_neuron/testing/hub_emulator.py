"""Entry point of the local Hub emulator (the package :mod:`hffs_neuron.testing.emulator`).

Tests and scripts import :class:`HubEmulator` from here; run it as a server with::

    python -m hffs_neuron.testing.hub_emulator --root DIR [--port N] [--page-size N]
        [--redirect-lfs] [--token T] [--sample] [--conn-mbps N] [--latency-ms N]

which prints ``READY http://127.0.0.1:PORT`` once serving, and is controlled over HTTP through
``/_emulator/*`` routes (see :class:`EmulatorClient`).
"""

from hffs_neuron.testing.emulator.accounting import RequestRecord
from hffs_neuron.testing.emulator.cli import main
from hffs_neuron.testing.emulator.client import EmulatorClient
from hffs_neuron.testing.emulator.faults import FaultInjector, FaultRule
from hffs_neuron.testing.emulator.hub import HubEmulator
from hffs_neuron.testing.emulator.repos import default_lfs_rule, git_blob_sha1, lfs_pointer

__all__ = [
    "EmulatorClient",
    "FaultInjector",
    "FaultRule",
    "HubEmulator",
    "RequestRecord",
    "default_lfs_rule",
    "git_blob_sha1",
    "lfs_pointer",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
