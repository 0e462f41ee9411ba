"""vfioctl's commands: each reads its arguments from the parsed command line, makes its calls through the
`Client`, renders the answer (text or `--json`) and returns the exit status. `vfioctl.py` parses the
command line and picks the command; `vfioctl_render.py` renders."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from vfiod import __version__
from vfiod.bus.names import MANAGER_IFACE, PROPERTIES_IFACE
from vfiod.cli import report, vfioctl_monitor
from vfiod.cli import vfioctl_render as render
from vfiod.cli.vfioctl_bus import (
    EXIT_OK,
    EXIT_USAGE,
    CallError,
    Client,
    dict_of,
    list_of_dicts,
    options,
)


@dataclass
class Context:
    args: argparse.Namespace
    client: Client
    out: TextIO
    err: TextIO

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def marks(self) -> tuple[str, str]:
        return report.marks(getattr(self.out, "encoding", None))

    def write(self, text: str) -> None:
        self.out.write(text)


Command = Callable[[Context], Awaitable[int]]

# ----- commands --------------------------------------------------------------------------------------------


async def cmd_status(ctx: Context) -> int:
    (status,) = await ctx.client.manager("GetHostStatus", {})
    status = dict_of(status)
    running = await _daemon_version(ctx)
    if ctx.json:
        ctx.write(render.to_json({**status, "daemon_version": running, "installed_version": __version__}))
        return EXIT_OK
    ctx.write(report.render_status(status, ctx.marks))
    if running != __version__:
        # The package never restarts a running daemon (a restart during a hung sysfs write is the worst
        # moment), so after an upgrade the old one answers until it is restarted.
        ctx.write(
            f"\nvfiod {running or '(too old to say)'} is running, {__version__} is installed: restart it "
            "when no call is in progress (systemctl restart vfiod.service)\n"
        )
    return EXIT_OK


async def _daemon_version(ctx: Context) -> str:
    """The running daemon's Version property ("" from a daemon older than the property)."""
    try:
        (version,) = await ctx.client.call(
            "Get", "ss", [MANAGER_IFACE, "Version"], interface=PROPERTIES_IFACE
        )
    except CallError:
        return ""
    return str(version)


async def cmd_check(ctx: Context) -> int:
    (status,) = await ctx.client.manager("GetHostStatus", {})
    (devices,) = await ctx.client.manager("ListAvailable", options(all=("b", True)))
    try:
        (profiles,) = await ctx.client.manager("ListProfiles", {})
    except CallError as e:
        if e.name != "org.freedesktop.DBus.Error.UnknownMethod":
            raise
        profiles = []  # a daemon older than this vfioctl (the package keeps it running across upgrades)
    status, devices, profiles = dict_of(status), list_of_dicts(devices), list_of_dicts(profiles)
    pfs = [d for d in devices if d.get("sriov_totalvfs")]
    if ctx.json:
        ctx.write(
            render.to_json(
                {"host": status, "devices": devices, "sharing": {"sriov": pfs, "profiles": profiles}}
            )
        )
    else:
        sharing = report.render_sharing(pfs, profiles)
        ctx.write(report.render_check(status, devices, ctx.marks, sharing=sharing))
    return EXIT_OK


async def cmd_list_available(ctx: Context) -> int:
    opts = options(all=("b", True) if ctx.args.all else None)
    (devices,) = await ctx.client.manager("ListAvailable", opts)
    devices = list_of_dicts(devices)
    ctx.write(
        render.to_json(devices) if ctx.json else report.render_available(devices, ctx.marks, ctx.args.all)
    )
    return EXIT_OK


async def cmd_list(ctx: Context) -> int:
    tags: dict[str, str] = ctx.args.tags or {}
    (devices,) = await ctx.client.manager("ListDevices", options(tags=("a{ss}", tags) if tags else None))
    devices = list_of_dicts(devices)
    ctx.write(render.to_json(devices) if ctx.json else render.render_devices(devices))
    return EXIT_OK


async def cmd_show(ctx: Context) -> int:
    (device,) = await ctx.client.manager("GetDevice", ctx.args.device, {})
    device = dict_of(device)
    ctx.write(render.to_json(device) if ctx.json else render.render_device(device))
    return EXIT_OK


async def cmd_register(ctx: Context) -> int:
    tags: dict[str, str] = ctx.args.tags or {}
    path, device = await ctx.client.manager(
        "RegisterDevice",
        ctx.args.pci_address,
        ctx.args.name or "",
        options(tags=("a{ss}", tags) if tags else None),
    )
    device = dict_of(device)
    device.setdefault("object_path", str(path))
    if ctx.json:
        ctx.write(render.to_json(device))
    else:
        ctx.write(
            f"Registered {device.get('pci_address', ctx.args.pci_address)} as {device.get('name', '?')}\n"
        )
        ctx.write(render.render_device(device))
    return EXIT_OK


async def cmd_unregister(ctx: Context) -> int:
    await ctx.client.manager("UnregisterDevice", ctx.args.device, {})
    ctx.write(
        render.to_json({"unregistered": ctx.args.device}) if ctx.json else f"Unregistered {ctx.args.device}\n"
    )
    return EXIT_OK


async def cmd_attach(ctx: Context) -> int:
    a = ctx.args
    opts = options(
        include_group=("b", True) if a.include_group else None,
        owner_uid=("u", a.owner_uid) if a.owner_uid is not None else None,
        gpudirect_clique=("y", a.gpudirect_clique) if a.gpudirect_clique is not None else None,
        force=("b", True) if a.force else None,
        handoff=("s", a.handoff) if a.handoff else None,
    )
    attachments, warnings = await ctx.client.manager("Attach", a.instance, list(a.devices), opts)
    records = list_of_dicts(attachments)
    warns = [str(w) for w in warnings or []]
    if ctx.json:
        ctx.write(render.to_json(render.attach_document(a.instance, records, warns)))
    else:
        ctx.write(render.render_attach(a.instance, records, warns))
    return EXIT_OK


async def cmd_attach_vgpu(ctx: Context) -> int:
    a = ctx.args
    opts = options(
        parent=("s", a.parent) if a.parent else None,
        uuid=("s", a.uuid) if a.uuid else None,
        owner_uid=("u", a.owner_uid) if a.owner_uid is not None else None,
        handoff=("s", a.handoff) if a.handoff else None,
    )
    attachment, warnings = await ctx.client.manager("AttachVGPU", a.instance, a.profile, opts)
    record = dict_of(attachment)
    warns = [str(w) for w in warnings or []]
    if ctx.json:
        ctx.write(render.to_json(render.vgpu_document(a.instance, record, warns)))
    else:
        ctx.write(render.render_vgpu_attach(a.instance, record, warns))
    return EXIT_OK


async def _devices_of(ctx: Context, instance: str, wanted: Sequence[str]) -> list[dict[str, Any]]:
    """Best effort: the registered devices attached to `instance` (only `wanted` ones, by id or name)."""
    try:
        (devices,) = await ctx.client.manager("ListDevices", {})
    except CallError:
        return []
    mine = [d for d in list_of_dicts(devices) if d.get("attached_to") == instance]
    if wanted:
        mine = [d for d in mine if d.get("id") in wanted or d.get("name") in wanted]
    return sorted(mine, key=lambda d: str(d.get("pci_address")))


async def _refetch(ctx: Context, ids: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for device_id in ids:
        try:
            (device,) = await ctx.client.manager("GetDevice", device_id, {})
        except CallError:
            continue
        out.append(dict_of(device))
    return out


async def cmd_detach(ctx: Context) -> int:
    a = ctx.args
    before = await _devices_of(ctx, a.instance, a.devices)
    opts = options(keep_bound=("b", True) if a.keep_bound else None)
    await ctx.client.manager("Detach", a.instance, list(a.devices), opts)
    after = await _refetch(ctx, [str(d.get("id")) for d in before])
    if ctx.json:
        doc = {
            "instance": a.instance,
            "devices": list(a.devices),
            "keep_bound": bool(a.keep_bound),
            "released": after,
        }
        ctx.write(render.to_json(doc))
        return EXIT_OK
    what = ", ".join(a.devices) if a.devices else "all devices"
    if not before:
        ctx.write(f"Detached {what} from {a.instance} (nothing was attached)\n")
        return EXIT_OK
    ctx.write(f"Detached {what} from {a.instance}{' (kept on vfio)' if a.keep_bound else ''}\n")
    for d in after:
        driver = d.get("driver") or "no driver"
        ctx.write(f"  {d.get('name')} ({d.get('pci_address')}): {driver}, state {d.get('state')}\n")
    return EXIT_OK


def _driver_and_state(devices: Sequence[dict[str, Any]]) -> tuple[object, object] | None:
    return (devices[0].get("driver"), devices[0].get("state")) if devices else None


async def _bind_like(ctx: Context, member: str, verb: str, opts: dict[str, Any]) -> int:
    before = _driver_and_state(await _refetch(ctx, [ctx.args.device]))
    await ctx.client.manager(member, ctx.args.device, opts)
    after = await _refetch(ctx, [ctx.args.device])
    device = after[0] if after else None
    if ctx.json:
        # `changed` for configuration tools (Ansible's changed_when): did the call move the device?
        changed = before is None or before != _driver_and_state(after)
        ctx.write(render.to_json({verb: ctx.args.device, "changed": changed, "device": device}))
    elif device is not None:
        driver = device.get("driver") or "no driver"
        ctx.write(
            f"{device.get('name')} ({device.get('pci_address')}): {driver}, state {device.get('state')}\n"
        )
    else:
        ctx.write(f"{verb.capitalize()} {ctx.args.device}\n")
    return EXIT_OK


async def cmd_bind(ctx: Context) -> int:
    a = ctx.args
    opts = options(
        include_group=("b", True) if a.include_group else None,
        force=("b", True) if a.force else None,
        exclusive=("b", True) if a.exclusive else None,
    )
    return await _bind_like(ctx, "Bind", "bound", opts)


async def cmd_unbind(ctx: Context) -> int:
    return await _bind_like(
        ctx, "Unbind", "unbound", options(exclusive=("b", True) if ctx.args.exclusive else None)
    )


def _report_options(ctx: Context) -> dict[str, Any]:
    return options(dry_run=("b", True) if ctx.args.dry_run else None)


def _write_report(ctx: Context, title: str, report: object) -> int:
    rec = dict_of(report)
    ctx.write(render.to_json(rec) if ctx.json else render.render_report(title, rec))
    return EXIT_OK


async def cmd_reconcile(ctx: Context) -> int:
    live = list(ctx.args.live)
    if not live and not ctx.args.dry_run and not ctx.args.all_dead and not _confirmed(ctx):
        whose = "every user's attachment" if ctx.args.all_users else "every attachment you own"
        ctx.err.write(
            f"vfioctl reconcile: naming no live instance releases {whose}; pass --all-dead if no instance "
            "runs (or name the running ones; --dry-run shows what would be released)\n"
        )
        return EXIT_USAGE
    opts = options(
        dry_run=("b", True) if ctx.args.dry_run else None,
        all_users=("b", True) if ctx.args.all_users else None,
    )
    (report,) = await ctx.client.manager("Reconcile", live, opts)
    dry = " (dry run: nothing changed)" if ctx.args.dry_run else ""
    title = (
        f"Reconcile with live instances {', '.join(live)}{dry}"
        if live
        else f"Reconcile, no live instances{dry}"
    )
    return _write_report(ctx, title, report)


def _confirmed(ctx: Context) -> bool:
    """On a terminal, ask before releasing everything; elsewhere (scripts) never assume a yes."""
    if not sys.stdin.isatty():
        return False
    ctx.err.write("No live instance named: release every attachment as stale? [y/N] ")
    ctx.err.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def cmd_recover(ctx: Context) -> int:
    device = ctx.args.device or ""
    (report,) = await ctx.client.manager("Recover", device, _report_options(ctx))
    dry = " (dry run: nothing changed)" if ctx.args.dry_run else ""
    return _write_report(ctx, f"Recover {device or 'every stuck or driverless device'}{dry}", report)


async def cmd_profiles(ctx: Context) -> int:
    opts = options(parent=("s", ctx.args.parent) if ctx.args.parent else None)
    (profiles,) = await ctx.client.manager("ListProfiles", opts)
    profiles = list_of_dicts(profiles)
    ctx.write(render.to_json(profiles) if ctx.json else render.render_profiles(profiles))
    return EXIT_OK


async def cmd_metrics(ctx: Context) -> int:
    (text,) = await ctx.client.manager("GetMetrics", options())
    ctx.write(str(text))  # the exposition as it is, in both modes (it ends with its newline)
    return EXIT_OK


async def cmd_vgpus(ctx: Context) -> int:
    opts = options(instance=("s", ctx.args.instance) if ctx.args.instance else None)
    (vgpus,) = await ctx.client.manager("ListVGPUs", opts)
    vgpus = list_of_dicts(vgpus)
    ctx.write(render.to_json(vgpus) if ctx.json else render.render_vgpus(vgpus))
    return EXIT_OK


async def cmd_vfs(ctx: Context) -> int:
    a = ctx.args
    opts = options(autoprobe=("b", True) if a.autoprobe else None)
    (vfs,) = await ctx.client.manager("SetVirtualFunctions", a.pf, a.count, opts)
    vfs = [str(v) for v in vfs]
    if ctx.json:
        ctx.write(render.to_json({"pf": a.pf, "vfs": vfs}))
    else:
        ctx.write(f"{a.pf}: {len(vfs)} virtual function{'' if len(vfs) == 1 else 's'}\n")
        ctx.write("".join(f"  {vf}\n" for vf in vfs))
    return EXIT_OK


async def cmd_import_hypeman(ctx: Context) -> int:
    data_dir = os.path.abspath(ctx.args.dir)
    (report,) = await ctx.client.manager("ImportHypeman", data_dir, {})
    return _write_report(ctx, f"Import from hypeman's data directory {data_dir}", report)


async def cmd_monitor(ctx: Context) -> int:
    return await vfioctl_monitor.run(ctx.client, ctx.out, ctx.err, ctx.json)


# Commands that only read: they never need a polkit agent.
