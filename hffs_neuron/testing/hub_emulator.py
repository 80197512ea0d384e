"""Entry point of the local Hub emulator (the package :mod:`hffs_neuron.testing.emulator`).

Run it with ``python -m hffs_neuron.testing.hub_emulator --root DIR [--sample] ...``; tests import
:class:`HubEmulator` from here.
"""

from hffs_neuron.testing.emulator.repos import EmulatorClient, HubEmulator, git_blob_sha1, main

__all__ = ["EmulatorClient", "HubEmulator", "git_blob_sha1", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
