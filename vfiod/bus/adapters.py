"""What each Manager method does once its request is checked and authorized (`requests.prepare`, then one
polkit check per resolved device): the core call, on the pool it belongs to, and its answer as the
contract's types. Reads share their answer between identical calls (`shared`); a change is followed by a
re-read of the device objects whatever its outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol, TypeVar

from dbus_fast import MessageFlag, Variant
from dbus_fast.aio import MessageBus

from vfiod.bus import variants
from vfiod.bus.call import CURRENT_MESSAGE
from vfiod.bus.connection import Connection
from vfiod.bus.names import device_path
from vfiod.bus.requests import Request
from vfiod.core.context import Caller
from vfiod.core.errors import Failed, InvalidArgument
from vfiod.core.manager import Manager
from vfiod.core.records import Device

T = TypeVar("T")
Record = dict[str, Variant]


class Runner(Protocol):
    """What an adapter needs from the service."""

    manager: Manager
    bus: MessageBus

    async def render_metrics(self) -> str: ...

    async def shared(self, key: Hashable, fn: Callable[[], T]) -> T: ...

    async def change(self, fn: Callable[[], T]) -> T: ...

    async def sync_quietly(self) -> None: ...


async def _changed(svc: Runner, fn: Callable[[], T]) -> T:
    try:
        return await svc.change(fn)
    finally:
        await svc.sync_quietly()


def device_record(device: Device) -> dict[str, object]:
    """A Device record with its object path (the contract's `object_path` key)."""
    rec = device.to_record()
    rec["object_path"] = device_path(device.id)
    return rec


async def list_available(svc: Runner, caller: Caller, req: Request) -> list[Record]:
    everything = req.flag("all")
    return await svc.shared(
        ("ListAvailable", everything),
        lambda: variants.records([d.to_record() for d in svc.manager.list_available(all_devices=everything)]),
    )


async def list_devices(svc: Runner, caller: Caller, req: Request) -> list[Record]:
    tags = req.options.get("tags")
    return await svc.shared(
        ("ListDevices", tuple(sorted(tags.items())) if tags else None),
        lambda: [variants.record(device_record(d)) for d in svc.manager.list_devices(tags)],
    )


async def get_device(svc: Runner, caller: Caller, req: Request) -> Record:
    key = req.args["id_or_name"]
    return await svc.shared(
        ("GetDevice", key), lambda: variants.record(device_record(svc.manager.get_device(key)))
    )


async def get_host_status(svc: Runner, caller: Caller, req: Request) -> Record:
    return await svc.shared(("GetHostStatus",), lambda: variants.record(svc.manager.host_status()))


async def register_device(svc: Runner, caller: Caller, req: Request) -> tuple[str, Record]:
    addr, name = str(req.args["pci_address"]), req.args["name"]
    tags = req.options.get("tags", {})
    device = await _changed(svc, lambda: svc.manager.register(caller, addr, name, tags))
    return device_path(device.id), variants.record(device_record(device))


async def unregister_device(svc: Runner, caller: Caller, req: Request) -> None:
    (device,) = req.devices
    await _changed(svc, lambda: svc.manager.unregister(caller, device.id))


async def attach(svc: Runner, caller: Caller, req: Request) -> tuple[list[Record], list[str]]:
    attachments, warnings = await _changed(
        svc,
        lambda: svc.manager.attach(
            caller,
            req.args["instance_id"],
            req.args["devices"],
            include_group=req.flag("include_group"),
            owner_uid=req.options.get("owner_uid"),
            gpudirect_clique=req.options.get("gpudirect_clique"),
            force=req.flag("force"),
            caller_pid=caller.pid,
            handoff_mode=req.options.get("handoff"),
        ),
    )
    return variants.records([a.to_record() for a in attachments]), list(warnings)


async def detach(svc: Runner, caller: Caller, req: Request) -> None:
    instance, keys = req.args["instance_id"], req.args["devices"]
    await _changed(svc, lambda: svc.manager.detach(caller, instance, keys, keep_bound=req.flag("keep_bound")))


async def open_devices(svc: Runner, caller: Caller, req: Request) -> list[Any]:
    msg = CURRENT_MESSAGE.get()
    if msg is None or msg.flags & MessageFlag.NO_REPLY_EXPECTED:
        raise InvalidArgument("OpenDevices hands the descriptors over in its reply: call it expecting one")
    if not isinstance(svc.bus, Connection):
        raise Failed("this bus connection cannot pass descriptors")
    opened = await svc.change(
        lambda: svc.manager.open_devices(
            caller,
            req.args["instance_id"],
            req.args["devices"],
            allow_mdev=req.flag("allow_mdev"),
            caller_pid=caller.pid,
        )
    )
    try:
        svc.bus.hand_over(opened.fds)  # from here the connection closes them, once they are written
    except BaseException:
        opened.close()
        raise
    # lists, not tuples: dbus-fast puts each descriptor's index in the reply in place of the number
    return [opened.iommufd, [[i, p, fd] for i, p, fd in opened.devices], opened.warnings]


async def bind(svc: Runner, caller: Caller, req: Request) -> None:
    (device,) = req.devices
    await _changed(
        svc,
        lambda: svc.manager.bind(
            caller,
            device.id,
            include_group=req.flag("include_group"),
            force=req.flag("force"),
            exclusive=req.flag("exclusive"),
        ),
    )


async def unbind(svc: Runner, caller: Caller, req: Request) -> None:
    (device,) = req.devices
    await _changed(svc, lambda: svc.manager.unbind(caller, device.id, exclusive=req.flag("exclusive")))


async def reconcile(svc: Runner, caller: Caller, req: Request) -> Record:
    live = req.args["live_instance_ids"]
    report = await _changed(
        svc,
        lambda: svc.manager.reconcile(
            caller, live, dry_run=req.flag("dry_run"), all_users=req.flag("all_users")
        ),
    )
    return variants.record(report.to_record())


async def recover(svc: Runner, caller: Caller, req: Request) -> Record:
    target = req.devices[0].id if req.devices else str(req.args["target"] or "")
    report = await _changed(svc, lambda: svc.manager.recover(caller, target, dry_run=req.flag("dry_run")))
    return variants.record(report.to_record())


async def list_profiles(svc: Runner, caller: Caller, req: Request) -> list[Record]:
    parent = req.options.get("parent")
    return await svc.shared(
        ("ListProfiles", parent),
        lambda: variants.records([p.to_record() for p in svc.manager.list_profiles(parent)]),
    )


async def list_vgpus(svc: Runner, caller: Caller, req: Request) -> list[Record]:
    instance = req.options.get("instance")
    return await svc.shared(
        ("ListVGPUs", instance),
        lambda: variants.records([v.to_record() for v in svc.manager.list_vgpus(instance)]),
    )


async def attach_vgpu(svc: Runner, caller: Caller, req: Request) -> tuple[Record, list[str]]:
    attachment, warnings = await _changed(
        svc,
        lambda: svc.manager.attach_vgpu(
            caller,
            req.args["instance_id"],
            req.args["profile"],
            parent=req.options.get("parent"),
            uuid=req.options.get("uuid"),
            owner_uid=req.options.get("owner_uid"),
            caller_pid=caller.pid,
            handoff_mode=req.options.get("handoff"),
        ),
    )
    return variants.record(attachment.to_record()), list(warnings)


async def set_virtual_functions(svc: Runner, caller: Caller, req: Request) -> list[str]:
    pf = req.devices[0].id if req.devices else req.args["pf"]
    count, autoprobe = req.args["count"], req.flag("autoprobe")
    return await _changed(
        svc, lambda: svc.manager.set_virtual_functions(caller, pf, count, autoprobe=autoprobe)
    )


async def import_hypeman(svc: Runner, caller: Caller, req: Request) -> Record:
    data_dir = req.args["data_dir"]
    report = await _changed(svc, lambda: svc.manager.import_hypeman(caller, data_dir))
    return variants.record(report.to_record())


async def get_metrics(svc: Runner, caller: Caller, req: Request) -> str:
    return await svc.render_metrics()


Adapter = Callable[[Runner, Caller, Request], Awaitable[Any]]
ADAPTERS: dict[str, Adapter] = {
    "list_available": list_available,
    "open_devices": open_devices,
    "list_devices": list_devices,
    "get_device": get_device,
    "get_host_status": get_host_status,
    "register_device": register_device,
    "unregister_device": unregister_device,
    "attach": attach,
    "detach": detach,
    "bind": bind,
    "unbind": unbind,
    "reconcile": reconcile,
    "recover": recover,
    "list_profiles": list_profiles,
    "list_vgpus": list_vgpus,
    "attach_vgpu": attach_vgpu,
    "set_virtual_functions": set_virtual_functions,
    "import_hypeman": import_hypeman,
    "get_metrics": get_metrics,
}
