"""The Manager's GPU-sharing methods: SR-IOV virtual functions (SetVirtualFunctions), the vGPU profiles
and vGPUs the host offers (ListProfiles, ListVGPUs), AttachVGPU, the vGPU part of Detach, and Recover of
a vGPU parent or a physical GPU. A mixin of
`Manager`, which owns what they use (the core's dependencies, the locks, the change listeners, start-up's
recovering devices)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from vfiod.core import handoff, profiles, validation
from vfiod.core.context import Caller, Report
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import InvalidArgument, NotAuthorized
from vfiod.core.locks import GroupLocks, InstanceLocks
from vfiod.core.ops import gpu_recover, sriov, vgpu
from vfiod.core.records import Attachment
from vfiod.core.refresh import Refreshes
from vfiod.core.registry import AttachmentRow, DeviceRow, Registry, VgpuRow
from vfiod.core.settings import ManagerConfig
from vfiod.core.vmm_checks import attach_warnings
from vfiod.host.host import Host
from vfiod.host.mdev import UUID_RE
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function


class SharingMethods:
    host: Host
    registry: Registry
    deps: CoreDeps
    refreshes: Refreshes
    instances: InstanceLocks
    locks: GroupLocks
    placement: threading.Lock
    config: ManagerConfig

    def resolve(self, id_or_name: object) -> DeviceRow:
        raise NotImplementedError

    def _changed(self, device_ids: Iterable[str]) -> None:
        raise NotImplementedError

    def _require_settled(self, rows: Iterable[DeviceRow]) -> None:
        raise NotImplementedError

    def _require_owner(self, caller: Caller, instance: str, atts: Sequence[AttachmentRow]) -> None:
        raise NotImplementedError

    # ----- SR-IOV (admin) ------------------------------------------------------------------------------

    def set_virtual_functions(
        self, caller: Caller, pf: object, count: object, *, autoprobe: bool = False
    ) -> list[str]:
        """Give a physical function (a device id or name, or a PCI address) `count` VFs; their addresses."""
        target = validation.device_or_address(pf)
        row = None if isinstance(target, PciAddress) else self.resolve(target)
        addr = row.pci_address if row is not None else target
        assert isinstance(addr, PciAddress)
        if not caller.is_admin({"pci_address": str(addr), **({"device": row.name} if row else {})}):
            raise NotAuthorized(
                "SetVirtualFunctions needs the admin authorization (org.hypeman.devices.admin)"
            )
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= sriov.MAX_VFS:
            raise InvalidArgument(f"the number of virtual functions must be 0-{sriov.MAX_VFS}, not {count!r}")
        self._require_settled([row] if row is not None else [])
        before = read_function(self.host, addr).virtfns
        vfs = sriov.set_virtual_functions(
            self.deps, addr, count, autoprobe=autoprobe, wait=self.deps.verify_timeout
        )
        for vf in sorted({*before, *vfs}):  # registered VFs gone or back
            self.refreshes.device(str(vf))
        self._changed([""])
        return [str(vf) for vf in vfs]

    # ----- profiles and vGPUs (inspect) ------------------------------------------------------------------

    def list_profiles(self, parent: object = None) -> list[profiles.Profile]:
        return profiles.list_profiles(self.deps, None if parent is None else _text("parent", parent))

    def list_vgpus(self, instance: object = None) -> list[profiles.Vgpu]:
        return profiles.list_vgpus(self.deps, None if instance is None else validation.instance_id(instance))

    # ----- vGPUs (attach) ------------------------------------------------------------------------------

    def attach_vgpu(
        self,
        caller: Caller,
        instance_id: object,
        profile: object,
        *,
        parent: object = None,
        uuid: object = None,
        owner_uid: int | None = None,
        caller_pid: int | None = None,
        handoff_mode: object = None,
    ) -> tuple[Attachment, list[str]]:
        """Create a vGPU of `profile` for the instance and hand it over (see ops/vgpu)."""
        instance = validation.instance_id(instance_id)
        wanted = _text("profile", profile)
        pin = None if parent in (None, "") else _text("parent", parent)
        chosen = None if uuid in (None, "") else _uuid(uuid)
        mode = None if handoff_mode is None else handoff.parse(handoff_mode)
        owner = caller.uid if owner_uid is None else owner_uid
        if owner != caller.uid and not caller.is_admin({"instance": instance}):
            raise NotAuthorized("attaching for another uid (owner_uid) needs the admin authorization")
        with self.instances.hold(instance), self.placement:
            done = vgpu.already_attached(self.deps, instance, owner, wanted, chosen, mode)
            if done is None:
                done = vgpu.attach_vgpu(
                    self.deps,
                    instance,
                    owner,
                    wanted,
                    pin=pin,
                    uuid=chosen,
                    wait=self.deps.verify_timeout,
                    mode=mode,
                    default_mode=self.config.handoff,
                )
        self._changed([""])
        warnings = attach_warnings(self.host, caller_pid, container=done.handoff == "node")
        if done.mdev_uuid and done.handoff == "fd":
            warnings.append(
                f"the mdev {done.mdev_uuid} is to be handed over by descriptor: OpenDevices gives its cdev "
                "only when asked with allow_mdev, and QEMU recognises a mediated device only by its sysfs "
                f"path, so give it sysfsdev={done.sysfs_path.rstrip('/')} beside fd= (given fd= alone, QEMU "
                "takes it for a physical device and fails)"
            )
        elif done.mdev_uuid and self.config.handoff == "fd":
            warnings.append(
                f"this vGPU is handed over by its group node {done.vfio_group_path or '(none)'}, now the "
                "owner's, although handoff fd is this host's default: an mdev stays in node mode unless "
                "AttachVGPU asks for handoff fd (QEMU recognises a mediated device only by its sysfsdev= "
                "path, and fails on one given by descriptor alone)"
            )
        return done, warnings

    def recover_sharing(self, target: str, dry_run: bool) -> Report | None:
        """Recover of a vGPU parent (its quarantine cleared) or of a physical GPU whose VFs host vGPUs (an
        SR-IOV cycle, refused while a vGPU on it is in use); None when `target` is neither. The caller is
        an admin."""
        with self.placement:
            found = gpu_recover.target(self.deps, target)
            if found is None:
                return None
            kind, parents = found
            report = Report(counters={"candidates": 1, "recovered": 0, "cleared": 0})
            if kind == "parent":
                gpu_recover.clear_quarantine(self.deps, target, report, dry_run)
            else:
                pf = PciAddress.parse(target)
                groups = {
                    g
                    for p in parents
                    if p.pci_address and (g := self.host.iommu_group(p.pci_address)) is not None
                }
                with self.locks.hold(groups):
                    gpu_recover.cycle_gpu(self.deps, pf, parents, report, dry_run)
            return report

    def is_vgpu(self, device_id: str) -> bool:
        return self.registry.get_vgpu(device_id) is not None

    def _vgpus_of(self, instance: str, devices: Sequence[object]) -> tuple[list[VgpuRow], list[object]]:
        """The instance's vGPUs that a Detach of `devices` (all when empty) releases, and the devices named
        that are not vGPUs."""
        mine = [
            r
            for a in self.registry.attachments_of_instance(instance)
            if (r := self.registry.get_vgpu(a.device_id))
        ]
        if not devices:
            return mine, []
        named = {k: r for r in mine for k in (r.id, r.name, r.uuid)}
        return [named[d] for d in devices if isinstance(d, str) and d in named], [
            d for d in devices if not (isinstance(d, str) and d in named)
        ]

    def _release_vgpus(
        self, caller: Caller, instance: str, rows: Sequence[VgpuRow], keep_bound: bool
    ) -> None:
        atts = [a for r in rows if (a := self.registry.attachment_of_device(r.id)) is not None]
        self._require_owner(caller, instance, atts)
        with self.placement:
            vgpu.release(self.deps, instance, rows, keep_bound)
        self._changed([""])


def _text(what: str, value: object) -> str:
    """A profile (type id or name) or a parent (device name or PCI address): printable, no '/'."""
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or "/" in value or not value.isprintable():
        raise InvalidArgument(f"{what} must be {_SHAPES[what]}, not {value!r:.80}")
    return value


_SHAPES = {
    "profile": "a type id or name, as ListProfiles shows them",
    "parent": "a parent's device name or a PCI address",
}


def _uuid(value: object) -> str:
    text = value.lower() if isinstance(value, str) else ""
    if UUID_RE.fullmatch(text) is None:
        raise InvalidArgument(f"uuid must be of the form 8-4-4-4-12 hex digits, not {value!r:.80}")
    return text
