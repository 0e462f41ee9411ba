"""The `vfiod` command: argument parsing and dispatch to its subcommands (`check` for now).

Owns the command-line contract of the console script: `main(argv)` returns the exit status instead of
exiting, usage errors are status 2 with argparse's one-line message, and no subcommand ever lets a
traceback reach the user for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from vfiod.cli import check

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiod",
        description="Root-owned helper that binds PCI devices to vfio-pci for unprivileged VM managers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check_parser = sub.add_parser(
        "check",
        help="report whether this host is ready for VFIO passthrough, and which devices can be passed",
        description="Read-only pre-flight report: IOMMU, vfio-pci, interrupt remapping, huge pages, other "
        "tools' claims on devices, and every candidate device with the reasons it cannot be passed through "
        "as it stands. Exit status 0 whenever the report was produced.",
    )
    check.add_arguments(check_parser)
    handler: Handler = check.run
    check_parser.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits for --help (0) and usage errors (2); the console script wants a status back.
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print("vfiod: a command is required (see vfiod --help)", file=sys.stderr)
        return 2
    _setup_logging()
    return handler(args)


def _setup_logging() -> None:
    # Warnings (e.g. a mount whose device cannot be traced) belong on stderr, away from --json output.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vfiod: %(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
