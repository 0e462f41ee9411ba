"""Between Python values and D-Bus variants: the records the core returns become `a{sv}` with the contract's
types, and the `a{sv}` options a caller sends are checked key by key against each method's option table.

Owns checking options against each method's option table (`methods.OPTIONS`), the D-Bus types of record
keys, and the Device interface's CamelCase property names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, cast

from dbus_fast import Variant

from vfiod.bus.methods import OPTIONS
from vfiod.core.errors import InvalidArgument
from vfiod.core.records import NO_OWNER

log = logging.getLogger("vfiod.bus")

_TYPE_WORDS: Final = {
    "b": "a boolean (b)",
    "u": "an unsigned 32-bit integer (u)",
    "y": "a byte (y)",
    "s": "a string (s)",
    "a{ss}": "a string-to-string dictionary (a{ss})",
}


def parse_options(method: str, options: Mapping[str, Variant]) -> dict[str, Any]:
    """The options of a `method` call as plain Python values; InvalidArgument naming the first bad key."""
    known = OPTIONS[method]
    out: dict[str, Any] = {}
    for key in sorted(options):
        value = options[key]
        sig = known.get(key)
        if sig is None:
            choices = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"{method} does not know the option {key!r} (its options: {choices})")
        if not isinstance(value, Variant) or value.signature != sig:
            got = value.signature if isinstance(value, Variant) else type(value).__name__
            raise InvalidArgument(
                f"option {key!r} of {method} must be {_TYPE_WORDS.get(sig, sig)}, not of type {got}"
            )
        out[key] = value.value
    return out


# ----- records -------------------------------------------------------------------------------------------

# Integer keys that are signed (-1 = none); every other integer key of a record is unsigned (u).
SIGNED_KEYS: Final = frozenset({"iommu_group", "numa_node"})
# Keys whose value is a string-to-string map; any other dict is a{sv}.
STRING_MAP_KEYS: Final = frozenset({"tags"})
# Keys whose value is a list of records (aa{sv}) even when it is empty; other lists are as.
RECORD_LIST_KEYS: Final = frozenset({"claims"})
OBJECT_PATH_KEYS: Final = frozenset({"object_path"})
BYTE_KEYS: Final = frozenset({"x_nv_gpudirect_clique"})
_NOT_UNSIGNED: Final = SIGNED_KEYS | BYTE_KEYS


def record(rec: Mapping[str, object]) -> dict[str, Variant]:
    """A core record (`to_record()`) as `a{sv}`: every key typed by the rules above."""
    out = {}
    for key, value in rec.items():
        # The common cases first, decided by the value's class and the key's table exactly as _typed
        # decides them (a listing of 4096 functions makes 100k variants); everything else goes there.
        # Where the class check already is dbus-fast's whole verification of the value, it is not run
        # again (verify=False); object paths and integers (their range) are still verified.
        cls = value.__class__
        if cls is str:
            out[key] = Variant("o", value) if key in OBJECT_PATH_KEYS else Variant("s", value, False)
        elif cls is bool:
            out[key] = Variant("b", value, False)
        elif cls is int and key not in _NOT_UNSIGNED and cast(int, value) >= 0:
            out[key] = Variant("u", value)
        elif (
            cls is list
            and key not in RECORD_LIST_KEYS
            and all(i.__class__ is str for i in cast(list[object], value))
        ):
            out[key] = Variant("as", value, False)
        else:
            out[key] = _variant(key, value)
    return out


def records(recs: list[dict[str, object]]) -> list[dict[str, Variant]]:
    return [record(r) for r in recs]


def _variant(key: str, value: object) -> Variant:
    sig, plain = _typed(key, value)
    return Variant(sig, plain)


def _typed(key: str, value: object) -> tuple[str, Any]:
    if value is None:
        return "s", ""
    if isinstance(value, bool):
        return "b", value
    if isinstance(value, int):
        if key in BYTE_KEYS:
            return "y", value
        if key in SIGNED_KEYS or value < 0:
            if key not in SIGNED_KEYS:
                log.warning("record key %s has the negative value %d; sent as i", key, value)
            return "i", value
        return "u", value
    if isinstance(value, float):
        return "d", value
    if isinstance(value, str):
        return ("o" if key in OBJECT_PATH_KEYS else "s"), value
    if isinstance(value, Mapping):
        if key in STRING_MAP_KEYS:
            return "a{ss}", {str(k): str(v) for k, v in value.items()}
        return "a{sv}", {str(k): _variant(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = list(value)
        if key in RECORD_LIST_KEYS or (items and all(isinstance(i, Mapping) for i in items)):
            return "aa{sv}", [record(i) for i in items if isinstance(i, Mapping)]
        return "as", [str(i) for i in items]
    return "s", str(value)


# ----- the Device interface's properties ----------------------------------------------------------------

# Device record key -> (property name, D-Bus type). One read-only property per record key (object_path is
# the object itself). The order is the introspection order.
DEVICE_PROPERTIES: Final[dict[str, tuple[str, str]]] = {
    "id": ("Id", "s"),
    "name": ("Name", "s"),
    "type": ("Type", "s"),
    "pci_address": ("PciAddress", "s"),
    "vendor_id": ("VendorId", "s"),
    "device_id": ("DeviceId", "s"),
    "subsystem_vendor_id": ("SubsystemVendorId", "s"),
    "subsystem_device_id": ("SubsystemDeviceId", "s"),
    "vendor_name": ("VendorName", "s"),
    "device_name": ("DeviceName", "s"),
    "iommu_group": ("IommuGroup", "i"),
    "bound_to_vfio": ("BoundToVfio", "b"),
    "driver": ("Driver", "s"),
    "native_driver": ("NativeDriver", "s"),
    "state": ("State", "s"),
    "attached_to": ("AttachedTo", "s"),
    "owner_uid": ("OwnerUid", "u"),
    "created_at": ("CreatedAt", "s"),
    "sysfs_path": ("SysfsPath", "s"),
    "vfio_group_path": ("VfioGroupPath", "s"),
    "tags": ("Tags", "a{ss}"),
}
_DEFAULTS: Final[dict[str, Any]] = {"s": "", "i": -1, "u": NO_OWNER, "b": False, "a{ss}": {}}


def device_properties(rec: Mapping[str, object]) -> dict[str, Variant]:
    """The Device interface's property values for a Device record."""
    out: dict[str, Variant] = {}
    for key, (prop, sig) in DEVICE_PROPERTIES.items():
        value = rec.get(key)
        if value is None:
            value = _DEFAULTS[sig]
        if sig == "a{ss}" and isinstance(value, Mapping):
            value = {str(k): str(v) for k, v in value.items()}
        out[prop] = Variant(sig, value)
    return out
