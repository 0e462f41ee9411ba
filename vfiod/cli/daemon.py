"""The `vfiod` command: argument parsing and dispatch to its subcommands (`check`, `run`).

Owns the command-line contract of the console script: `main(argv)` returns the exit status instead of
exiting, usage errors are status 2 with argparse's one-line message, and no subcommand ever lets a
traceback reach the user for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vfiod import __version__
from vfiod.cli import check_args

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiod",
        description="Root-owned helper that binds PCI devices to vfio-pci for unprivileged VM managers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check_parser = sub.add_parser(
        "check",
        help="report whether this host is ready for VFIO passthrough, and which devices can be passed",
        description="Read-only pre-flight report: IOMMU, vfio-pci, interrupt remapping, huge pages, other "
        "tools' claims on devices, and every candidate device with the reasons it cannot be passed through "
        "as it stands. Exit status 0 when no check fails (warnings or not), 1 when one fails, 2 for bad "
        "input.",
    )
    check_args.add_arguments(check_parser)
    check_parser.set_defaults(handler=_check)

    run_parser = sub.add_parser(
        "run",
        help="run the daemon: publish org.hypeman.Devices1 on the bus until SIGTERM",
        description="Run the daemon. It recovers what an earlier run left unfinished, publishes "
        "org.hypeman.Devices1 and serves until SIGTERM or SIGINT (SIGHUP re-reads the configuration). "
        "Exit status: 0 after SIGTERM, 1 when it cannot start (no bus, unusable registry, name taken or "
        "denied), 2 for a bad configuration or arguments.",
        epilog="Try it unprivileged on a private bus with a simulated host:\n"
        "  dbus-daemon --session --print-address --nofork &   # prints ADDRESS\n"
        "  vfiod run --bus ADDRESS --simulate workstation-l4\n"
        "  busctl --address=ADDRESS call org.hypeman.Devices1 /org/hypeman/Devices1 "
        "org.hypeman.Devices1.Manager ListAvailable a{sv} 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_parser.add_argument(
        "--bus",
        default="system",
        metavar="system|session|ADDRESS",
        help="the bus to publish on (default: system; an ADDRESS such as unix:path=/run/x/bus)",
    )
    run_parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the registry lives (default /var/lib/vfiod; with --simulate: SIM_ROOT/state)",
    )
    run_parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default /etc/vfiod/vfiod.toml, which may be missing)",
    )
    run_parser.add_argument(
        "--simulate",
        metavar="PROFILE",
        help="run on the kernel simulator instead of this host (workstation-l4, dgx-h100, no-iommu, "
        "qemu-q35, qemu-q35-iommufd, mdev-samples, mdev-samples-iommufd, a40-mdev, l40s-vgpu, synthetic:N); "
        "needs no privileges",
    )
    run_parser.add_argument(
        "--sim-root",
        type=Path,
        metavar="DIR",
        help="with --simulate: the simulated host's directory, shared with other processes (built there if "
        "it holds none yet; default: a temporary directory removed at exit)",
    )
    run_parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long calls in flight may take to finish (default 30)",
    )
    run_parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    run_handler: Handler = _run
    run_parser.set_defaults(handler=run_handler)
    return parser


def _check(args: argparse.Namespace) -> int:
    from vfiod.cli import check  # noqa: PLC0415 -- `vfiod run` never needs the report's modules

    return check.run(args)


def _run(args: argparse.Namespace) -> int:
    if args.sim_root is not None and args.simulate is None:
        print("vfiod run: --sim-root needs --simulate PROFILE", file=sys.stderr)
        return 2
    # vfiod speaks no TLS and needs no OpenSSL hash: asyncio imports ssl only if it can, and hashlib falls
    # back to Python's own sha256 (dbus-fast's one use) without _hashlib, so OpenSSL's libssl and libcrypto
    # stay out of a root daemon's address space (5 MB resident). Kept where something imported them already.
    for openssl_module in ("ssl", "_hashlib"):
        sys.modules.setdefault(openssl_module, None)  # type: ignore[arg-type]
    # Imported here so that `vfiod check` does not load D-Bus and pydantic.
    from vfiod.bus import daemon  # noqa: PLC0415

    return daemon.run(
        daemon.Options(
            bus=args.bus,
            state_dir=args.state_dir,
            config_path=args.config,
            simulate=args.simulate,
            sim_root=args.sim_root,
            drain_timeout=args.drain_timeout,
            verbose=args.verbose,
        )
    )


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
