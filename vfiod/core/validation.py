"""Validation of every value a D-Bus caller can send, and the device id format.

Owns the contract's rules (the records of dbus/org.hypeman.Devices1.xml) for PCI addresses, device names,
device ids, instance ids and tags. Each validator takes `object` (D-Bus variants can carry any type),
returns the value in its canonical form, or raises one of the errors below (the contract's InvalidPCIAddress,
InvalidName or InvalidArgument) with a sentence naming the offending value through repr(), so control
characters are visible in the message.

Whatever these validators accept never contains a newline, NUL or `/` (tags excepted: the contract allows
`/` in tag keys and values, which are opaque metadata) and is never `.` or `..`. Names and instance ids are
never used as path components (the registry is SQLite), so `a..b`, which the contract's patterns allow,
is accepted.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping
from typing import TypeGuard

from vfiod.core.errors import InvalidArgument, InvalidName, InvalidPCIAddress
from vfiod.host.pciaddr import DOMAIN_PATTERN, InvalidPciAddressText, PciAddress

# Each is the contract's error (what a D-Bus caller receives) and a ValueError (what a parser of files,
# such as the hypeman import, catches): the one place a bad value becomes a named error.


class InvalidPciAddressInput(InvalidPCIAddress, ValueError):
    """A caller-supplied PCI address is not of the form dddd:bb:ss.f."""


class InvalidNameInput(InvalidName, ValueError):
    """A caller-supplied device name (or id-or-name) is not acceptable."""


class InvalidInstanceIdInput(InvalidArgument, ValueError):
    """A caller-supplied instance id is not acceptable."""


class InvalidTagsInput(InvalidArgument, ValueError):
    """A caller-supplied tag dictionary is not acceptable."""


DEVICE_ID_LENGTH = 24
NAME_MIN = 2
NAME_MAX = 128
INSTANCE_ID_MAX = 128
TAGS_MAX = 50
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256

# All patterns are ASCII-only character classes (no \d, \w, IGNORECASE), so Unicode digits and letters
# cannot slip through, and all are used with fullmatch: `$` would accept a trailing newline.
_DEVICE_ID_RE = re.compile(r"[a-z][a-z0-9]{23}")
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_TAG_CHARS_RE = re.compile(r"[A-Za-z0-9 _.:/=+@-]*")
_SHORT_PCI_RE = re.compile(r"[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_PCI_BAD_FUNCTION_RE = re.compile(DOMAIN_PATTERN + r":[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9a-fA-F]")

_ID_FIRST = string.ascii_lowercase
_ID_REST = string.ascii_lowercase + string.digits

# Error messages echo the caller's value; a multi-megabyte string must not become a multi-megabyte log line.
_SHOW_MAX = 80


def _show(value: object) -> str:
    r = repr(value)
    if len(r) <= _SHOW_MAX:
        return r
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return r[:_SHOW_MAX] + "..." + size


def _type_name(value: object) -> str:
    return type(value).__name__


def pci_address(text: object) -> PciAddress:
    """A canonical PCI address (`dddd:bb:ss.f`, lowercase; the domain is required, function 0-7)."""
    if not isinstance(text, str):
        raise InvalidPciAddressInput(f"PCI address must be a string, not {_type_name(text)} ({_show(text)})")
    try:
        return PciAddress.parse(text)
    except InvalidPciAddressText:
        pass
    if _SHORT_PCI_RE.fullmatch(text) is not None:
        hint = f"; the domain is required (did you mean '0000:{text.lower()}'?)"
    elif _PCI_BAD_FUNCTION_RE.fullmatch(text) is not None:
        hint = "; the function number must be 0-7"
    else:
        hint = ""
    raise InvalidPciAddressInput(
        f"{_show(text)} is not a PCI address of the form dddd:bb:ss.f (e.g. 0000:a2:00.0){hint}"
    ) from None


def is_device_id(text: object) -> TypeGuard[str]:
    """True when `text` has the device id format: a lowercase letter then 23 lowercase letters/digits."""
    return isinstance(text, str) and _DEVICE_ID_RE.fullmatch(text) is not None


def looks_like_device_id(text: object) -> bool:
    """Same test as `is_device_id`; reads better where a *name* is being checked for collisions."""
    return is_device_id(text)


def device_name(text: object) -> str:
    """A device name: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`, 2-128 characters, not id-shaped.

    Id-shaped names are refused outright (not only names equal to an existing id) so that a string
    can always be classified as id or name without consulting the registry.
    """
    if not isinstance(text, str):
        raise InvalidNameInput(f"device name must be a string, not {_type_name(text)} ({_show(text)})")
    if len(text) < NAME_MIN or len(text) > NAME_MAX:
        raise InvalidNameInput(
            f"device name {_show(text)} must be {NAME_MIN} to {NAME_MAX} characters long, not {len(text)}"
        )
    if _NAME_RE.fullmatch(text) is None:
        raise InvalidNameInput(
            f"device name {_show(text)} must start with a letter or digit and contain only letters, "
            "digits, '_', '.' and '-'"
        )
    if looks_like_device_id(text):
        raise InvalidNameInput(
            f"device name {_show(text)} has the form of a device id (a lowercase letter then 23 lowercase "
            "letters or digits); choose a name that cannot be mistaken for an id"
        )
    return text


def instance_id(text: object) -> str:
    """An instance id: `[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}`."""
    if not isinstance(text, str):
        raise InvalidInstanceIdInput(f"instance id must be a string, not {_type_name(text)} ({_show(text)})")
    if len(text) > INSTANCE_ID_MAX:
        raise InvalidInstanceIdInput(
            f"instance id {_show(text)} is {len(text)} characters long; at most {INSTANCE_ID_MAX} are allowed"
        )
    if _INSTANCE_ID_RE.fullmatch(text) is None:
        raise InvalidInstanceIdInput(
            f"instance id {_show(text)} must be 1 to {INSTANCE_ID_MAX} characters, start with a letter or "
            "digit and contain only letters, digits, '_', '.', ':' and '-'"
        )
    return text


def tags(value: object) -> dict[str, str]:
    """A tag dictionary: at most 50 entries, keys 1-128 and values 0-256 characters from
    `[A-Za-z0-9 _.:/=+@-]`. Returns a plain dict copy, so later changes to `value` cannot bypass this check.
    """
    if not isinstance(value, Mapping):
        raise InvalidTagsInput(
            f"tags must be a dictionary of strings to strings, not {_type_name(value)} ({_show(value)})"
        )
    if len(value) > TAGS_MAX:
        raise InvalidTagsInput(f"{len(value)} tags given; at most {TAGS_MAX} are allowed")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise InvalidTagsInput(f"tag key {_show(k)} must be a string, not {_type_name(k)}")
        if not isinstance(v, str):
            raise InvalidTagsInput(f"value of tag {_show(k)} must be a string, not {_type_name(v)}")
        if not 1 <= len(k) <= TAG_KEY_MAX:
            raise InvalidTagsInput(f"tag key {_show(k)} must be 1 to {TAG_KEY_MAX} characters long")
        if len(v) > TAG_VALUE_MAX:
            raise InvalidTagsInput(
                f"value of tag {_show(k)} is {len(v)} characters long; at most {TAG_VALUE_MAX} are allowed"
            )
        if _TAG_CHARS_RE.fullmatch(k) is None:
            raise InvalidTagsInput(
                f"tag key {_show(k)} may contain only letters, digits, space and '_.:/=+@-'"
            )
        if _TAG_CHARS_RE.fullmatch(v) is None:
            raise InvalidTagsInput(
                f"value {_show(v)} of tag {_show(k)} may contain only letters, digits, space and '_.:/=+@-'"
            )
        out[k] = v
    return out


def id_or_name(text: object) -> str:
    """A device id or a device name (the two never overlap); anything else is InvalidNameInput."""
    if is_device_id(text):
        return text
    try:
        return device_name(text)
    except InvalidNameInput as e:
        raise InvalidNameInput(f"{_show(text)} is neither a device id nor a valid device name: {e}") from None


def device_or_address(value: object) -> PciAddress | str:
    """A PCI address (text with a ':', which no device id or name contains) or a device id or name."""
    if isinstance(value, PciAddress):
        return value
    if isinstance(value, str) and ":" in value:
        return pci_address(value)
    return id_or_name(value)


def new_device_id() -> str:
    """A fresh device id in cuid2 *format*: 24 characters, a lowercase letter then 23 lowercase base36.

    This is not the cuid2 algorithm (which hashes a counter, time and a fingerprint); it does not need to
    be. Ids are opaque: nothing parses them or relies on their order, so only the format (hypeman's
    contract) and uniqueness matter, and 4.7 + 23 * 5.17 = ~124 bits from `secrets` make a collision
    negligible.
    """
    return secrets.choice(_ID_FIRST) + "".join(secrets.choice(_ID_REST) for _ in range(DEVICE_ID_LENGTH - 1))
