"""The manager: every method of the contract's Manager interface, as a thin facade over the core's
operations. It owns what spans calls: the group and instance locks, the devices still being recovered after
a restart, the change listeners and the deferred refreshes; it makes the admin decisions that need to know
whose device or attachment something is (through `Caller.is_admin`), validates what the bus layer passes
through, takes the locks, and delegates to `registration`, `ops.attach`, `ops.release`, `reconcile` and
`recovery`, which all work on one `CoreDeps`. The GPU-sharing methods (SR-IOV, profiles, vGPUs) are its
mixin `SharingMethods` (manager_sharing.py).

Every method is blocking and thread-safe: the bus layer runs it in a worker thread. Locks: the instance
lock, then one per IOMMU group (sorted); the persistence hold and the registry have their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from vfiod import phases
from vfiod.core import (
    discovery,
    eventlog,
    handoff,
    hypeman_import,
    reads,
    reconcile,
    recovery,
    registration,
    validation,
)
from vfiod.core.binder import Binder
from vfiod.core.context import Caller, Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import (
    fresh,
    group_of,
    log_fields,
    members,
    require_no_pending,
    require_usable,
)
from vfiod.core.errors import (
    AlreadyBound,
    InUse,
    InvalidArgument,
    NotAuthorized,
    NotBound,
    NotFound,
    NotOwner,
)
from vfiod.core.locks import GroupLocks, InstanceLocks
from vfiod.core.manager_handover import HandoverMethods
from vfiod.core.manager_sharing import SharingMethods
from vfiod.core.ops import attach as attach_op
from vfiod.core.ops import release
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.core.persistence import PersistenceHold
from vfiod.core.records import Attachment, Device
from vfiod.core.refresh import Refreshes
from vfiod.core.registry import AttachmentRow, DeviceRow, Registry
from vfiod.core.settings import ManagerConfig
from vfiod.core.startup import Startup
from vfiod.core.system import GpuSriov, ModuleLoader, UnitController
from vfiod.core.vmm_checks import attach_warnings
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.host.sriov_manage import NvidiaSriovManage
from vfiod.logevents import Action

log = logging.getLogger("vfiod.manager")


class Manager(SharingMethods, HandoverMethods):
    def __init__(
        self,
        host: Host,
        registry: Registry,
        modules: ModuleLoader,
        units: UnitController,
        *,
        config: ManagerConfig | None = None,
        pci_ids: PciIds | None = None,
        verify_timeout: float = 5.0,
        gpu_sriov: GpuSriov | None = None,
    ) -> None:
        self.host = host
        self.registry = registry
        self.config = config or ManagerConfig()
        self.boot_id = host.boot_id() or "unknown-boot"
        self.modules = modules
        self.units = units
        cfg = self.config
        self.hold = PersistenceHold(
            registry, units, self.boot_id, cfg.units_by_vendor, cfg.persistence_linger
        )
        self.locks = GroupLocks()
        self.instances = InstanceLocks()
        self.placement = threading.Lock()  # vGPU placement and creation, one at a time
        self.deps = CoreDeps(
            host=host,
            registry=registry,
            hold=self.hold,
            boot_id=self.boot_id,
            locks=self.locks,
            pci_ids=pci_ids or default_pci_ids(),
            binder_factory=lambda op: Binder(host, modules, op, verify_timeout=verify_timeout),
            changed=self._changed,
            verify_timeout=verify_timeout,
            gpu_sriov=gpu_sriov or NvidiaSriovManage(host),
        )
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()  # guards the listeners
        self._startup = Startup(self.deps)
        self.refreshes = Refreshes(self.deps, self._startup.is_recovering)
        self.locks.after_release = self.refreshes.run_deferred
        host.add_write_listener(self.refreshes.late_write)

    # ----- change notification (the bus layer emits PropertiesChanged / ObjectManager signals) -----------

    def add_change_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(device_id)` after every change vfiod makes to a registered device ("" = the set of
        devices changed)."""
        with self._lock:
            self._listeners.append(listener)

    def _changed(self, device_ids: Iterable[str]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for device_id in sorted(set(device_ids)):
            for listener in listeners:
                try:
                    listener(device_id)
                except Exception:
                    log.exception("change listener failed")

    # ----- reads ---------------------------------------------------------------------------------------

    def list_available(self, *, all_devices: bool = False) -> list[discovery.AvailableDevice]:
        return reads.list_available(self.deps, all_devices=all_devices)

    def host_status(self) -> dict[str, object]:
        return reads.host_status_record(self.deps)

    def resolve(self, id_or_name: object) -> DeviceRow:
        return reads.resolve(self.deps, id_or_name)

    def device(self, row: DeviceRow) -> Device:
        return reads.device(self.deps, row)

    def get_device(self, id_or_name: object) -> Device:
        return reads.get_device(self.deps, id_or_name)

    def list_devices(self, tags: Mapping[str, str] | None = None) -> list[Device]:
        return reads.list_devices(self.deps, tags)

    # ----- register / unregister ----------------------------------------------------------------------

    def register(self, caller: Caller, pci_address: object, name: object = "", tags: object = None) -> Device:
        addr = validation.pci_address(pci_address)
        chosen = addr.default_device_name() if name in ("", None) else validation.device_name(name)
        tag_map = validation.tags(tags if tags is not None else {})
        info = discovery.describe(self.host, addr, self.deps.pci_ids)
        allowed = registration.registrable_without_admin(self.deps, addr, info, self.config.register_allow)
        if not allowed and not caller.is_admin({"pci_address": str(addr), "device": chosen}):
            raise NotAuthorized(
                f"{addr} ({info.vendor_name} {info.device_name}, class {info.class_}) is not a display "
                "controller or one of its functions; registering it needs the admin authorization "
                "(org.hypeman.devices.admin) or an entry in register_allow"
            )
        row = registration.new_row(self.deps, addr, chosen, tag_map, info)
        with self.locks.hold([row.iommu_group]):
            stored = self.registry.add_device(row)
        log.info(
            "registered %s as %s (%s)",
            addr,
            chosen,
            stored.id,
            extra=log_fields(stored, action=Action.REGISTER_DEVICE, uid=caller.uid),
        )
        self._changed([""])
        return self.device(stored)

    def unregister(self, caller: Caller, id_or_name: object) -> None:
        row = self.resolve(id_or_name)
        rows = [row, *registration.companions_of(self.deps, row)]  # they go with it
        self._require_settled(rows)
        with self.locks.hold({r.iommu_group for r in rows}):
            gone = release.unregister(self.deps, rows)
        caller.acted(r.pci_address for r in gone)
        for r in gone:
            log.info(
                "unregistered %s",
                r.name,
                extra=log_fields(r, action=Action.UNREGISTER_DEVICE, uid=caller.uid),
            )
        self._changed([""])

    # ----- attach / detach -----------------------------------------------------------------------------

    def attach(
        self,
        caller: Caller,
        instance_id: object,
        devices: Sequence[object],
        *,
        include_group: bool = False,
        owner_uid: int | None = None,
        gpudirect_clique: int | None = None,
        force: bool = False,
        caller_pid: int | None = None,
        handoff_mode: object = None,
    ) -> tuple[list[Attachment], list[str]]:
        instance = validation.instance_id(instance_id)
        mode = self.config.handoff if handoff_mode is None else handoff.parse(handoff_mode)
        if not devices:
            raise InvalidArgument("Attach needs at least one device id or name")
        rows = _unique([self.resolve(d) for d in devices])
        owner = caller.uid if owner_uid is None else owner_uid
        details = {"instance": instance, "device": ",".join(r.name for r in rows)}
        if owner != caller.uid and not caller.is_admin(details):
            raise NotAuthorized("attaching for another uid (owner_uid) needs the admin authorization")
        if force and not caller.is_admin(details):
            raise NotAuthorized("force needs the admin authorization")
        if gpudirect_clique is not None and not 0 <= gpudirect_clique <= 255:
            raise InvalidArgument("gpudirect_clique must be 0-255")
        self._require_settled(rows)
        groups = [group_of(self.deps, r) for r in rows]
        with self.instances.hold(instance), self.locks.hold(groups):
            rows = [fresh(self.deps, r) for r in rows]
            require_no_pending(self.deps, (a for g in groups for a in members(self.deps, g)))
            for row in rows:
                require_usable(self.deps, row)
                att = self.registry.attachment_of_device(row.id)
                if att is not None and (att.instance_id != instance or att.owner_uid != owner):
                    raise InUse(
                        f"device {row.name!r} is attached to instance {att.instance_id!r} (uid "
                        f"{att.owner_uid})"
                    )
            done = attach_op.already_attached(self.deps, instance, owner, rows, gpudirect_clique, mode)
            if done is not None:
                caller.acted(a.pci_address for a in done)
                return done, attach_warnings(
                    self.host, caller_pid, [PciAddress.parse(a.pci_address) for a in done]
                )
            result = attach_op.attach(
                self.deps,
                instance,
                owner,
                rows,
                include_group=include_group,
                clique=gpudirect_clique,
                force=force,
                mode=mode,
            )
        eventlog.attached(caller, instance, owner, [a.pci_address for a in result])
        with phases.timed("warnings"):
            addrs = [PciAddress.parse(a.pci_address) for a in result]
            return result, attach_warnings(self.host, caller_pid, addrs, container=mode == "node")

    def detach(
        self,
        caller: Caller,
        instance_id: object,
        devices: Sequence[object] = (),
        *,
        keep_bound: bool = False,
    ) -> None:
        instance = validation.instance_id(instance_id)
        # The instance first: a Detach sent while this instance's Attach still runs waits for it, then
        # releases what it attached (rather than finding nothing yet and answering success).
        with self.instances.hold(instance):
            self._detach_instance(caller, instance, devices, keep_bound)

    def _detach_instance(
        self, caller: Caller, instance: str, devices: Sequence[object], keep_bound: bool
    ) -> None:
        vgpus, devices = self._vgpus_of(instance, devices)
        if vgpus:
            self._release_vgpus(caller, instance, vgpus, keep_bound)
            if not devices:
                return  # only vGPUs were named
        groups = self._detach_groups(instance, devices)
        if not groups:
            return  # unknown or already detached: success, so a client that timed out can retry
        atts = [a for a in self.registry.attachments_of_instance(instance) if a.iommu_group in groups]
        self._require_owner(caller, instance, atts)
        self._require_settled(
            r for r in (self.registry.get_device(a.device_id) for a in atts) if r is not None
        )
        with self.locks.hold(groups):
            atts = [a for a in self.registry.attachments_of_instance(instance) if a.iommu_group in groups]
            if not atts:
                return
            self._require_owner(caller, instance, atts)  # again: who holds it may have changed meanwhile
            rows = [r for r in (self.registry.get_device(a.device_id) for a in atts) if r is not None]
            require_no_pending(self.deps, (r.pci_address for r in rows))
            caller.acted(r.pci_address for r in rows)
            release.detach(self.deps, instance, rows, groups, keep_bound)
        eventlog.detached(caller, instance, [r.pci_address for r in rows])
        self._changed(r.id for r in rows)

    def _require_owner(self, caller: Caller, instance: str, atts: Sequence[AttachmentRow]) -> None:
        others = sorted({a.owner_uid for a in atts if a.owner_uid != caller.uid})
        if others and not caller.is_admin({"instance": instance}):
            raise NotOwner(
                f"instance {instance!r} is attached for uid {', '.join(map(str, others))}, not {caller.uid}; "
                "detaching another user's attachment needs the admin authorization"
            )

    def _detach_groups(self, instance: str, devices: Sequence[object]) -> set[int]:
        atts = [a for a in self.registry.attachments_of_instance(instance) if not self.is_vgpu(a.device_id)]
        if not devices:
            return {a.iommu_group for a in atts}
        wanted = {self.resolve(d).id for d in devices}
        return {a.iommu_group for a in atts if a.device_id in wanted}

    # ----- bind / unbind (admin) ----------------------------------------------------------------------

    def bind(
        self,
        caller: Caller,
        id_or_name: object,
        *,
        include_group: bool = False,
        force: bool = False,
        exclusive: bool = False,
    ) -> None:
        row = self.resolve(id_or_name)
        self._require_admin(caller, "Bind", row)
        self._require_settled([row])
        with self.locks.hold([group_of(self.deps, row)]):
            row = fresh(self.deps, row)
            require_no_pending(self.deps, members(self.deps, group_of(self.deps, row)))
            require_usable(self.deps, row)
            if read_function(self.host, row.pci_address).is_vfio_bound:
                if exclusive:
                    raise AlreadyBound(f"device {row.name!r} ({row.pci_address}) is already on vfio")
                if row.state == "host":
                    self.registry.update_device(row.id, state="vfio")
                return
            moved = attach_op.bind(self.deps, row, include_group=include_group, force=force)
        caller.acted(r.pci_address for r in moved)
        log.info(
            "bound %s to vfio-pci", row.pci_address, extra=log_fields(row, action=Action.BIND, uid=caller.uid)
        )
        self._changed(r.id for r in moved)

    def unbind(self, caller: Caller, id_or_name: object, *, exclusive: bool = False) -> None:
        row = self.resolve(id_or_name)
        self._require_admin(caller, "Unbind", row)
        self._require_settled([row])
        with self.locks.hold([group_of(self.deps, row)]):
            row = fresh(self.deps, row)
            require_no_pending(self.deps, [row.pci_address])
            att = self.registry.attachment_of_device(row.id)
            if att is not None:
                raise InUse(
                    f"device {row.name!r} is attached to instance {att.instance_id!r}; detach it instead"
                )
            if not read_function(self.host, row.pci_address).is_vfio_bound:  # gone or not on vfio
                if exclusive:
                    raise NotBound(f"device {row.name!r} ({row.pci_address}) is not on vfio")
                return
            row = release.unbind(self.deps, row)
        log.info("unbound %s", row.pci_address, extra=log_fields(row, action=Action.UNBIND, uid=caller.uid))
        self._changed([row.id])

    # ----- start-up, reconcile, recover, import ---------------------------------------------------------

    def startup(self) -> Report:
        """Make the registry match the kernel after a crash, restart or reboot (see recovery.py)."""
        report, operations = self.begin_startup()
        return self.finish_startup(report, operations)

    def begin_startup(self) -> tuple[Report, list[recovery.Operation]]:
        """The quick part of start-up: which interrupted operations there are. Their devices answer
        `Recovering` to any call until `finish_startup` has dealt with them."""
        return self._startup.begin()

    def finish_startup(
        self,
        report: Report,
        operations: Sequence[recovery.Operation],
        progress: Callable[[int, int], None] | None = None,
    ) -> Report:
        """The slow part (the daemon runs it after taking its bus name): finish the interrupted operations
        side by side, then the group nodes, the units and every device. `progress(done, total)` counts
        devices."""
        return self._startup.finish(report, operations, progress)

    @property
    def recovering(self) -> dict[str, str]:
        """Device id -> address of every device whose interrupted operation is still being finished."""
        return self._startup.devices

    @recovering.setter
    def recovering(self, devices: dict[str, str]) -> None:
        self._startup.devices = devices

    def _require_settled(self, rows: Iterable[DeviceRow]) -> None:
        self._startup.require_settled(rows)

    def reconcile(
        self,
        caller: Caller,
        live_instances: Sequence[object],
        *,
        dry_run: bool = False,
        all_users: bool = False,
    ) -> Report:
        """Release attachments whose instance is not in the caller's live list (only the caller's own,
        unless `all_users` and admin), never while the group node is held; report every disagreement
        between the registry and the kernel in that scope."""
        live = {validation.instance_id(i) for i in live_instances}
        if all_users and not caller.is_admin({"instance": ",".join(sorted(live))}):
            raise NotAuthorized("reconciling every user's attachments needs the admin authorization")
        return reconcile.reconcile(
            self.deps,
            caller.uid,
            live,
            dry_run=dry_run,
            all_users=all_users,
            vgpu_grace=self.config.vgpu_orphan_grace,
            release=lambda owner, instance: self.detach(Caller(uid=owner, touched=caller.touched), instance),
        )

    def recover(self, caller: Caller, target: object = "", *, dry_run: bool = False) -> Report:
        """Admin: put stuck or driverless registered devices back on their native driver. Lists holders,
        never kills anything, releases a stale persistence hold and clears `stuck`. A vGPU parent or a
        physical GPU hosting vGPUs as `target`: see `recover_sharing`."""
        self._require_admin(caller, "Recover")
        shared = self.recover_sharing(target, dry_run) if isinstance(target, str) and target else None
        if shared is not None:
            return shared
        if target in ("", None):
            rows = [
                r
                for r in self.registry.list_devices()
                if r.state == "stuck"
                or (
                    self.host.device_exists(r.pci_address)
                    and self.host.driver(r.pci_address) is None
                    and r.native_driver not in ("", "vfio-pci")
                )
            ]
        else:
            rows = [self._resolve_target(target)]
        report = Report(
            counters={"candidates": len(rows), "recovered": 0, "held": 0, "failed": 0},
        )
        self._require_settled(rows)
        for row in rows:
            with self.locks.hold([group_of(self.deps, row)]):
                release.recover_one(self.deps, fresh(self.deps, row), dry_run, report)
        if not dry_run:
            for unit in self.hold.release_stale():
                report.findings.append(f"started {unit} again")
        return report

    def _resolve_target(self, target: object) -> DeviceRow:
        """A registered device by id, name or PCI address."""
        key = validation.device_or_address(target)
        if not isinstance(key, PciAddress):
            return self.resolve(key)
        row = self.registry.by_pci_address(key)
        if row is None:
            raise NotFound(f"{key} is neither a registered device, a vGPU parent nor a GPU hosting vGPUs")
        return row

    def import_hypeman(self, caller: Caller, data_dir: object) -> Report:
        """Admin: import hypeman's `devices/<id>/metadata.json` records, keeping ids and names."""
        self._require_admin(caller, "ImportHypeman")
        return hypeman_import.import_devices(self.deps, caller, data_dir)

    def refresh_device(self, pci_address: str) -> None:
        """Re-read one registered device's state from the kernel (a uevent: another tool may have bound or
        unbound it)."""
        self.refreshes.device(pci_address)

    def reconfigure(self, config: ManagerConfig) -> None:
        """SIGHUP: new persistence units and register allow-list for the calls that start from now on."""
        self.config = config
        self.hold.units_by_vendor = dict(config.units_by_vendor)
        self.hold.linger = config.persistence_linger

    # ----- helpers -------------------------------------------------------------------------------------

    def _require_admin(self, caller: Caller, what: str, row: DeviceRow | None = None) -> None:
        details = {"pci_address": str(row.pci_address), "device": row.name} if row else {}
        if not caller.is_admin(details):
            raise NotAuthorized(f"{what} needs the admin authorization (org.hypeman.devices.admin)")


def _unique(rows: Iterable[DeviceRow]) -> list[DeviceRow]:
    seen: dict[str, DeviceRow] = {}
    for row in rows:
        seen.setdefault(row.id, row)
    return sorted(seen.values(), key=lambda r: r.pci_address)
