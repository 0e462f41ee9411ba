"""What the bash completion asks vfioctl (`vfioctl __complete WHAT [...]`): its commands, a command's
options, and, from the running daemon, the registered devices' names and ids or the instances they are
attached to. Prints one word per line; prints nothing (and exits 0) when the daemon cannot be reached, so
a completion never shows an error. Not a command of the interface: the completion script is its only user.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from vfiod.cli.vfioctl_bus import BusTarget, CallError, Client, list_of_dicts

TIMEOUT = 2.0  # a completion that waits longer than this is worse than none


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subcommands only there
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


async def _devices(target: BusTarget) -> list[dict[str, object]]:
    try:
        client = await Client.connect(target, timeout=TIMEOUT, interactive=False)
    except CallError:
        return []
    try:
        (devices,) = await client.manager("ListDevices", {})
        return list_of_dicts(devices)
    except CallError:
        return []
    finally:
        client.disconnect()


def run(words: Sequence[str], parser: argparse.ArgumentParser, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    args = list(words)
    target = BusTarget()
    if "--address" in args:
        i = args.index("--address")
        if i + 1 < len(args):
            target = BusTarget("address", args[i + 1])
        del args[i : i + 2]
    what = args[0] if args else ""
    commands = _subparsers(parser)
    found: list[str] = []
    if what == "commands":
        found = sorted(commands)
    elif what == "options":
        sub = commands.get(args[1]) if len(args) > 1 else None
        found = _options(sub if sub is not None else parser)
    elif what in ("devices", "instances"):
        devices = asyncio.run(_devices(target))
        if what == "devices":
            found = sorted({str(d[k]) for d in devices for k in ("name", "id") if d.get(k)})
        else:
            found = sorted({str(d["attached_to"]) for d in devices if d.get("attached_to")})
    out.write("".join(f"{w}\n" for w in found))
    return 0
