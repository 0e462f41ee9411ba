"""The Manager's GPU-sharing methods: SR-IOV virtual functions (SetVirtualFunctions) and the vGPU
profiles and vGPUs the host offers (ListProfiles, ListVGPUs). A mixin of `Manager`, which owns what they
use (the core's dependencies, the locks, the change listeners, start-up's recovering devices)."""

from __future__ import annotations

from collections.abc import Iterable

from vfiod.core import profiles, validation
from vfiod.core.context import Caller
from vfiod.core.deps import CoreDeps
from vfiod.core.errors import InvalidArgument, NotAuthorized
from vfiod.core.ops import sriov
from vfiod.core.refresh import Refreshes
from vfiod.core.registry import DeviceRow, Registry
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function


class SharingMethods:
    host: Host
    registry: Registry
    deps: CoreDeps
    refreshes: Refreshes
    verify_timeout: float

    def resolve(self, id_or_name: object) -> DeviceRow:
        raise NotImplementedError

    def _changed(self, device_ids: Iterable[str]) -> None:
        raise NotImplementedError

    def _require_settled(self, rows: Iterable[DeviceRow]) -> None:
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
            self.deps, addr, count, autoprobe=autoprobe, wait=self.verify_timeout
        )
        for vf in sorted({*before, *vfs}):  # registered VFs gone or back
            self.refreshes.device(str(vf))
        self._changed([""])
        return [str(vf) for vf in vfs]

    # ----- profiles and vGPUs (inspect) ------------------------------------------------------------------

    def list_profiles(self, parent: object = None) -> list[profiles.Profile]:
        if parent is not None and (not isinstance(parent, str) or "/" in parent or not parent):
            raise InvalidArgument(f"parent must be an mdev parent's device name, not {parent!r}")
        return profiles.list_profiles(self.deps, parent)

    def list_vgpus(self, instance: object = None) -> list[profiles.Vgpu]:
        return profiles.list_vgpus(self.deps, None if instance is None else validation.instance_id(instance))
