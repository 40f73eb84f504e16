"""The ``xbarsim`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _version(args: argparse.Namespace) -> int:
    import crossbar
    import numba
    import numpy
    import torch

    print(f"xbarsim {crossbar.__version__} (numpy {numpy.__version__}, numba {numba.__version__}, "
          f"torch {torch.__version__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbarsim",
        description="Simulate deep-learning inference on analog memristive crossbars and "
                    "measure the accuracy lost to device and converter non-idealities.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("version", help="print the versions of xbarsim and its numeric stack")
    p.set_defaults(func=_version)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
