"""The Manager's descriptor hand-over (OpenDevices, vfiod/core/ops/handover.py). A mixin of `Manager`,
which owns what it uses (the core's dependencies, the locks, device resolution)."""

from __future__ import annotations

from collections.abc import Sequence

from vfiod.core import validation
from vfiod.core.context import Caller
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import NotOwner
from vfiod.core.locks import GroupLocks, InstanceLocks
from vfiod.core.ops import handover
from vfiod.core.registry import DeviceRow
from vfiod.core.vmm_checks import attach_warnings


class HandoverMethods:
    deps: CoreDeps
    instances: InstanceLocks
    locks: GroupLocks

    def resolve(self, id_or_name: object) -> DeviceRow:
        raise NotImplementedError

    def open_devices(
        self,
        caller: Caller,
        instance_id: object,
        devices: Sequence[object] = (),
        *,
        allow_mdev: bool = False,
        caller_pid: int | None = None,
    ) -> handover.OpenedDevices:
        """Descriptors of the instance's fd-mode devices and vGPUs (all of them when `devices` is empty;
        an mdev's only with `allow_mdev`) and of a fresh /dev/iommu; the caller must own the attachment (the
        admin may open another uid's)."""
        instance = validation.instance_id(instance_id)
        rows = [self._named(d) for d in devices]
        with self.instances.hold(instance):
            wanted = handover.attachments_to_open(self.deps, instance, rows)
            others = sorted({a.owner_uid for a, _ in wanted if a.owner_uid != caller.uid})
            if others and not caller.is_admin({"instance": instance}):
                raise NotOwner(
                    f"instance {instance!r} is attached for uid {', '.join(map(str, others))}, not "
                    f"{caller.uid}; opening another user's devices needs the admin authorization"
                )
            with self.locks.hold(sorted({a.iommu_group for a, _ in wanted})):
                # again under the groups' locks: a Detach may have finished meanwhile
                wanted = handover.attachments_to_open(self.deps, instance, rows)
                opened = handover.open_devices(self.deps, instance, wanted, allow_mdev=allow_mdev)
        opened.warnings += attach_warnings(self.deps.host, caller_pid, container=False)
        return opened

    def _named(self, key: object) -> handover.Opened:
        """A registered device or a vGPU, by its id or name."""
        text = validation.id_or_name(key)
        return self.deps.registry.find_vgpu(text) or self.resolve(text)
