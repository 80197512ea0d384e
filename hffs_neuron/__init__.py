"""hffs-neuron: a FUSE read-through filesystem for Hugging Face storage.

import hffs_neuron
with hffs_neuron.mount("neff", "/mnt/neff", "aws-neuron/optimum-neuron-cache"):
    ...  # NEURON_COMPILE_CACHE_URL=/mnt/neff
"""

__version__ = "0.1.0"

from .mount import MountHandle, cache_prune, cache_usage, mount, prefetch, status, unmount  # noqa: E402

__all__ = ["MountHandle", "__version__", "cache_prune", "cache_usage", "mount", "prefetch", "status", "unmount"]
