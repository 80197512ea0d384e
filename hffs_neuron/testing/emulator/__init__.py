"""The local Hub emulator, one idea per module; :mod:`hffs_neuron.testing.hub_emulator` is its entry point."""
