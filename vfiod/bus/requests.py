"""A Manager method call's arguments, checked once and resolved for authorization, the same way for every
method: each argument is validated by its name (a contract error naming it, before anything is read or
authorized), the options against the method's table, and the registered devices a mutating call names
are resolved so that polkit is asked once per device with `device`, `pci_address` and `instance`
details. Reads are authorized before anything is read (their details carry what the caller sent), so an
unauthorized caller learns nothing about the registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from vfiod import phases
from vfiod.bus import variants
from vfiod.bus.methods import Method
from vfiod.bus.names import ACTION_INSPECT
from vfiod.core import validation
from vfiod.core.errors import InvalidArgument, NotFound
from vfiod.core.ops.sriov import MAX_VFS
from vfiod.core.records import Device
from vfiod.host.pciaddr import PciAddress


@dataclass
class Request:
    args: dict[str, Any]  # validated, by argument name
    options: dict[str, Any]  # plain Python values
    devices: list[Device] = field(default_factory=list)  # the registered devices it names, resolved
    details: list[dict[str, str]] = field(default_factory=list)  # one polkit check each

    def flag(self, name: str) -> bool:
        return bool(self.options.get(name, False))


def _checked(name: str, value: Any) -> Any:
    """One in-argument, by its name in the contract."""
    if name == "id_or_name":
        return validation.id_or_name(value) if value else ""
    if name == "devices":
        return [validation.id_or_name(v) for v in value]
    if name == "instance_id":
        return validation.instance_id(value)
    if name == "live_instance_ids":
        return [validation.instance_id(v) for v in value]
    if name == "pci_address":
        return validation.pci_address(value)
    if name == "name":
        return validation.device_name(value) if value else ""
    if name == "pf":
        return validation.device_or_address(value)
    if name == "target":  # Recover: a device, a vGPU parent (mtty, a VF) or a physical GPU, or "" for all
        return validation.device_or_address(value) if value else ""
    if name == "count" and value > MAX_VFS:
        raise InvalidArgument(f"the number of virtual functions must be 0-{MAX_VFS}, not {value}")
    if name == "data_dir" and (not value.startswith("/") or "\0" in value):
        raise InvalidArgument("data_dir must be an absolute path (hypeman's data directory)")
    return value


async def prepare(
    method: Method, values: Sequence[Any], resolve: Callable[[list[str]], Awaitable[list[Device]]]
) -> Request:
    """Validate `values` (the in-arguments, options last) and resolve what to authorize.
    `resolve(keys)` reads the registered devices with those ids or names (NotFound for an unknown one)."""
    *given, raw_options = values
    options: dict[str, Variant] = raw_options
    opts = variants.parse_options(method.name, options)
    args = {name: _checked(name, value) for (name, _), value in zip(method.args, given, strict=True)}
    if "tags" in opts:
        opts["tags"] = validation.tags(opts["tags"])
    if method.needs_devices and not args["devices"]:
        raise InvalidArgument(f"{method.name} needs at least one device id or name")
    req = Request(args, opts)
    instance = args.get("instance_id")
    keys = args.get("devices") or [
        args[k] for k in ("id_or_name", "pf", "target") if isinstance(args.get(k), str) and args[k]
    ]
    target = args.get("target")
    if isinstance(args.get("pf"), PciAddress):  # SetVirtualFunctions of a PF that need not be registered
        req.details = [{"pci_address": str(args["pf"])}]
    elif isinstance(
        target, PciAddress
    ):  # Recover of a PCI function (a GPU, a VF) that need not be registered
        req.details = [{"pci_address": str(target)}]
    elif target:  # Recover by name: a registered device's, or a vGPU parent's (such as mtty)
        try:
            req.devices = await resolve([target])
            req.details = [{"device": d.name, "pci_address": d.pci_address} for d in req.devices]
        except NotFound:
            req.details = [{"device": target}]
    elif "pci_address" in args:  # RegisterDevice: the device is not registered yet
        chosen = args["name"] or args["pci_address"].default_device_name()
        req.details = [{"pci_address": str(args["pci_address"]), "device": chosen}]
    elif method.action == ACTION_INSPECT:
        req.details = [{"device": k} for k in keys] or [{}]
    elif keys:
        with phases.timed("request"):  # the devices named, read from the registry and the kernel
            req.devices = await resolve(keys)
        for device in req.devices:
            one = {"device": device.name, "pci_address": device.pci_address}
            req.details.append({**one, "instance": instance} if instance else one)
    else:
        req.details = [{"instance": instance} if instance else {}]
    return req
