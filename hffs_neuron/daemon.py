"""Entry point of a mount daemon: `python -m hffs_neuron.daemon [--ready-fd N] CONFIG_JSON`.

Started as a fresh process by `hffs_neuron.mount()` (or run in the foreground by `mountctl mount
--foreground`). Reports `READY` or `ERROR <class> <message>` on the ready fd, then serves.
"""

from __future__ import annotations

import argparse
import sys

from .errors import HffsError
from .mount import MountConfig, configure_logging, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hffs_neuron.daemon")
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("config")
    args = parser.parse_args(argv)
    config = MountConfig.from_json(args.config)
    configure_logging(config)
    try:
        serve(config, ready_fd=args.ready_fd)
    except HffsError as exc:
        print(f"hffs daemon: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
