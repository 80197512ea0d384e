"""Names of the Neuron compile cache's flat layout, shared by the NEFF view, its prober and the publisher.

`<root>/neuronxcc-<compiler version>/MODULE_<graph>+<flags>/{model.neff, model.done, ...}`; `*.lock` files
(and the root's `lock`) are the compiler's in-progress markers.
"""

from __future__ import annotations

MODULE_PREFIX = "MODULE_"
VERSION_PREFIX = "neuronxcc-"


def is_lock_name(name: str) -> bool:
    """A compiler's lock: `<anything>.lock`, or the cache root's `lock`."""
    return name.endswith(".lock") or name == "lock"
