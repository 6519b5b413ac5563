"""The ``ditfast`` console command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from .info import main as info_main

    info_main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditfast", description="Fast, drop-in Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="print versions, the device and which compiled ops are available")
    p_info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
