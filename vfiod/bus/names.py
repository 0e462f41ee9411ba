"""The fixed names of the `org.hypeman.Devices1` contract (dbus/org.hypeman.Devices1.xml): bus name,
object paths, interfaces, the error prefix and the polkit action ids, plus the names of the other services
vfiod talks to.

Everything on the bus side (the service, the client `vfioctl`, the tests) takes these from here so a name
is spelled once.
"""

from __future__ import annotations

import re
from typing import Final

BUS_NAME: Final = "org.hypeman.Devices1"
MANAGER_PATH: Final = "/org/hypeman/Devices1"
DEVICES_PATH: Final = "/org/hypeman/Devices1/devices"
MANAGER_IFACE: Final = "org.hypeman.Devices1.Manager"
DEVICE_IFACE: Final = "org.hypeman.Devices1.Device"
ERROR_PREFIX: Final = "org.hypeman.Devices1.Error."

# polkit actions (polkit/org.hypeman.devices.policy)
ACTION_INSPECT: Final = "org.hypeman.devices.inspect"
ACTION_REGISTER: Final = "org.hypeman.devices.register"
ACTION_ATTACH: Final = "org.hypeman.devices.attach"
ACTION_ADMIN: Final = "org.hypeman.devices.admin"

# The standard interfaces vfiod answers itself (after authorizing them like any other method).
DBUS_NAME: Final = "org.freedesktop.DBus"
DBUS_PATH: Final = "/org/freedesktop/DBus"
DBUS_IFACE: Final = "org.freedesktop.DBus"
INTROSPECTABLE_IFACE: Final = "org.freedesktop.DBus.Introspectable"
PEER_IFACE: Final = "org.freedesktop.DBus.Peer"
PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE: Final = "org.freedesktop.DBus.ObjectManager"
STANDARD_IFACES: Final = frozenset({INTROSPECTABLE_IFACE, PEER_IFACE, PROPERTIES_IFACE, OBJECT_MANAGER_IFACE})

POLKIT_NAME: Final = "org.freedesktop.PolicyKit1"
POLKIT_PATH: Final = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE: Final = "org.freedesktop.PolicyKit1.Authority"

SYSTEMD_NAME: Final = "org.freedesktop.systemd1"
SYSTEMD_PATH: Final = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER_IFACE: Final = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT_IFACE: Final = "org.freedesktop.systemd1.Unit"

_PATH_SAFE = re.compile(r"[A-Za-z0-9]")


def error_name(short: str) -> str:
    """`NotFound` -> `org.hypeman.Devices1.Error.NotFound`."""
    return ERROR_PREFIX + short


def path_element(text: str) -> str:
    """An object path element for `text`: cuid2 ids pass unchanged; anything else (an id imported from
    elsewhere) is escaped the way systemd escapes unit names (`_xx` per byte), so it is always valid."""
    if not text:
        return "_"
    if all(_PATH_SAFE.fullmatch(c) for c in text):
        return text
    return "".join(c if _PATH_SAFE.fullmatch(c) else "".join(f"_{b:02x}" for b in c.encode()) for c in text)


def device_path(device_id: str) -> str:
    return f"{DEVICES_PATH}/{path_element(device_id)}"
