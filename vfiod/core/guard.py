"""Checks that must pass before vfiod changes a device's driver: identity, host-critical use, the IOMMU group
(judged by driver, as the kernel judges viability) and processes holding the device.

Nothing here writes to the kernel. Every check reads the live host, so a decision is never made on stale
registry data.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from vfiod import phases
from vfiod.core import eventlog, kernel_support
from vfiod.core.errors import (
    DeviceBusy,
    Failed,
    HostCritical,
    InUse,
    InvalidArgument,
    IOMMUGroupConflict,
    SriovEnabled,
    VFIONotAvailable,
)
from vfiod.core.hostcritical import host_critical
from vfiod.host import procfs
from vfiod.host.errors import ProcUnreadable
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import (
    Identity,
    PciSnapshot,
    read_function,
)
from vfiod.host.procfs import ProcessInfo

# What /proc/<pid>/fd shows for a VFIO device file (the anonymous inode VFIO_GROUP_GET_DEVICE_FD returns).
VFIO_DEVICE_FILE = "anon_inode:[vfio-device]"
# The nodes of a sound card's devices, as they are named under <dev>/sound/card<N>/ and /dev/snd/.
ALSA_NODE_PREFIXES = ("controlC", "pcmC", "hwC", "midiC")


def check_identity(host: Host, addr: PciAddress, expected: Identity) -> None:
    live = read_function(host, addr).identity
    if live is None:
        raise Failed(f"{addr} is no longer on the bus")
    if live != expected:
        raise Failed(
            f"the card at {addr} is not the registered one: found {live.describe()}, registered "
            f"{expected.describe()}; vfiod will not touch it (unregister and register it again if the card "
            "was replaced on purpose)"
        )


def check_not_host_critical(host: Host, addrs: Iterable[PciAddress], force: bool) -> None:
    """HostCritical for a function the host needs, unless forced (then a warning says what it takes)."""
    critical = host_critical(host)
    for addr in addrs:
        reason = critical.get(addr)
        if reason and force:
            eventlog.host_critical_forced(str(addr), reason)
        elif reason:
            raise HostCritical(
                f"{addr} {reason}; passing it through would take it from the host (an admin may use "
                "force to override)"
            )


@dataclass
class GroupPlan:
    """What one bind request means for one IOMMU group."""

    group: int
    to_bind: list[PciAddress] = field(default_factory=list)  # functions vfiod moves to vfio-pci
    roles: dict[PciAddress, str] = field(default_factory=dict)  # requested | companion
    joined: list[PciAddress] = field(default_factory=list)  # already on vfio, unattached: join as-is
    already_bound: list[PciAddress] = field(default_factory=list)  # requested/companion already on vfio

    @property
    def functions(self) -> list[PciAddress]:
        return sorted(set(self.to_bind) | set(self.joined) | set(self.already_bound))


@phases.timed_call("plan")
def plan_groups(
    host: Host,
    requested: Collection[PciAddress],
    *,
    include_group: bool,
    attached_elsewhere: Mapping[PciAddress, str] | None = None,
) -> list[GroupPlan]:
    """Decide, per IOMMU group, which functions must move to vfio-pci for `requested` to be usable.

    `include_group` adds the other functions of the same slot; any other endpoint of the group must be
    named in `requested`. Members that keep a DMA-owning driver make the request an IOMMUGroupConflict
    naming them; vfio-bound members attached to someone else are a conflict too (`attached_elsewhere`
    maps address -> who holds it); unattached vfio-bound members join.
    """
    attached_elsewhere = attached_elsewhere or {}
    snap = PciSnapshot(host)
    plans: dict[int, GroupPlan] = {}
    wanted: dict[PciAddress, str] = {}
    for addr in sorted(requested):
        fn = snap.function(addr)
        if not fn.present:
            raise Failed(f"{addr} is not on the bus")
        if fn.never_passed_through:
            raise InvalidArgument(f"{addr} is a PCI bridge; bridges are never passed through")
        wanted[addr] = "requested"
    for addr in list(wanted):
        group = snap.function(addr).iommu_group
        if group is None:
            raise VFIONotAvailable(
                f"{addr} has no IOMMU group: the IOMMU is off; {kernel_support.iommu_fix(host)}"
            )
        if include_group:
            for member in snap.members(group):
                other = snap.function(member)
                # A VF is never a companion: with ARI a PF's VFs share its slot prefix, but each is its own
                # device with its own user (drivers/pci/iov.c pci_iov_add_virtfn).
                if other.is_bridge or other.physfn:
                    continue
                if member.same_slot(addr) and member not in wanted:
                    wanted[member] = "companion"
    for addr, role in sorted(wanted.items()):
        group = snap.function(addr).iommu_group
        assert group is not None
        plan = plans.setdefault(group, GroupPlan(group=group))
        plan.roles[addr] = role
        holder = attached_elsewhere.get(addr)
        if holder is not None:
            raise IOMMUGroupConflict(f"{addr} in IOMMU group {group} is attached to {holder}")
        if snap.function(addr).is_vfio_bound:
            plan.already_bound.append(addr)
        else:
            plan.to_bind.append(addr)
    for group, plan in sorted(plans.items()):
        for member in snap.members(group):
            if member in wanted:
                continue
            other = snap.function(member)
            drv = other.driver
            holder = attached_elsewhere.get(member)
            if holder is not None:
                raise IOMMUGroupConflict(
                    f"IOMMU group {group} also holds {member}, which is attached to {holder}; a group can "
                    "only be handed to one owner"
                )
            # Judged by driver, as the kernel judges viability (a bridge too: pcieport leaves DMA to the
            # user, shpchp does not): the same rule as ListAvailable's blockers (PciFunction.dma_neutral).
            if other.dma_neutral and not other.is_vfio_bound:
                continue
            if other.is_vfio_bound:
                plan.joined.append(member)
                plan.roles[member] = "companion"
                continue
            hint = (
                " (pass include_group to bind the other functions of the slot with it)"
                if any(member.same_slot(a) for a in wanted)
                else " (name it in the request, or unbind it from the host first)"
            )
            raise IOMMUGroupConflict(
                f"IOMMU group {group} also holds {member}, bound to {drv}; every member of the group "
                f"must be passed through together{hint}"
            )
    return [plans[g] for g in sorted(plans)]


def require_no_dependents(host: Host, addrs: Iterable[PciAddress]) -> None:
    """Refuse to unbind a function whose driver carries other devices, before anything is written.

    An SR-IOV physical function with VFs enabled (SriovEnabled): its driver's remove disables SR-IOV,
    which removes every VF and ejects each from whatever uses it, and vfio-pci refuses to bind such a PF
    ("Cannot bind to PF with SR-IOV enabled", drivers/vfio/pci/vfio_pci_core.c). An mdev parent with
    mediated devices (InUse): unbinding it removes them all (mdev_unregister_parent). An NVIDIA
    vendor-VFIO VF (InvalidArgument): `nvidia` is its VFIO driver, and an unbind breaks its registration
    until its GPU's VFs are enabled afresh; its vGPU is handed over by AttachVGPU without any rebind."""
    snap = PciSnapshot(host)
    for addr in addrs:
        fn = snap.function(addr)
        if fn.vendor_vgpu_host:
            raise InvalidArgument(
                f"{addr} is an NVIDIA vendor-VFIO VF: it stays bound to nvidia, which is its VFIO driver "
                "(unbinding it breaks the VF until its GPU's VFs are enabled afresh); AttachVGPU hands over "
                "a vGPU on it"
            )
        if fn.sriov_numvfs:
            vfs = []
            for vf in fn.virtfns:
                holders = vfio_holders(host, [vf])
                used = "; ".join(h.describe() for h in holders) if holders else "not held"
                vfs.append(f"{vf} on {snap.function(vf).driver or 'no driver'} ({used})")
            raise SriovEnabled(
                f"{addr} is an SR-IOV physical function with {fn.sriov_numvfs} virtual functions enabled: "
                f"{', '.join(vfs) or 'not listed'}. Unbinding its driver would remove them, and vfio-pci "
                f"refuses such a function; disable them first (echo 0 > "
                f"/sys/bus/pci/devices/{addr}/sriov_numvfs once nothing uses them)"
            )
        if fn.mdev_children:
            raise InUse(
                f"{addr} is the parent of mediated devices {', '.join(fn.mdev_children)}: unbinding its "
                "driver would remove them all (and eject them from their VMs); remove them first"
            )


@dataclass(frozen=True)
class Holder:
    pid: int
    exe: str
    uid: int | None
    path: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.exe or 'unknown executable'}) holds {self.path}"


def _holders(host: Host, paths: set[str], ignore: Callable[[ProcessInfo], bool]) -> list[Holder]:
    if not paths:
        return []
    out: list[Holder] = []
    try:
        for info, path in procfs.iter_holders(host, paths):
            if ignore(info):
                continue
            out.append(Holder(pid=info.pid, exe=info.exe or info.comm, uid=info.uid, path=path))
    except ProcUnreadable as e:
        raise Failed(
            f"cannot tell whether {', '.join(sorted(paths))} is in use: {e} (vfiod needs CAP_SYS_PTRACE "
            "and CAP_DAC_READ_SEARCH to see other processes' open files)"
        ) from e
    return out


def vfio_paths(host: Host, addr: PciAddress, group: int | None) -> set[str]:
    """The nodes through which a VMM uses a vfio-bound device: its group node and its cdev."""
    paths: set[str] = set()
    if group is not None:
        paths.add(f"/dev/vfio/{group}")
    for name in host.list_dir(host.device_dir(addr) / "vfio-dev"):
        paths.add(f"/dev/vfio/devices/{name}")
    return paths


def vfio_holders(host: Host, addrs: Iterable[PciAddress]) -> list[Holder]:
    paths: set[str] = set()
    for addr in addrs:
        paths |= vfio_paths(host, addr, host.iommu_group(addr))
    return _holders(host, paths, lambda _info: False)


@phases.timed_call("holders")
def require_not_held(host: Host, addrs: Iterable[PciAddress], what: str) -> None:
    """Refuse with DeviceBusy while a process holds a group node, a cdev or a VFIO device file: an unbind
    would block in the kernel, uninterruptibly, until the holder lets go.

    /proc/*/fd names group nodes and cdevs, but a VMM that closed its group fd and kept a device fd (or
    only a mapping of one) shows just `anon_inode:[vfio-device]`, which does not say which device. The
    kernel knows: a device file holds its group's file, and the group node has one opener
    (vfio_group_fops_open: -EBUSY), so opening the node once tells exactly whether anyone holds it."""
    addrs = list(addrs)
    holders = vfio_holders(host, addrs)
    if holders:
        raise DeviceBusy(
            f"cannot {what} {', '.join(addrs)}: " + "; ".join(h.describe() for h in holders),
            [(h.pid, h.exe) for h in holders],
        )
    for group in sorted({g for a in addrs if (g := host.iommu_group(a)) is not None}):
        _refuse_if_open(host, group, f"cannot {what} {', '.join(addrs)}")


def _refuse_if_open(host: Host, group: int, subject: str) -> None:
    """DeviceBusy if the kernel says the group node is open (a device file kept after the group fd)."""
    if not _group_open_elsewhere(host, group):
        return
    suspects = _holders(host, {VFIO_DEVICE_FILE}, lambda _info: False)
    named = "; ".join(f"pid {h.pid} ({h.exe or 'unknown executable'})" for h in suspects)
    raise DeviceBusy(
        f"{subject}: /dev/vfio/{group} is held open in the kernel by a VFIO device file (or a mapping of "
        "one) that a VMM kept after closing the group; "
        + (f"processes holding VFIO device files: {named}" if named else "no process shows one in /proc")
        + ". Stop that VMM first",
        [(h.pid, h.exe) for h in suspects],
    )


def mdev_paths(host: Host, uuid: str, group: int) -> set[str]:
    """The nodes through which a VMM uses an mdev: its group node and, on kernels with VFIO cdevs, its
    `/dev/vfio/devices/vfioN` (the mdev's `vfio-dev/`)."""
    paths = {f"/dev/vfio/{group}"}
    for name in host.list_dir(host.mdev_devices_dir / uuid / "vfio-dev"):
        paths.add(f"/dev/vfio/devices/{name}")
    return paths


def vgpu_holders(host: Host, framework: str, parent: str, uuid: str, group: int) -> list[Holder]:
    """The processes /proc shows holding a vGPU: an mdev's group node and cdev, or a vendor-VFIO VF's."""
    if framework == "vendor-vfio":
        return vfio_holders(host, [PciAddress.parse(parent)])
    return group_holders(host, group, uuid)


def group_holders(host: Host, group: int, uuid: str = "") -> list[Holder]:
    """The processes /proc shows holding a vGPU's nodes (its group has no PCI function)."""
    paths = mdev_paths(host, uuid, group) if uuid else {f"/dev/vfio/{group}"}
    return _holders(host, paths, lambda _info: False)


def require_group_free(host: Host, group: int, what: str, uuid: str = "") -> None:
    """DeviceBusy while a process holds a vGPU's group node or cdev: /proc names their openers, and opening
    the group node tells whether a kept device file holds it."""
    holders = group_holders(host, group, uuid)
    if holders:
        raise DeviceBusy(
            f"cannot {what}: " + "; ".join(h.describe() for h in holders), [(h.pid, h.exe) for h in holders]
        )
    _refuse_if_open(host, group, f"cannot {what}")


def _group_open_elsewhere(host: Host, group: int) -> bool:
    """Whether the kernel refuses to open /dev/vfio/<group> because someone has it open (EBUSY)."""
    if not host.vfio_group_node(group).exists():
        return False
    try:
        host.group_status(group)
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def nvidia_minor(host: Host, addr: PciAddress) -> int | None:
    text = host.read_text(host.roots.proc / "driver/nvidia/gpus" / addr / "information")
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Device Minor" and value.strip().isdigit():
            return int(value.strip())
    return None


def native_use_paths(host: Host, addr: PciAddress) -> set[str]:
    """Device nodes through which host processes use a function on its native driver: a GPU's nvidia and
    DRM nodes, and the nodes of a sound card (a GPU's HDMI audio:
    snd_card_free, called by the unbind, waits until every file of the card is closed). Holders of only
    nvidiactl/nvidia-uvm do not pin one GPU, so they are not listed."""
    paths: set[str] = set()
    minor = nvidia_minor(host, addr)
    if minor is not None:
        paths.add(f"/dev/nvidia{minor}")
    dev = host.device_dir(addr)
    # Card numbers are read now, every time: a GPU back from a VM may come back as another card. A
    # virtio-gpu's DRM device is the PCI function's own too (virtio-pci its driver; measured on 6.12).
    for name in host.list_dir(dev / "drm"):
        if name.startswith(("card", "renderD")):
            paths.add(f"/dev/dri/{name}")
    for card in host.list_dir(dev / "sound"):
        if card.startswith("card"):
            for name in host.list_dir(dev / "sound" / card):
                if name.startswith(ALSA_NODE_PREFIXES):
                    paths.add(f"/dev/snd/{name}")
    return paths


def unit_of(info: ProcessInfo) -> str | None:
    """The systemd unit a process runs in, from its cgroup path (`0::/system.slice/x.service`)."""
    for line in info.cgroup.splitlines():
        path = line.rpartition(":")[2]
        last = path.rstrip("/").rpartition("/")[2]
        if last.endswith((".service", ".scope")):
            return last
    return None


@phases.timed_call("holders")
def require_not_in_use(host: Host, addrs: Iterable[PciAddress], ignore_units: Collection[str]) -> None:
    """Refuse with DeviceBusy while host processes (other than the persistence units' own) use a device
    on its native driver: unbinding nvidia from a GPU in use blocks until they let go."""
    addrs = list(addrs)
    paths: set[str] = set()
    for addr in addrs:
        paths |= native_use_paths(host, addr)
    ignored = set(ignore_units)
    holders = _holders(host, paths, lambda info: unit_of(info) in ignored)
    if holders:
        raise DeviceBusy(
            f"{', '.join(addrs)} is in use on the host: "
            + "; ".join(h.describe() for h in holders)
            + " (stop those processes first; vfiod never kills anything)",
            [(h.pid, h.exe) for h in holders],
        )
