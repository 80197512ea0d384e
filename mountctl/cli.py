"""mountctl: mount, inspect, warm and publish hffs-neuron filesystems."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("mountctl: not implemented yet", file=sys.stderr)
    return 2
