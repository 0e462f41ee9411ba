"""One read model of NVIDIA's vendor-specific VFIO vGPUs (vGPU 17 and later on Linux 6.8+): the SR-IOV VFs
bound to `nvidia` that have an `nvidia/` directory are the parents, each offering what its
`creatable_vgpu_types` lists (`ID    : vGPU Name`, then `%-5d : %s` per type); a VF whose
`current_vgpu_type` is not 0 holds that type's vGPU. The same records as the mdev framework's
(`MdevParent`, `MdevType`, `Mdev`), with `framework` "vendor-vfio", the decimal type id as the type's id and
the VF's address as the parent's name.

A GPU lists only what it can create now (nothing when full, nothing on a VF holding a vGPU), so each
parent also offers, with nothing available, the types its GPU listed before (`Host.vendor_types_seen`):
the profiles stay known and its vGPUs' types keep their names and sizes.

Reads only, through `Host`; the write is `Host.set_vgpu_type`.
"""

from __future__ import annotations

from vfiod.host.host import Host
from vfiod.host.mdev import Mdev, MdevParent, MdevType, parse_address
from vfiod.host.pciaddr import InvalidPciAddressText, PciAddress

FRAMEWORK = "vendor-vfio"
NVIDIA_DRIVER = "nvidia"


def parse_creatable(text: str) -> list[tuple[str, str]]:
    """(type id, name) per line of `creatable_vgpu_types`, the header skipped, malformed lines ignored."""
    out = []
    for line in text.splitlines():
        left, sep, name = line.partition(":")
        ident = left.strip()
        if sep and ident.isdigit() and name.strip():
            out.append((str(int(ident)), name.strip()))
    return out


def vf_addresses(host: Host) -> list[PciAddress]:
    """The functions bound to `nvidia` that have `nvidia/current_vgpu_type` (only VFs do)."""
    out = []
    for name in host.list_dir(host.pci_drivers_dir / NVIDIA_DRIVER):
        try:
            addr = PciAddress.parse(name)
        except InvalidPciAddressText:
            continue
        if is_vendor_vf(host, addr):
            out.append(addr)
    return out


def current_type(host: Host, vf: PciAddress) -> str | None:
    """The VF's vGPU type id ("0": none); None when the VF has no `nvidia/` (not a vendor-VFIO VF)."""
    raw = host.read_text(host.device_dir(vf) / "nvidia" / "current_vgpu_type")
    if raw is None:
        return None
    return str(int(raw)) if raw.isdigit() else "0"


def is_vendor_vf(host: Host, addr: PciAddress) -> bool:
    return host.has_attr(addr, "nvidia/current_vgpu_type")


def _listing(host: Host, vf: PciAddress) -> tuple[str, dict[str, str]] | None:
    """The VF's physical GPU and what it lists now; None if it is not a vendor-VFIO VF."""
    text = host.read_text(host.device_dir(vf) / "nvidia" / "creatable_vgpu_types")
    if text is None:
        return None
    physfn = parse_address(host.link_name(host.device_dir(vf) / "physfn"))
    listed = dict(parse_creatable(text))
    host.vendor_types_seen.setdefault(str(physfn or vf), {}).update(listed)
    return str(physfn or vf), listed


def _parent(host: Host, vf: PciAddress, gpu: str, listed: dict[str, str]) -> MdevParent:
    seen = host.vendor_types_seen.get(gpu, {})
    types = tuple(
        MdevType(
            id=type_id,
            parent=str(vf),
            name=name,
            description="",
            device_api="vfio-pci",
            available=1 if type_id in listed else 0,
        )
        for type_id, name in sorted(seen.items(), key=lambda kv: int(kv[0]))
    )
    physfn = PciAddress.parse(gpu) if gpu != str(vf) else None
    return MdevParent(name=str(vf), pci_address=vf, physfn=physfn, types=types, framework=FRAMEWORK)


def read_parent(host: Host, vf: PciAddress) -> MdevParent | None:
    """The VF as a parent; None if it is not a vendor-VFIO VF."""
    found = _listing(host, vf)
    return _parent(host, vf, *found) if found is not None else None


def read_parents(host: Host) -> list[MdevParent]:
    """Every vendor-VFIO VF as a parent (all listings read before any parent is built, so each offers
    every type its GPU listed)."""
    found = [(vf, _listing(host, vf)) for vf in vf_addresses(host)]
    return [_parent(host, vf, *listing) for vf, listing in found if listing is not None]


def read_vgpu(host: Host, vf: PciAddress) -> Mdev | None:
    """The vGPU on the VF (its type id as the type); None when it has none."""
    current = current_type(host, vf)
    if current is None or current == "0":
        return None
    return Mdev(
        uuid="",
        parent=str(vf),
        type_id=current,
        iommu_group=host.iommu_group(vf),
        driver=host.link_name(host.device_dir(vf) / "driver"),
        framework=FRAMEWORK,
    )


def read_vgpus(host: Host) -> list[Mdev]:
    return [v for v in (read_vgpu(host, vf) for vf in vf_addresses(host)) if v is not None]
