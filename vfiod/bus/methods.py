"""Each method of `org.hypeman.Devices1.Manager`, described once: its name, in and out arguments (names and
D-Bus types), its options and their types, its polkit action, the options that need the admin action too,
and the `Service` adapter that runs it.

Everything else is derived from this table: the dbus-fast interface (`manager_interface`), the option
table `variants.parse_options` checks against, the Manager part of the authorization table, the admin
options, and vfioctl's call signatures. `tests/bus/test_interface.py` compares the live service, generated
from here, with `dbus/org.hypeman.Devices1.xml`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Protocol

from dbus_fast.annotations import DBusSignature
from dbus_fast.service import ServiceInterface, dbus_method

from vfiod.bus.names import ACTION_ADMIN, ACTION_ATTACH, ACTION_INSPECT, ACTION_REGISTER, MANAGER_IFACE

OPTIONS_ARG: Final = ("options", "a{sv}")


@dataclass(frozen=True)
class Method:
    name: str
    args: tuple[tuple[str, str], ...]  # (name, D-Bus type) before the trailing options a{sv}
    out: tuple[tuple[str, str], ...]
    options: Mapping[str, str]  # option key -> D-Bus type
    action: str  # the polkit action every call needs
    handler: str  # the Service coroutine that runs it: handler(call, *args, options)
    # options that need the admin action as well (the manager asks, through Caller.is_admin, because only
    # it knows e.g. whose attachment a device is)
    admin_options: frozenset[str] = field(default_factory=frozenset)
    needs_devices: bool = False  # its `devices` argument may not be empty

    @property
    def in_signature(self) -> str:
        return "".join(sig for _, sig in (*self.args, OPTIONS_ARG))

    @property
    def out_signature(self) -> str:
        return "".join(sig for _, sig in self.out)


METHODS: Final[tuple[Method, ...]] = (
    Method("ListAvailable", (), (("devices", "aa{sv}"),), {"all": "b"}, ACTION_INSPECT, "list_available"),
    Method("ListDevices", (), (("devices", "aa{sv}"),), {"tags": "a{ss}"}, ACTION_INSPECT, "list_devices"),
    Method("GetDevice", (("id_or_name", "s"),), (("device", "a{sv}"),), {}, ACTION_INSPECT, "get_device"),
    Method("GetHostStatus", (), (("status", "a{sv}"),), {}, ACTION_INSPECT, "get_host_status"),
    Method(
        "RegisterDevice",
        (("pci_address", "s"), ("name", "s")),
        (("path", "o"), ("device", "a{sv}")),
        {"tags": "a{ss}"},
        ACTION_REGISTER,
        "register_device",
    ),
    Method("UnregisterDevice", (("id_or_name", "s"),), (), {}, ACTION_REGISTER, "unregister_device"),
    Method(
        "Attach",
        (("instance_id", "s"), ("devices", "as")),
        (("attachments", "aa{sv}"), ("warnings", "as")),
        {"include_group": "b", "owner_uid": "u", "gpudirect_clique": "y", "force": "b", "handoff": "s"},
        ACTION_ATTACH,
        "attach",
        frozenset({"owner_uid", "force"}),
        needs_devices=True,
    ),
    Method(
        "Detach",
        (("instance_id", "s"), ("devices", "as")),
        (),
        {"keep_bound": "b"},
        ACTION_ATTACH,
        "detach",
    ),
    Method(
        "Bind",
        (("id_or_name", "s"),),
        (),
        {"include_group": "b", "force": "b", "exclusive": "b"},
        ACTION_ADMIN,
        "bind",
    ),
    Method("Unbind", (("id_or_name", "s"),), (), {"exclusive": "b"}, ACTION_ADMIN, "unbind"),
    Method(
        "Reconcile",
        (("live_instance_ids", "as"),),
        (("report", "a{sv}"),),
        {"dry_run": "b", "all_users": "b"},
        ACTION_ATTACH,
        "reconcile",
        frozenset({"all_users"}),
    ),
    Method("Recover", (("target", "s"),), (("report", "a{sv}"),), {"dry_run": "b"}, ACTION_ADMIN, "recover"),
    Method("ListProfiles", (), (("profiles", "aa{sv}"),), {"parent": "s"}, ACTION_INSPECT, "list_profiles"),
    Method("ListVGPUs", (), (("vgpus", "aa{sv}"),), {"instance": "s"}, ACTION_INSPECT, "list_vgpus"),
    Method(
        "AttachVGPU",
        (("instance_id", "s"), ("profile", "s")),
        (("attachment", "a{sv}"), ("warnings", "as")),
        {"parent": "s", "uuid": "s", "owner_uid": "u", "handoff": "s"},
        ACTION_ATTACH,
        "attach_vgpu",
        frozenset({"owner_uid"}),
    ),
    Method(
        "SetVirtualFunctions",
        (("pf", "s"), ("count", "u")),
        (("vfs", "as"),),
        {"autoprobe": "b"},
        ACTION_ADMIN,
        "set_virtual_functions",
    ),
    Method(
        "OpenDevices",
        (("instance_id", "s"), ("devices", "as")),
        (("iommufd", "h"), ("devices", "a(ssh)"), ("warnings", "as")),
        {"allow_mdev": "b"},
        ACTION_ATTACH,
        "open_devices",
    ),
    Method("ImportHypeman", (("data_dir", "s"),), (("report", "a{sv}"),), {}, ACTION_ADMIN, "import_hypeman"),
    Method("GetMetrics", (), (("metrics", "s"),), {}, ACTION_INSPECT, "get_metrics"),
)

BY_NAME: Final[dict[str, Method]] = {m.name: m for m in METHODS}
OPTIONS: Final[dict[str, Mapping[str, str]]] = {m.name: m.options for m in METHODS}
ADMIN_OPTIONS: Final[dict[str, frozenset[str]]] = {
    m.name: m.admin_options for m in METHODS if m.admin_options
}
MANAGER_ACTIONS: Final[dict[tuple[str, str], str]] = {(MANAGER_IFACE, m.name): m.action for m in METHODS}


class Dispatcher(Protocol):
    """What the generated interface hands every call to (the Service)."""

    async def dispatch(self, method: Method, args: tuple[Any, ...]) -> Any: ...


def manager_interface(dispatcher: Dispatcher) -> ServiceInterface:
    """org.hypeman.Devices1.Manager as a dbus-fast interface: one method per table entry, each handing its
    arguments to `dispatcher.dispatch`."""
    iface = _ManagerInterface()
    iface.dispatcher = dispatcher
    for method in iface.introspect().methods:
        names = [n for n, _ in BY_NAME[method.name].out]
        for arg, name in zip(method.out_args, names, strict=True):
            arg.name = name  # dbus-fast names out arguments only when it can take them from Python
    return iface


def _generated(method: Method) -> Callable[..., Any]:
    async def call(self: _ManagerInterfaceBase, *args: Any) -> Any:
        return await self.dispatcher.dispatch(method, args)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, sig in (*method.args, OPTIONS_ARG):
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[Any, DBusSignature(sig)]
            )
        )
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=Annotated[Any, DBusSignature(method.out_signature)]
    )
    call.__name__ = call.__qualname__ = method.handler
    return dbus_method(name=method.name)(call)


class _ManagerInterfaceBase(ServiceInterface):
    dispatcher: Dispatcher

    def __init__(self) -> None:
        super().__init__(MANAGER_IFACE)


_ManagerInterface: type[_ManagerInterfaceBase] = type(
    "ManagerInterface",
    (_ManagerInterfaceBase,),
    {
        "__doc__": "org.hypeman.Devices1.Manager, generated from METHODS",
        **{m.handler: _generated(m) for m in METHODS},
    },
)
