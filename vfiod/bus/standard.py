"""The standard D-Bus interfaces as vfiod serves them (Introspectable, Peer, Properties, ObjectManager):
their signatures, the introspection data of each object (generated, so it always matches what is served),
and the machine id Peer.GetMachineId answers. The calls themselves go through the service's dispatch,
authorization and caps like any Manager method.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

from dbus_fast import DBusError, ErrorType, Message, PropertyAccess, Variant
from dbus_fast import introspection as intr
from dbus_fast.service import ServiceInterface

from vfiod import __version__
from vfiod.bus import variants
from vfiod.bus.names import (
    DEVICE_IFACE,
    INTROSPECTABLE_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    PROPERTIES_IFACE,
)
from vfiod.core.errors import Failed

SIGNATURES: Final[dict[tuple[str, str], str]] = {
    (INTROSPECTABLE_IFACE, "Introspect"): "",
    (PEER_IFACE, "Ping"): "",
    (PEER_IFACE, "GetMachineId"): "",
    (PROPERTIES_IFACE, "Get"): "ss",
    (PROPERTIES_IFACE, "GetAll"): "s",
    (PROPERTIES_IFACE, "Set"): "ssv",
    (OBJECT_MANAGER_IFACE, "GetManagedObjects"): "",
}


def device_interface() -> intr.Interface:
    """org.hypeman.Devices1.Device as introspection data: one read-only property per Device record key."""
    return intr.Interface(
        DEVICE_IFACE,
        properties=[
            intr.Property(name, sig, PropertyAccess.READ) for name, sig in variants.DEVICE_PROPERTIES.values()
        ],
    )


def standard_interfaces(*, object_manager: bool) -> list[intr.Interface]:
    ifaces = intr.Node.default().interfaces
    return [i for i in ifaces if object_manager or i.name != OBJECT_MANAGER_IFACE]


# What this daemon offers, for clients to test before they rely on it (the Manager's `Features`).
FEATURES: Final = (
    "sriov",
    "mdev",
    "vgpu-mdev",
    "vgpu-vendor",
    "vfio-variant-drivers",
    "metrics",
    "iommufd",
)
MANAGER_PROPERTIES: Final[dict[str, str]] = {"Version": "s", "Features": "as"}


def manager_properties() -> dict[str, Variant]:
    """The Manager's read-only properties: the running daemon's version (compare with the installed
    package's: the package never restarts a running daemon) and its features."""
    return {"Version": Variant("s", __version__), "Features": Variant("as", list(FEATURES))}


def manager_property_reply(msg: Message, member: str, on_manager: bool) -> Message:
    """Properties.Get/GetAll/Set on the manager object (`on_manager`: asked of the Manager interface)."""
    props = manager_properties() if on_manager else {}
    if member == "GetAll":
        return Message.new_method_return(msg, "a{sv}", [props])
    name = str(msg.body[1])
    if name not in props:
        raise DBusError(ErrorType.UNKNOWN_PROPERTY, f"{msg.body[0]} has no property {name!r}")
    if member == "Set":
        raise DBusError(ErrorType.PROPERTY_READ_ONLY, f"{msg.body[0]}.{name} is read-only")
    return Message.new_method_return(msg, "v", [props[name]])


def introspect(path: str, device_paths: list[str], manager: ServiceInterface) -> str:
    """The introspection XML of `path`: the manager, a device, or a node on the way to them."""
    paths = [MANAGER_PATH, *device_paths]
    if path == MANAGER_PATH:
        iface = manager.introspect()
        iface.properties = [
            intr.Property(n, sig, PropertyAccess.READ) for n, sig in MANAGER_PROPERTIES.items()
        ]
        node = intr.Node(path, [*standard_interfaces(object_manager=True), iface])
    elif path in device_paths:
        node = intr.Node(path, [*standard_interfaces(object_manager=False), device_interface()])
    elif path == "/" or any(p.startswith(path + "/") for p in paths):
        node = intr.Node(
            path, [i for i in standard_interfaces(object_manager=False) if i.name == INTROSPECTABLE_IFACE]
        )
    else:
        raise DBusError(ErrorType.UNKNOWN_OBJECT, f"there is no object at {path}")
    prefix = path.rstrip("/") + "/"
    children = sorted({p[len(prefix) :].split("/", 1)[0] for p in paths if p.startswith(prefix)})
    node.nodes = [intr.Node(c, is_root=False) for c in children]
    return node.tostring()


@functools.cache  # read once: it does not change while vfiod runs
def machine_id() -> str:
    """This host's machine id (systemd's, or D-Bus's own); Failed if it has none."""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(candidate).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if len(text) == 32:
            return text
    raise Failed("this host has no machine id")
