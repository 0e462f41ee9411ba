"""The `vfioctl` command: a client of vfiod's `org.hypeman.Devices1` D-Bus service.

Owns vfioctl's command-line contract: the subcommands and their options, which contract method (and which
options in its a{sv}) each one calls, the shape of every `--json` document, and the exit statuses listed in
`--help`. `main(argv)` returns the exit status instead of exiting, and no failure ever shows a traceback:
service errors print `vfioctl: <ErrorName>: <message>` on stderr. The bus side lives in `vfioctl_bus`,
text and JSON rendering in `vfioctl_render`, and `monitor` in `vfioctl_monitor`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

from vfiod import __version__
from vfiod.bus.names import BUS_NAME
from vfiod.cli.vfioctl_bus import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TABLE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    BusTarget,
    CallError,
    Client,
    tty_agent,
)
from vfiod.cli.vfioctl_commands import (
    Command,
    Context,
    cmd_attach,
    cmd_attach_vgpu,
    cmd_bind,
    cmd_check,
    cmd_detach,
    cmd_import_hypeman,
    cmd_list,
    cmd_list_available,
    cmd_metrics,
    cmd_monitor,
    cmd_profiles,
    cmd_reconcile,
    cmd_recover,
    cmd_register,
    cmd_show,
    cmd_status,
    cmd_unbind,
    cmd_unregister,
    cmd_vfs,
    cmd_vgpus,
)
from vfiod.cli.vfioctl_help import EXAMPLES
from vfiod.cli.vfioctl_launch import cmd_open_devices

DEFAULT_TIMEOUT = 120.0
UINT32_MAX = 0xFFFFFFFF


READ_ONLY = frozenset(
    {"status", "check", "list-available", "list", "show", "monitor", "profiles", "vgpus", "metrics"}
)

# ----- argument parsing ------------------------------------------------------------------------------------


def _uint32(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f"must be 0-{UINT32_MAX}: {text!r}")
    return value


def _byte(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"must be 0-255: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds: {text!r}")
    return value


_SHORT_PCI_ADDRESS = re.compile(r"[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")


def _pci_address(text: str) -> str:
    """`bb:ss.f` as lspci prints it means domain 0000; anything else goes to the daemon as given (it
    checks addresses strictly)."""
    return f"0000:{text}" if _SHORT_PCI_ADDRESS.fullmatch(text) else text


class TagAction(argparse.Action):
    """`--tag KEY=VALUE`, repeatable, collected into a dict; a key given twice is a usage error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        text = values if isinstance(values, str) else ""
        key, sep, value = text.partition("=")
        if not sep or not key:
            parser.error(f"{option_string} expects KEY=VALUE, not {text!r}")
        tags: dict[str, str] = dict(getattr(namespace, self.dest, None) or {})
        if key in tags:
            parser.error(f"{option_string} {key}=...: the key {key!r} is given twice")
        tags[key] = value
        setattr(namespace, self.dest, tags)


def _global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The options every command takes, before or after the subcommand. In a subcommand their default is
    SUPPRESS, so an option given before the subcommand is not reset by the subcommand's defaults."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    g = parser.add_argument_group("bus and output options")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--address", metavar="ADDR", default=default(None), help="talk to the bus at this D-Bus address"
    )
    where.add_argument(
        "--session", dest="bus", action="store_const", const="session", default=default("system"),
        help="use the session bus (default: the system bus)",
    )  # fmt: skip
    where.add_argument(
        "--system", dest="bus", action="store_const", const="system", default=default("system"),
        help="use the system bus (the default)",
    )  # fmt: skip
    g.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=default(DEFAULT_TIMEOUT),
        help=f"how long to wait for each reply (default {DEFAULT_TIMEOUT:g}; a bind can take a minute)",
    )  # fmt: skip
    g.add_argument(
        "--json", action="store_true", default=default(False),
        help="print JSON (sorted keys) instead of tables; `monitor` prints one JSON object per line",
    )  # fmt: skip
    g.add_argument(
        "--no-ask-password", action="store_true", default=default(False),
        help="never let polkit ask for a password (it may when stdin is a terminal)",
    )  # fmt: skip


def _epilog(examples: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


def _main_epilog() -> str:
    lines = ["examples:"]
    for name, (_, _, examples) in EXAMPLES.items():
        lines.append(f"  {examples[0]:<60} # {name}")
    lines += ["", "exit status:"]
    lines += [f"  {code:>3}  {what}" for code, what in EXIT_TABLE]
    lines += [
        "",
        "Errors are printed as `vfioctl: <ErrorName>: <message>` on stderr. Every call may be retried",
        "safely: vfiod's methods are idempotent. When stdin is a terminal polkit may ask for a password",
        "(ALLOW_INTERACTIVE_AUTHORIZATION); --no-ask-password turns that off.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfioctl",
        description=textwrap.fill(
            f"Client of vfiod ({BUS_NAME} on the system bus): discover, register, attach and detach PCI "
            "devices for VFIO passthrough.",
            100,
        ),
        epilog=_main_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, in_subcommand=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Command) -> argparse.ArgumentParser:
        help_text, description, examples = EXAMPLES[name]
        p = sub.add_parser(
            name,
            help=help_text,
            description=textwrap.fill(f"{help_text[0].upper()}{help_text[1:]}. {description}", 100),
            epilog=_epilog(examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    add("status", cmd_status)
    add("check", cmd_check)
    p = add("list-available", cmd_list_available)
    p.add_argument("--all", action="store_true", help="every PCI function, not only display controllers")
    p = add("list", cmd_list)
    p.add_argument(
        "--tag", dest="tags", metavar="KEY=VALUE", action=TagAction, help="only devices with this tag"
    )
    p = add("show", cmd_show)
    p.add_argument("device", metavar="ID|NAME")
    p = add("register", cmd_register)
    p.add_argument(
        "pci_address", metavar="PCI_ADDRESS", type=_pci_address, help="dddd:bb:ss.f (or bb:ss.f, domain 0000)"
    )
    p.add_argument("--name", metavar="NAME", help="a name for the device (default pci-dddd-bb-ss-f)")
    p.add_argument("--tag", dest="tags", metavar="KEY=VALUE", action=TagAction, help="a tag (repeatable)")
    p = add("unregister", cmd_unregister)
    p.add_argument("device", metavar="ID|NAME")
    p = add("attach", cmd_attach)
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("devices", metavar="DEV", nargs="+", help="device ids or names")
    p.add_argument(
        "--include-group", action="store_true",
        help="also bind the other functions of the same slot (a GPU's HDMI audio)",
    )  # fmt: skip
    p.add_argument("--owner-uid", metavar="UID", type=_uint32, help="give the group node to UID (admin)")
    p.add_argument(
        "--gpudirect-clique", metavar="N", type=_byte,
        help="NVIDIA GPUDirect P2P clique (0-255) for cloud-hypervisor's x_nv_gpudirect_clique",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="even if the host needs the device (admin)")
    p.add_argument(
        "--handoff", choices=("node", "fd"),
        help="node: give the group node to the owner; fd: change no node, the VMM gets descriptors "
        "from OpenDevices (default: vfiod.toml's handoff)",
    )  # fmt: skip
    p = add("detach", cmd_detach)
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("devices", metavar="DEV", nargs="*", help="device ids or names (default: all)")
    p.add_argument("--keep-bound", action="store_true", help="leave the devices on vfio-pci")
    p = add("bind", cmd_bind)
    p.add_argument("device", metavar="ID|NAME")
    p.add_argument("--include-group", action="store_true", help="also bind the other functions of the slot")
    p.add_argument("--force", action="store_true", help="even if the host needs the device")
    p.add_argument("--exclusive", action="store_true", help="fail (AlreadyBound) if it is already on vfio")
    p = add("unbind", cmd_unbind)
    p.add_argument("device", metavar="ID|NAME")
    p.add_argument("--exclusive", action="store_true", help="fail (NotBound) if it is not on vfio")
    p = add("reconcile", cmd_reconcile)
    p.add_argument("live", metavar="LIVE_INSTANCE", nargs="*", help="instances that are still running")
    p.add_argument("--dry-run", action="store_true", help="only report what would be released")
    p.add_argument("--all-users", action="store_true", help="every user's attachments (admin)")
    p.add_argument(
        "--all-dead",
        action="store_true",
        help="with no LIVE_INSTANCE: no instance runs, release every attachment",
    )
    p = add("recover", cmd_recover)
    p.add_argument(
        "device",
        metavar="TARGET",
        nargs="?",
        help="a device (id, name or PCI address), a vGPU parent or a GPU; default: every stuck or "
        "driverless device",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be done")
    p = add("profiles", cmd_profiles)
    p.add_argument("--parent", metavar="PARENT", help="only this parent's types")
    p = add("vgpus", cmd_vgpus)
    p.add_argument("--instance", metavar="INSTANCE", help="only this instance's vGPUs")
    p = add("attach-vgpu", cmd_attach_vgpu)
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("profile", metavar="PROFILE", help="a type id or name, as `vfioctl profiles` shows them")
    p.add_argument("--parent", metavar="PARENT", help="only this parent (or the parents on this PCI GPU)")
    p.add_argument("--uuid", metavar="UUID", help="the mdev uuid to create (default: a new one)")
    p.add_argument("--owner-uid", metavar="UID", type=_uint32, help="give the group node to UID (admin)")
    p.add_argument(
        "--handoff", choices=("node", "fd"),
        help="node: give the group node to the owner; fd: change no node, the VMM gets the vGPU's cdev "
        "from OpenDevices (default: vfiod.toml's handoff for a vendor-VFIO vGPU, node for an mdev)",
    )  # fmt: skip
    add("metrics", cmd_metrics)
    p = add("open-devices", cmd_open_devices)
    p.usage = "vfioctl open-devices [--allow-mdev] INSTANCE [DEV ...] -- COMMAND [ARG ...]"
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("devices", metavar="DEV", nargs="*", help="a device or vGPU id or name (default: all)")
    p.add_argument("--allow-mdev", action="store_true", help="pass an fd-mode mdev's cdev too")
    p.set_defaults(vmm_command=[])  # what follows `--`, split off before parsing (main)
    p = add("vfs", cmd_vfs)
    p.add_argument(
        "pf",
        metavar="PF",
        type=_pci_address,
        help="the physical function: [dddd:]bb:ss.f, or a registered id or name",
    )
    p.add_argument("count", metavar="COUNT", type=_uint32, help="how many VFs it should have (0 disables)")
    p.add_argument("--autoprobe", action="store_true", help="let host drivers probe the new VFs")
    p = add("import-hypeman", cmd_import_hypeman)
    p.add_argument("dir", metavar="DIR", help="hypeman's data directory (holds devices/<id>/metadata.json)")
    add("monitor", cmd_monitor)

    for choice in sub.choices.values():
        _global_options(choice, in_subcommand=True)
    return parser


# ----- entry point -----------------------------------------------------------------------------------------


def target_of(args: argparse.Namespace) -> BusTarget:
    if args.address:
        return BusTarget("address", args.address)
    return BusTarget("session" if args.bus == "session" else "system")


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    interactive = sys.stdin.isatty() and not args.no_ask_password
    fds = args.command == "open-devices"  # the one command that receives descriptors
    client = await Client.connect(
        target_of(args), timeout=args.timeout, interactive=interactive, descriptors=fds
    )
    handler: Command = args.handler
    try:
        with tty_agent(interactive and client.target.kind == "system" and args.command not in READ_ONLY):
            return await handler(Context(args, client, out, err))
    finally:
        client.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["__complete"]:  # the bash completion's questions (vfioctl_complete.py)
        from vfiod.cli import vfioctl_complete  # noqa: PLC0415 -- only when completing

        return vfioctl_complete.run(words[1:], parser)
    # open-devices: everything after `--` is the VMM's command line, never vfioctl's options
    vmm_command: list[str] = []
    if "--" in words and "open-devices" in words[: words.index("--")]:
        words, vmm_command = words[: words.index("--")], words[words.index("--") + 1 :]
    try:
        args = parser.parse_args(words)
    except SystemExit as e:
        # argparse exits for --help (0) and usage errors (2); the console script wants a status back.
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if hasattr(args, "vmm_command"):
        args.vmm_command = vmm_command
    if getattr(args, "handler", None) is None:
        parser.print_usage(sys.stderr)
        print("vfioctl: a command is required (see vfioctl --help)", file=sys.stderr)
        return EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    try:
        status = asyncio.run(run(args, out, err))
        out.flush()  # inside the try: a closed pipe must not become a message at interpreter exit
        return status
    except CallError as e:
        print(f"vfioctl: {e.name}: {e.message}", file=err)
        if e.status == EXIT_UNREACHABLE:
            where = target_of(args).describe()
            print(
                f"vfioctl: is vfiod running on {where}? (--address ADDR or --session pick another bus)",
                file=err,
            )
        return e.status
    except KeyboardInterrupt:
        print("vfioctl: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vfioctl list | head -1`: the reader went away; that is not an error of ours.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # never a traceback
        print(f"vfioctl: Failed: unexpected {type(e).__name__}: {e}", file=err)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
