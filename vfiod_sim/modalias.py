"""The simulated `/lib/modules/<release>/modules.alias`: what depmod writes from the modules' PCI id tables.

For every module of the machine (built-in drivers have no line), one line per id-table entry, as modpost
prints it (scripts/mod/file2alias.c `do_pci_entry`): `pci:` for a normal entry and `vfio_pci:` for an
override-only one (`PCI_DRIVER_OVERRIDE_DEVICE_VFIO`, the vfio variant drivers and vfio-pci itself); each
field a fixed-width upper-case hex number or `*` for PCI_ANY_ID, the class bytes only where the mask
covers all of them. Override-only entries exist from Linux 5.18: an older profile lists none.
"""

from __future__ import annotations

from vfiod_sim.model import PCI_ANY_ID, MatchEntry, Profile


def pattern(entry: MatchEntry) -> str:
    """One alias pattern (`vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i*`)."""

    def field(tag: str, value: int) -> str:
        return f"{tag}*" if value == PCI_ANY_ID else f"{tag}{value:08X}"

    def class_byte(tag: str, shift: int) -> str:
        mask = (entry.class_mask >> shift) & 0xFF
        if mask == 0xFF:
            return f"{tag}{(entry.class_code >> shift) & 0xFF:02X}"
        return f"{tag}*"

    return (
        ("vfio_pci:" if entry.override_only else "pci:")
        + field("v", entry.vendor)
        + field("d", entry.device)
        + field("sv", entry.subvendor)
        + field("sd", entry.subdevice)
        + class_byte("bc", 16)
        + class_byte("sc", 8)
        + class_byte("i", 0)
    )


def modules_alias(profile: Profile) -> str:
    names = {m.name for m in profile.modules}
    override_only = profile.kernel_at_least(5, 18)  # PCI_ID_F_VFIO_DRIVER_OVERRIDE arrived in 5.18
    lines = ["# Aliases extracted from modules themselves."]
    for drv in profile.drivers:
        if drv.module is None or drv.module not in names:
            continue
        for entry in drv.id_table:
            if entry.override_only and not override_only:
                continue
            lines.append(f"alias {pattern(entry)} {drv.module}")
    return "\n".join(lines) + "\n"
