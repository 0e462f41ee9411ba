"""Validated kernel-facing names: canonical PCI addresses and driver/module names.

These are the only values the host layer accepts for paths and sysfs writes, so a caller's string can
never smuggle a newline, NUL, `/` or `..` into a path or into the bytes written to the kernel.
"""

from __future__ import annotations

import re

# The domain is what the kernel prints with %04x: four hex digits, or more above 0xffff (Intel VMD puts
# the devices behind it in domains from 0x10000: `10000:e1:00.0`).
DOMAIN_PATTERN = r"(?:[0-9a-fA-F]{4}|[1-9a-fA-F][0-9a-fA-F]{4,7})"
PCI_ADDRESS_PATTERN = DOMAIN_PATTERN + r":[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
_PCI_RE = re.compile(PCI_ADDRESS_PATTERN)
_SLOT_RE = re.compile(DOMAIN_PATTERN.replace("A-F", "") + r":[0-9a-f]{2}:[0-9a-f]{2}")
# Kernel driver and module names: letters, digits, '_' and '-' (e.g. vfio-pci, snd_hda_intel).
_DRIVER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class InvalidPciAddressText(ValueError):
    """The text is not a PCI address of the form dddd:bb:ss.f (a domain above ffff has more digits)."""


class InvalidDriverName(ValueError):
    """The text is not a kernel driver or module name."""


class PciAddress(str):
    """A canonical PCI address `dddd:bb:ss.f` (lowercase hex, function 0-7; the domain as the kernel names
    it: four digits, more above ffff).

    Construct only through `parse`; the str value is the canonical form, which is also the device's
    directory name under /sys/bus/pci/devices.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        if not isinstance(text, str):
            raise InvalidPciAddressText(f"PCI address must be a string, not {type(text).__name__}")
        # fullmatch, not match: `$` would accept a trailing newline.
        if _PCI_RE.fullmatch(text) is None:
            raise InvalidPciAddressText(
                f"{text!r} is not a PCI address of the form dddd:bb:ss.f (e.g. 0000:a2:00.0)"
            )
        return str.__new__(cls, text.lower())

    # Indexed from the end: the domain is four digits or more.
    @property
    def domain(self) -> int:
        return int(self[:-8], 16)

    @property
    def bus(self) -> int:
        return int(self[-7:-5], 16)

    @property
    def slot(self) -> int:
        return int(self[-4:-2], 16)

    @property
    def function(self) -> int:
        return int(self[-1], 16)

    @property
    def slot_prefix(self) -> str:
        """`dddd:bb:ss`, shared by every function of one physical slot."""
        return self[:-2]

    def same_slot(self, other: PciAddress) -> bool:
        return self.slot_prefix == other.slot_prefix

    def default_device_name(self) -> str:
        """hypeman's default registry name: `pci-dddd-bb-ss-f`."""
        return "pci-" + self.replace(":", "-").replace(".", "-")


def is_slot_prefix(text: str) -> bool:
    return _SLOT_RE.fullmatch(text) is not None


class DriverName(str):
    """A kernel driver or module name, safe to use as a path component and as a sysfs value."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> DriverName:
        if not isinstance(text, str) or _DRIVER_RE.fullmatch(text) is None:
            raise InvalidDriverName(f"{text!r} is not a kernel driver name")
        return str.__new__(cls, text)


def driver_from_link(name: str | None) -> DriverName | None:
    """The driver (or module) a `driver` (`driver/module`) link's base name names; None without a link."""
    if name is None:
        return None
    try:
        return DriverName.parse(name)
    except InvalidDriverName:
        return None


def group_from_link(name: str | None) -> int | None:
    """The IOMMU group an `iommu_group` link's base name numbers; None without one."""
    try:
        return int(name) if name is not None else None
    except ValueError:
        return None


VFIO_PCI = DriverName.parse("vfio-pci")
# Every vfio variant driver is named `<device>_vfio_pci` (host/vfio_variants.py).
_VARIANT_SUFFIX = "_vfio_pci"


def is_vfio_driver(name: str | None) -> bool:
    """vfio-pci or a variant of it, by name (a variant on a kernel before 6.1 shows no `vfio-dev/`)."""
    return name is not None and (name == VFIO_PCI or name.endswith(_VARIANT_SUFFIX))
