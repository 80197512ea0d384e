"""hffs-neuron: a FUSE read-through filesystem for Hugging Face storage."""

__version__ = "0.1.0"
