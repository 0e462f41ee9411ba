"""The manager: every method of the contract's Manager interface, with its semantics, on top of the host,
discovery, guards, binder, registry and persistence hold. The D-Bus layer only validates option types,
authorizes the base action and calls in here; this module decides when the second `admin` check is needed
(it is the one that knows whose attachment a device is) through `Caller.is_admin`.

Every method is blocking and thread-safe: the bus layer runs it in a worker thread. Locks: one per IOMMU
group (sorted), the persistence hold's own, and the registry's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vfiod.core import access, discovery, guard, hypeman_import, recovery, validation
from vfiod.core.binder import Binder, BoundFunction, NativeDriver
from vfiod.core.context import Caller, Report
from vfiod.core.errors import (
    AlreadyBound,
    Failed,
    InUse,
    InvalidArgument,
    InvalidName,
    InvalidPCIAddress,
    NameExists,
    NotAuthorized,
    NotBound,
    NotFound,
    NotOwner,
    Recovering,
    Timeout,
    VfiodError,
)
from vfiod.core.hoststatus import host_status
from vfiod.core.journal import Operation
from vfiod.core.locks import GroupLocks, InstanceLocks
from vfiod.core.pciids import PciIds, default_pci_ids
from vfiod.core.persistence import DEFAULT_UNITS, PersistenceHold
from vfiod.core.records import Attachment, Device, device_from_row, vfio_group_path
from vfiod.core.registry import AttachmentRole, AttachmentRow, DeviceRow, Registry, RegistryError
from vfiod.core.system import ModuleLoader, UnitController
from vfiod.host import procfs
from vfiod.host.backend import NodeOwner
from vfiod.host.host import Host
from vfiod.host.pciaddr import DriverName, InvalidDriverName, PciAddress
from vfiod.host.pcifunction import Identity, read_function
from vfiod.host.writes import WriteRecord

log = logging.getLogger("vfiod.manager")

COMPANION_TAG = "vfiod.companion-of"
MEMLOCK_HINT = (
    "LimitMEMLOCK=infinity on hypeman's unit (or prlimit --memlock=unlimited on the VMM): VFIO type1 pins "
    "all guest RAM"
)


@dataclass
class ManagerConfig:
    units_by_vendor: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_UNITS))
    # PCI addresses or vendor:device ids anyone allowed to `register` may register beyond the candidates.
    register_allow: list[str] = field(default_factory=list)


class Manager:
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
    ) -> None:
        self.host = host
        self.registry = registry
        self.config = config or ManagerConfig()
        self.pci_ids = pci_ids or default_pci_ids()
        self.boot_id = host.boot_id() or "unknown-boot"
        self.modules = modules
        self.units = units
        self.hold = PersistenceHold(registry, units, self.boot_id, self.config.units_by_vendor)
        self.locks = GroupLocks()
        self.locks.after_release = self._run_deferred_refreshes
        self.instances = InstanceLocks()
        self._deferred_refreshes: dict[int, set[str]] = {}  # group -> addresses a uevent asked to re-read
        self.recovering: dict[
            str, str
        ] = {}  # device id -> address: an interrupted operation is being finished
        self.verify_timeout = verify_timeout
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()  # the small shared state below: listeners, holds, refreshes, recovering
        self._stuck_holds: dict[str, list[str]] = {}
        host.add_write_listener(self._late_listener)

    def _late_listener(self, record: WriteRecord) -> None:
        if record.late:
            self._on_late_write(record)

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

    def binder(self, op: Operation | None = None) -> Binder:
        return Binder(self.host, self.modules, op, verify_timeout=self.verify_timeout)

    # ----- reads ---------------------------------------------------------------------------------------

    def list_available(self, *, all_devices: bool = False) -> list[discovery.AvailableDevice]:
        registered = {str(r.pci_address): r.id for r in self.registry.list_devices()}
        return discovery.discover(self.host, self.pci_ids, all_devices=all_devices, registered=registered)

    def host_status(self) -> dict[str, object]:
        attached = [
            str(row.pci_address)
            for row in self.registry.list_devices()
            if self.registry.attachment_of_device(row.id) is not None
        ]
        return host_status(self.host, self.pci_ids, attached=attached).to_record()

    def resolve(self, id_or_name: object) -> DeviceRow:
        try:
            key = validation.id_or_name(id_or_name)
        except validation.InvalidNameInput as e:
            raise InvalidName(str(e)) from e
        row = self.registry.find(key)
        if row is None:
            raise NotFound(f"no registered device has the id or name {key!r}")
        return row

    def device(self, row: DeviceRow) -> Device:
        """The device as a client sees it: its row and attachment read as one snapshot (never `attached_to`
        from after a change with the state from before it), then the kernel's side."""
        with self.registry.snapshot():
            fresh = self.registry.get_device(row.id)
            if fresh is None:
                raise NotFound(f"device {row.name!r} was unregistered meanwhile")
            att = self.registry.attachment_of_device(row.id)
        return device_from_row(self.host, fresh, att)

    def get_device(self, id_or_name: object) -> Device:
        return self.device(self.resolve(id_or_name))

    def list_devices(self, tags: Mapping[str, str] | None = None) -> list[Device]:
        if tags:
            try:
                tags = validation.tags(tags)
            except validation.InvalidTagsInput as e:
                raise InvalidArgument(str(e)) from e
        with self.registry.snapshot():
            rows = self.registry.list_devices(tags or None)
            pairs = [(r, self.registry.attachment_of_device(r.id)) for r in rows]
        return [device_from_row(self.host, row, att) for row, att in pairs]

    # ----- register / unregister ----------------------------------------------------------------------

    def register(self, caller: Caller, pci_address: object, name: object = "", tags: object = None) -> Device:
        try:
            addr = validation.pci_address(pci_address)
        except validation.InvalidPciAddressInput as e:
            raise InvalidPCIAddress(str(e)) from e
        if name in ("", None):
            chosen = addr.default_device_name()
        else:
            try:
                chosen = validation.device_name(name)
            except validation.InvalidNameInput as e:
                raise InvalidName(str(e)) from e
        try:
            tag_map = validation.tags(tags if tags is not None else {})
        except validation.InvalidTagsInput as e:
            raise InvalidArgument(str(e)) from e
        info = discovery.describe(self.host, addr, self.pci_ids)
        if not self._registrable_without_admin(addr, info) and not caller.is_admin(
            {"pci_address": str(addr), "device": chosen}
        ):
            raise NotAuthorized(
                f"{addr} ({info.vendor_name} {info.device_name}, class {info.class_}) is not a display "
                "controller or one of its functions; registering it needs the admin authorization "
                "(org.hypeman.devices.admin) or an entry in register_allow"
            )
        row = self._new_row(addr, chosen, tag_map, info)
        with self.locks.hold([row.iommu_group]):
            stored = self.registry.add_device(row)
        log.info(
            "registered %s as %s (%s)",
            addr,
            chosen,
            stored.id,
            extra=_fields(stored, action="register", uid=caller.uid),
        )
        self._changed([""])
        return self.device(stored)

    def _registrable_without_admin(self, addr: PciAddress, info: discovery.AvailableDevice) -> bool:
        if discovery.is_candidate(info.class_):
            return True
        ids = f"{info.vendor_id}:{info.device_id}"
        if str(addr) in self.config.register_allow or ids in self.config.register_allow:
            return True
        # a same-slot function of a display controller (its HDMI audio, USB-C, ...)
        for member in info.iommu_group_members:
            other = PciAddress.parse(member)
            if (
                other != addr
                and other.same_slot(addr)
                and discovery.is_candidate(read_function(self.host, other).class_code)
            ):
                return True
        return False

    def _new_row(
        self, addr: PciAddress, name: str, tags: dict[str, str], info: discovery.AvailableDevice
    ) -> DeviceRow:
        fn = read_function(self.host, addr)
        driver, module, on_vfio = fn.driver, fn.module, fn.is_vfio_bound
        return DeviceRow(
            id=validation.new_device_id(),
            name=name,
            pci_address=addr,
            vendor_id=info.vendor_id,
            device_id=info.device_id,
            class_code=info.class_,
            type=info.type,
            subsystem_vendor_id=info.subsystem_vendor_id,
            subsystem_device_id=info.subsystem_device_id,
            iommu_group=info.iommu_group,
            native_driver=driver or "",
            native_module=module or "",
            state="vfio" if on_vfio else "host",
            tags=tags,
            vendor_name=info.vendor_name,
            device_name=info.device_name,
        )

    def unregister(self, caller: Caller, id_or_name: object) -> None:
        row = self.resolve(id_or_name)
        self._require_settled([row])
        with self.locks.hold([row.iommu_group]):
            row = self._fresh(row)
            self._require_no_pending([row.pci_address])
            att = self.registry.attachment_of_device(row.id)
            if att is not None:
                raise InUse(
                    f"device {row.name!r} is attached to instance {att.instance_id!r} (uid {att.owner_uid}); "
                    "detach it first"
                )
            addr = row.pci_address
            if (
                row.bound_by_vfiod
                and self.host.device_exists(addr)
                and read_function(self.host, addr).is_vfio_bound
            ):
                self._restore_functions([row], "unregister")
            self.registry.remove_device(row.id)
        log.info("unregistered %s", row.name, extra=_fields(row, action="unregister", uid=caller.uid))
        self._changed([""])

    # ----- attach --------------------------------------------------------------------------------------

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
    ) -> tuple[list[Attachment], list[str]]:
        instance = self._instance(instance_id)
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
        groups = [self.group_of(r) for r in rows]
        with self.instances.hold(instance), self.locks.hold(groups):
            rows = [self._fresh(r) for r in rows]
            self._require_no_pending(a for g in groups for a in self._members(g))
            for row in rows:
                self._usable(row)
                att = self.registry.attachment_of_device(row.id)
                if att is not None and (att.instance_id != instance or att.owner_uid != owner):
                    raise InUse(
                        f"device {row.name!r} is attached to instance {att.instance_id!r} (uid "
                        f"{att.owner_uid})"
                    )
            done = self._already_attached(instance, owner, rows)
            if done is not None:
                return done, self._warnings(caller_pid)
            result = self._attach_locked(instance, owner, rows, include_group, gpudirect_clique, force)
        log.info(
            "attached %s to %s for uid %d",
            ", ".join(a.pci_address for a in result),
            instance,
            owner,
            extra={"ACTION": "attach", "INSTANCE_ID": instance, "OWNER_UID": owner, "CALLER_UID": caller.uid},
        )
        return result, self._warnings(caller_pid)

    def _already_attached(
        self, instance: str, owner: int, rows: Sequence[DeviceRow]
    ) -> list[Attachment] | None:
        """Idempotent repeat: every device attached in this boot to the same instance and owner."""
        groups: set[int] = set()
        for row in rows:
            att = self.registry.attachment_of_device(row.id)
            if att is None or att.boot_id != self.boot_id:
                return None
            if not read_function(self.host, row.pci_address).is_vfio_bound:
                return None
            groups.add(att.iommu_group)
        return self._attachment_records(instance, groups)

    def _attachment_records(self, instance: str, groups: set[int]) -> list[Attachment]:
        out = []
        for att in self.registry.attachments_of_instance(instance):
            if att.iommu_group not in groups:
                continue
            row = self.registry.get_device(att.device_id)
            if row is None:
                continue
            out.append(
                Attachment(
                    id=row.id,
                    pci_address=str(row.pci_address),
                    role=att.role,
                    iommu_group=att.iommu_group,
                    vfio_group_path=vfio_group_path(self.host, att.iommu_group),
                    gpudirect_clique=att.gpudirect_clique,
                )
            )
        return sorted(out, key=lambda a: a.pci_address)

    def _others(self, instance: str | None, owner: int | None) -> dict[PciAddress, str]:
        """Functions attached (in any boot) to someone other than (instance, owner)."""
        out: dict[PciAddress, str] = {}
        for att in self.registry.all_attachments():
            if att.instance_id == instance and att.owner_uid == owner:
                continue
            row = self.registry.get_device(att.device_id)
            if row is not None:
                out[row.pci_address] = f"instance {att.instance_id!r} (uid {att.owner_uid})"
        return out

    def _attach_locked(
        self,
        instance: str,
        owner: int,
        rows: Sequence[DeviceRow],
        include_group: bool,
        clique: int | None,
        force: bool,
    ) -> list[Attachment]:
        addrs = [r.pci_address for r in rows]
        for row in rows:
            guard.check_identity(self.host, row.pci_address, _identity(row))
        plans = guard.plan_groups(
            self.host, addrs, include_group=include_group, attached_elsewhere=self._others(instance, owner)
        )
        op = Operation(self.registry, self.boot_id, "attach")
        bound_rows, bound = self._bind_plans(plans, op, force)
        op.checkpoint("bound")
        granted: list[tuple[int, NodeOwner]] = []
        try:
            for plan in plans:
                if self._group_granted_to(plan.group, instance, owner):
                    continue
                named = {a.owner_uid for a in self.registry.attachments_in_group(plan.group)}
                previous = access.previous_owner(self.host, plan.group, named)
                # Journal first: a crash between here and the attachment's row finds the grant to undo.
                with self.registry.transaction():
                    op.grant(plan.group, previous.uid, previous.gid, previous.mode)
                granted.append((plan.group, previous))
                op.checkpoint("grant")
                access.grant(self.host, plan.group, owner)
            op.checkpoint("granted")
            self._record_attachments(op, instance, owner, bound_rows, bound, dict(granted), clique)
        except VfiodError as e:
            self._undo_attach(op, bound_rows, bound, granted, e)
            raise
        except BaseException:
            # Not a kernel refusal (the registry failed, say): at least no node stays with the caller.
            self._revoke_quietly(granted)
            raise
        self._changed(r.id for r in bound_rows.values())
        return self._attachment_records(instance, {p.group for p in plans})

    def _revoke_quietly(self, granted: Sequence[tuple[int, NodeOwner]]) -> None:
        for group, previous in granted:
            try:
                access.revoke(self.host, group, previous)
            except VfiodError as e:
                log.warning(
                    "giving /dev/vfio/%d back failed: %s", group, e.message, extra={"ACTION": "revoke"}
                )

    def _record_attachments(
        self,
        op: Operation,
        instance: str,
        owner: int,
        bound_rows: Mapping[PciAddress, DeviceRow],
        bound: Sequence[BoundFunction],
        prev_by_group: Mapping[int, NodeOwner],
        clique: int | None,
    ) -> None:
        with self.registry.transaction():
            for fn in bound:
                row = bound_rows[fn.pci_address]
                prev = prev_by_group.get(fn.group) or self._previous_grant(fn.group, instance)
                existing = self.registry.attachment_of_device(row.id)
                if existing is not None:
                    self.registry.remove_attachment(row.id)  # a reservation from an earlier boot
                self.registry.add_attachment(
                    AttachmentRow(
                        device_id=row.id,
                        instance_id=instance,
                        owner_uid=owner,
                        iommu_group=fn.group,
                        boot_id=self.boot_id,
                        role=existing.role if existing else _role(fn.role),
                        node_prev_uid=prev.uid if prev else None,
                        node_prev_gid=prev.gid if prev else None,
                        node_prev_mode=prev.mode if prev else None,
                        gpudirect_clique=clique if fn.role == "requested" else None,
                    )
                )
                self.registry.update_device(row.id, state="attached")
            op.finish()

    def _group_granted_to(self, group: int, instance: str, owner: int) -> bool:
        return any(
            a.boot_id == self.boot_id and a.instance_id == instance and a.owner_uid == owner
            for a in self.registry.attachments_in_group(group)
        )

    def _previous_grant(self, group: int, instance: str) -> NodeOwner | None:
        for a in self.registry.attachments_in_group(group):
            if a.instance_id == instance and a.node_prev_uid is not None:
                assert a.node_prev_gid is not None and a.node_prev_mode is not None
                return NodeOwner(a.node_prev_uid, a.node_prev_gid, a.node_prev_mode)
        return None

    def _bind_plans(
        self, plans: Sequence[guard.GroupPlan], op: Operation, force: bool
    ) -> tuple[dict[PciAddress, DeviceRow], list[BoundFunction]]:
        """Bind every plan (all or nothing), registering companions; returns rows by address and what was
        bound, in address order."""
        all_fns = sorted({a for p in plans for a in p.functions})
        to_bind = sorted({a for p in plans for a in p.to_bind})
        guard.check_not_host_critical(self.host, to_bind, force)
        rows = self._rows_for(plans)
        vendors = [rows[a].vendor_id for a in to_bind]
        bound: list[BoundFunction] = []
        with self.registry.transaction():
            for addr in to_bind:
                row = rows[addr]
                native = self.host.driver(addr) or ""
                module = self.host.driver_module(addr) or ""
                self.registry.update_device(
                    row.id, state="binding", native_driver=native, native_module=module, bound_by_vfiod=True
                )
                op.function(row.id, str(addr), row.iommu_group, native, module, "vfio-pci")
        op.checkpoint("journaled")
        units = self.hold.units_for(vendors)
        self.hold.acquire(units)
        try:
            guard.require_not_in_use(self.host, to_bind, ignore_units=units)
            binder = self.binder(op)
            for plan in plans:
                bound.extend(binder.bind_group(plan))
        except VfiodError as e:
            self._keep_hold_for_stuck(e.stuck, rows)
            self._roll_back_binds(op, rows, bound, e)
            raise
        finally:
            self.hold.release(units)
        assert sorted({f.pci_address for f in bound}) == all_fns
        return rows, sorted(bound, key=lambda f: f.pci_address)

    def _rows_for(self, plans: Sequence[guard.GroupPlan]) -> dict[PciAddress, DeviceRow]:
        rows: dict[PciAddress, DeviceRow] = {}
        requested = [a for p in plans for a, role in p.roles.items() if role == "requested"]
        anchor = self.registry.by_pci_address(requested[0]) if requested else None
        for plan in plans:
            for addr in plan.functions:
                row = self.registry.by_pci_address(addr)
                if row is None:
                    row = self._register_companion(addr, anchor)
                rows[addr] = row
        return rows

    def _register_companion(self, addr: PciAddress, anchor: DeviceRow | None) -> DeviceRow:
        info = discovery.describe(self.host, addr, self.pci_ids)
        tags = {COMPANION_TAG: anchor.id} if anchor else {}
        name = addr.default_device_name()
        row = self._new_row(addr, name, tags, info)
        try:
            stored = self.registry.add_device(row)
        except NameExists:
            stored = self.registry.add_device(DeviceRow(**{**row.__dict__, "name": f"{name}-{row.id[:6]}"}))
        log.info("registered companion %s", addr, extra=_fields(stored, action="register-companion"))
        return stored

    def _roll_back_binds(
        self,
        op: Operation,
        rows: Mapping[PciAddress, DeviceRow],
        bound: Sequence[BoundFunction],
        cause: VfiodError,
    ) -> None:
        """The binder rolled back the failing group; put back every earlier group this call bound."""
        if isinstance(cause, RegistryError):
            op.degraded = True  # the way back must not depend on the registry that just failed
        binder = self.binder(op)
        for fn in reversed(bound):
            if fn.changed and fn.pci_address not in cause.stuck:
                try:
                    with self.hold.held([rows[fn.pci_address].vendor_id]):
                        binder.restore(fn.pci_address, fn.native)
                except VfiodError as e:
                    cause.stuck = (*cause.stuck, *e.stuck)
                    cause.message += f"; rolling back {fn.pci_address} failed too: {e.message}"
        self._settle(op, rows.values(), cause.stuck)

    def _undo_attach(
        self,
        op: Operation,
        rows: Mapping[PciAddress, DeviceRow],
        bound: Sequence[BoundFunction],
        granted: Sequence[tuple[int, NodeOwner]],
        cause: VfiodError,
    ) -> None:
        for group, previous in granted:
            try:
                access.revoke(self.host, group, previous)
            except VfiodError as e:
                cause.message += f"; giving /dev/vfio/{group} back failed: {e.message}"
        self._roll_back_binds(op, rows, bound, cause)

    def _settle(self, op: Operation, rows: Iterable[DeviceRow], stuck: Iterable[str]) -> None:
        """After a failure: every touched device's state is what the kernel shows, `stuck` where the kernel
        left it mid-write; the operation's intents are cleared. If the registry cannot take that (it is
        what failed), the intents stay and start-up settles the devices."""
        try:
            self._record_settled(op, rows, set(stuck))
        except RegistryError as e:
            log.warning(
                "%s: the registry could not record what the kernel now shows (%s); the next start finishes "
                "the bookkeeping",
                op.id,
                e.message,
                extra={"ACTION": "settle"},
            )
        finally:
            self._changed(r.id for r in rows)
        self.hold.release_stale()

    def _record_settled(self, op: Operation, rows: Iterable[DeviceRow], stuck_set: set[str]) -> None:
        with self.registry.transaction():
            for row in rows:
                fresh = self.registry.get_device(row.id)
                if fresh is None:
                    continue
                self.registry.update_device(row.id, **self.settled_state(fresh, row.pci_address in stuck_set))
            if not stuck_set:
                op.finish()
            else:
                # Keep the intents of stuck functions: recovery must know a write may still land.
                for intent in self.registry.open_intents():
                    if intent.operation == op.id and intent.pci_address not in stuck_set:
                        self.registry.clear_intent(intent.id)
            for row in rows:
                if str(row.pci_address) not in stuck_set:
                    op.settle(row.id)  # what the kernel shows is final for it: no older intent stays open

    def settled_state(self, row: DeviceRow, stuck: bool) -> dict[str, object]:
        if stuck:
            return {"state": "stuck"}
        addr = row.pci_address
        if not self.host.device_exists(addr):
            return {"state": "missing", "previous_state": _settled_previous(row.state)}
        on_vfio = read_function(self.host, addr).is_vfio_bound
        att = self.registry.attachment_of_device(row.id)
        if att is not None and on_vfio and att.boot_id == self.boot_id:
            return {"state": "attached"}
        if on_vfio:
            return {"state": "vfio"}
        return {"state": "host", "bound_by_vfiod": False}

    # ----- detach --------------------------------------------------------------------------------------

    def detach(
        self,
        caller: Caller,
        instance_id: object,
        devices: Sequence[object] = (),
        *,
        keep_bound: bool = False,
    ) -> None:
        instance = self._instance(instance_id)
        # The instance first: a Detach sent while this instance's Attach still runs waits for it, then
        # releases what it attached (rather than finding nothing yet and answering success).
        with self.instances.hold(instance):
            self._detach_instance(caller, instance, devices, keep_bound)

    def _detach_instance(
        self, caller: Caller, instance: str, devices: Sequence[object], keep_bound: bool
    ) -> None:
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
            self._require_no_pending(r.pci_address for r in rows)
            present = [r.pci_address for r in rows if self.host.device_exists(r.pci_address)]
            guard.require_not_held(self.host, present, "detach")
            previous = {g: self._previous_grant(g, instance) for g in sorted(groups)}

            def give_nodes_back() -> None:
                for group, owner in previous.items():
                    if owner is not None:
                        access.revoke(self.host, group, owner)

            if keep_bound:
                with self.registry.transaction():
                    for row in rows:
                        self.registry.remove_attachment(row.id)
                        self.registry.update_device(row.id, **self.settled_state(row, False))
                        self.registry.settle_intents(row.id)
                give_nodes_back()  # a node left with its owner meanwhile is taken back at the next start
            else:
                # The nodes go back once the detach is journaled (a registry that cannot take it leaves
                # the VM its devices), and before any unbind.
                self._restore_functions(rows, "detach", drop_attachments=True, before_steps=give_nodes_back)
        log.info(
            "detached %s from %s",
            ", ".join(str(r.pci_address) for r in rows),
            instance,
            extra={"ACTION": "detach", "INSTANCE_ID": instance, "CALLER_UID": caller.uid},
        )
        self._changed(r.id for r in rows)

    def _require_owner(self, caller: Caller, instance: str, atts: Sequence[AttachmentRow]) -> None:
        others = sorted({a.owner_uid for a in atts if a.owner_uid != caller.uid})
        if others and not caller.is_admin({"instance": instance}):
            raise NotOwner(
                f"instance {instance!r} is attached for uid {', '.join(map(str, others))}, not {caller.uid}; "
                "detaching another user's attachment needs the admin authorization"
            )

    def _detach_groups(self, instance: str, devices: Sequence[object]) -> set[int]:
        atts = self.registry.attachments_of_instance(instance)
        if not devices:
            return {a.iommu_group for a in atts}
        wanted = {self.resolve(d).id for d in devices}
        return {a.iommu_group for a in atts if a.device_id in wanted}

    def _restore_functions(
        self,
        rows: Sequence[DeviceRow],
        kind: str,
        *,
        drop_attachments: bool = False,
        before_steps: Callable[[], None] | None = None,
    ) -> None:
        """Put every function vfiod bound back on its native driver (highest function first, the reverse of
        binding). All attachments stay while any function could not be restored; those are `stuck`."""
        op = Operation(self.registry, self.boot_id, kind)
        todo = [
            r
            for r in sorted(rows, key=lambda r: r.pci_address, reverse=True)
            if r.bound_by_vfiod and r.native_driver != "vfio-pci" and self.host.device_exists(r.pci_address)
        ]
        with self.registry.transaction():
            for row in todo:
                self.registry.update_device(row.id, state="releasing")
                op.function(
                    row.id, str(row.pci_address), row.iommu_group, row.native_driver, row.native_module, ""
                )
        op.checkpoint("journaled")
        if before_steps is not None:
            before_steps()
        binder = self.binder(op)
        failure: VfiodError | None = None
        units = self.hold.units_for(r.vendor_id for r in todo)
        try:
            self.hold.acquire(units)
        except VfiodError as e:  # the hold itself failed: nothing was touched
            failure = e
        else:
            try:
                for row in todo:
                    try:
                        self._restore_one(binder, op, row)
                    except VfiodError as e:
                        if not e.stuck:
                            e.stuck = (row.pci_address,)
                        if failure is None:
                            failure = e
                        else:
                            failure.stuck = (*failure.stuck, *e.stuck)
                            failure.message += f"; {e.message}"
                if failure is not None:
                    self._keep_hold_for_stuck(failure.stuck, {r.pci_address: r for r in todo})
            finally:
                self.hold.release(units)
        if failure is not None:
            self._settle(op, todo, failure.stuck)
            raise failure
        op.checkpoint("restored")
        with self.registry.transaction():
            for row in rows:
                if drop_attachments:
                    self.registry.remove_attachment(row.id)
                fresh = self.registry.get_device(row.id)
                if fresh is not None:
                    self.registry.update_device(row.id, **self.settled_state(fresh, False))
            op.finish()

    def _restore_one(self, binder: Binder, op: Operation, row: DeviceRow) -> None:
        try:
            binder.restore(row.pci_address, _native(row))
        except RegistryError:
            # The journal failed before a step: that step did not happen. Going back to the native driver
            # is where this call was heading anyway, so finish it without step intents (the operation's
            # own intent still lets start-up finish it if vfiod dies now).
            op.degraded = True
            binder.restore(row.pci_address, _native(row))

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
        with self.locks.hold([self.group_of(row)]):
            row = self._fresh(row)
            self._require_no_pending(self._members(self.group_of(row)))
            self._usable(row)
            if read_function(self.host, row.pci_address).is_vfio_bound:
                if exclusive:
                    raise AlreadyBound(f"device {row.name!r} ({row.pci_address}) is already on vfio")
                if row.state == "host":
                    self.registry.update_device(row.id, state="vfio")
                return
            guard.check_identity(self.host, row.pci_address, _identity(row))
            plans = guard.plan_groups(
                self.host,
                [row.pci_address],
                include_group=include_group,
                attached_elsewhere=self._others(None, None),
            )
            op = Operation(self.registry, self.boot_id, "bind")
            rows, _bound = self._bind_plans(plans, op, force)
            with self.registry.transaction():
                for r in rows.values():
                    fresh = self.registry.get_device(r.id)
                    if fresh is not None:
                        self.registry.update_device(r.id, **self.settled_state(fresh, False))
                op.finish()
        log.info("bound %s to vfio-pci", row.pci_address, extra=_fields(row, action="bind", uid=caller.uid))
        self._changed(r.id for r in rows.values())

    def unbind(self, caller: Caller, id_or_name: object, *, exclusive: bool = False) -> None:
        row = self.resolve(id_or_name)
        self._require_admin(caller, "Unbind", row)
        self._require_settled([row])
        with self.locks.hold([self.group_of(row)]):
            row = self._fresh(row)
            self._require_no_pending([row.pci_address])
            att = self.registry.attachment_of_device(row.id)
            if att is not None:
                raise InUse(
                    f"device {row.name!r} is attached to instance {att.instance_id!r}; detach it instead"
                )
            if (
                not self.host.device_exists(row.pci_address)
                or not read_function(self.host, row.pci_address).is_vfio_bound
            ):
                if exclusive:
                    raise NotBound(f"device {row.name!r} ({row.pci_address}) is not on vfio")
                return
            guard.require_not_held(self.host, [row.pci_address], "unbind")
            if not row.bound_by_vfiod or row.native_driver in ("", "vfio-pci"):
                # Pre-bound at boot (or never had a driver): there is no native driver to go back to; the
                # admin's explicit Unbind releases it from vfio-pci and lets the kernel probe.
                row = self.registry.update_device(row.id, bound_by_vfiod=True)
            self._restore_functions([row], "unbind")
        log.info("unbound %s", row.pci_address, extra=_fields(row, action="unbind", uid=caller.uid))
        self._changed([row.id])

    # ----- reconcile / recover / startup ---------------------------------------------------------------

    def startup(self) -> Report:
        """Make the registry match the kernel after a crash, restart or reboot (see recovery.py)."""
        report, operations = self.begin_startup()
        return self.finish_startup(report, operations)

    def begin_startup(self) -> tuple[Report, list[recovery.Operation]]:
        """The quick part of start-up: which interrupted operations there are. Their devices answer
        `Recovering` to any call until `finish_startup` has dealt with them."""
        report = Report()
        operations = recovery.plan(self, report)
        for finding in report.findings:
            log.warning("startup: %s", finding, extra={"ACTION": "startup"})
        with self._lock:
            self.recovering = recovery.devices_of(self, operations)
        return report, operations

    def finish_startup(
        self,
        report: Report,
        operations: Sequence[recovery.Operation],
        progress: Callable[[int, int], None] | None = None,
    ) -> Report:
        """The slow part (the daemon runs it after taking its bus name): finish the interrupted operations
        side by side, then the group nodes, the units and every device. `progress(done, total)` counts
        devices."""
        total = len(self.recovering)

        def done(operation: recovery.Operation) -> None:
            finished = recovery.devices_of(self, [operation])
            with self._lock:
                for device_id in finished:
                    self.recovering.pop(device_id, None)
                left = len(self.recovering)
            self._changed(finished)
            if progress is not None:
                progress(total - left, total)

        try:
            recovery.finish(self, report, operations, done)  # it logs each finding as it comes
        finally:
            with self._lock:
                self.recovering = {}
        return report

    def _require_settled(self, rows: Iterable[DeviceRow]) -> None:
        """`Recovering` for a device whose interrupted operation (from before a restart) is being finished."""
        with self._lock:
            busy = [r for r in rows if r.id in self.recovering]
            left = len(self.recovering)
        if busy:
            names = ", ".join(f"{r.name} ({r.pci_address})" for r in busy)
            raise Recovering(
                f"vfiod is still finishing the operation on {names} that its restart interrupted "
                f"({left} device{'s' if left != 1 else ''} left to recover); call again in a few seconds"
            )

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
        live = {self._instance(i) for i in live_instances}
        if all_users and not caller.is_admin({"instance": ",".join(sorted(live))}):
            raise NotAuthorized("reconciling every user's attachments needs the admin authorization")
        report = Report()
        for key in ("attachments", "released", "kept", "held", "missing", "replaced", "mismatches", "errors"):
            report.counters[key] = 0
        by_instance: dict[str, list[AttachmentRow]] = {}
        for att in self.registry.all_attachments():
            if all_users or att.owner_uid == caller.uid:
                by_instance.setdefault(att.instance_id, []).append(att)
        for instance, atts in sorted(by_instance.items()):
            report.count("attachments", len(atts))
            rows = [r for r in (self.registry.get_device(a.device_id) for a in atts) if r is not None]
            usable = self._reconcile_inspect(instance, atts, rows, report)
            if instance in live:
                report.count("kept", len(atts))
                continue
            holders = guard.vfio_holders(self.host, usable)
            if holders:
                report.count("held", len(atts))
                report.findings.append(
                    f"instance {instance!r} is not live but its devices are held ("
                    + "; ".join(h.describe() for h in holders)
                    + "): kept"
                )
                continue
            if dry_run:
                report.count("released", len(atts))
                report.findings.append(
                    f"would release {', '.join(str(r.pci_address) for r in rows)} of instance {instance!r}"
                )
                continue
            try:
                self.detach(Caller(uid=atts[0].owner_uid), instance)
                report.count("released", len(atts))
                report.findings.append(
                    f"released {', '.join(str(r.pci_address) for r in rows)} of instance {instance!r}"
                )
            except VfiodError as e:
                report.count("errors")
                report.findings.append(f"could not release instance {instance!r}: {e.message}")
        return report

    def _reconcile_inspect(
        self, instance: str, atts: Sequence[AttachmentRow], rows: Sequence[DeviceRow], report: Report
    ) -> list[PciAddress]:
        usable: list[PciAddress] = []
        owner = {a.device_id: a.owner_uid for a in atts}
        groups: set[int] = set()
        for row in rows:
            addr = row.pci_address
            if not self.host.device_exists(addr):
                report.count("missing")
                report.findings.append(f"{row.name} ({addr}) of instance {instance!r} is gone from the bus")
                continue
            live = read_function(self.host, addr).identity
            if live != _identity(row):
                report.count("replaced")
                report.findings.append(
                    f"{row.name}: the card at {addr} is now {live.describe() if live else 'unreadable'}, not "
                    "the registered one; vfiod will not touch it"
                )
                continue
            usable.append(addr)
            if not read_function(self.host, addr).is_vfio_bound:
                report.count("mismatches")
                report.findings.append(
                    f"{row.name} ({addr}) is attached to {instance!r} but bound to "
                    f"{self.host.driver(addr) or 'no driver'}, not vfio"
                )
            group = self.host.iommu_group(addr)
            if group is not None and group not in groups:
                groups.add(group)
                try:
                    holders = guard.vfio_holders(self.host, [addr])
                except VfiodError as e:
                    report.count("errors")
                    report.findings.append(e.message)
                    continue
                for h in holders:
                    note = "" if h.uid == owner.get(row.id) else f" (not the owner uid {owner.get(row.id)})"
                    report.findings.append(f"/dev/vfio/{group}: {h.describe()}, uid {h.uid}{note}")
        return usable

    def recover(self, caller: Caller, target: object = "", *, dry_run: bool = False) -> Report:
        """Admin: put stuck or driverless registered devices back on their native driver. Lists holders,
        never kills anything, releases a stale persistence hold and clears `stuck`."""
        self._require_admin(caller, "Recover")
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
            rows = [self.resolve(target)]
        report = Report(
            counters={"candidates": len(rows), "recovered": 0, "held": 0, "failed": 0},
        )
        self._require_settled(rows)
        for row in rows:
            with self.locks.hold([self.group_of(row)]):
                self._recover_one(self._fresh(row), dry_run, report)
        if not dry_run:
            for unit in self.hold.release_stale():
                report.findings.append(f"started {unit} again")
        return report

    def _recover_one(self, row: DeviceRow, dry_run: bool, report: Report) -> None:
        addr = row.pci_address
        if not self.host.device_exists(addr):
            report.findings.append(f"{row.name} ({addr}) is not on the bus: nothing to recover")
            return
        pending = self.host.pending_writes(addr)
        if pending:
            report.count("held")
            report.findings.append(
                f"{row.name} ({addr}): the kernel has not finished {', '.join(pending)}; left alone until it "
                "does (the device's lock is held in the kernel)"
            )
            return
        holders = guard.vfio_holders(self.host, [addr])
        if holders:
            report.count("held")
            report.findings.append(
                f"{row.name} ({addr}) is held: " + "; ".join(h.describe() for h in holders) + " (left alone)"
            )
            return
        target = row.native_driver or "no driver"
        now = self.host.driver(addr) or "no driver"
        if dry_run:
            report.findings.append(f"would return {row.name} ({addr}) from {now} to {target}")
            return
        att = self.registry.attachment_of_device(row.id)

        def give_node_back() -> None:
            if att is not None and att.node_prev_uid is not None:
                assert att.node_prev_gid is not None and att.node_prev_mode is not None
                previous = NodeOwner(att.node_prev_uid, att.node_prev_gid, att.node_prev_mode)
                access.revoke(self.host, att.iommu_group, previous)

        fixed = self.registry.update_device(row.id, bound_by_vfiod=True, state="releasing")
        try:
            self._restore_functions([fixed], "recover", drop_attachments=True, before_steps=give_node_back)
        except VfiodError as e:
            report.count("failed")
            report.findings.append(f"{row.name} ({addr}): {e.message}")
            return
        released = self.drop_released_siblings(att)
        report.count("recovered")
        report.findings.append(f"{row.name} ({addr}) is back on {self.host.driver(addr) or 'no driver'}")
        self._changed([row.id, *released])

    def drop_released_siblings(self, att: AttachmentRow | None) -> list[str]:
        """After Recover ended an attachment: the other functions of that instance in the group that the
        failed call already put back on their drivers lose their attachment too (it names nothing now)."""
        if att is None:
            return []
        released: list[str] = []
        with self.registry.transaction():
            for other in self.registry.attachments_in_group(att.iommu_group):
                if other.instance_id != att.instance_id:
                    continue
                row = self.registry.get_device(other.device_id)
                if row is None or row.state == "stuck":
                    continue
                if (
                    self.host.device_exists(row.pci_address)
                    and read_function(self.host, row.pci_address).is_vfio_bound
                ):
                    continue
                self.registry.remove_attachment(row.id)
                self.registry.update_device(row.id, **self.settled_state(row, False))
                self.registry.settle_intents(row.id)
                released.append(row.id)
        return released

    def import_hypeman(self, caller: Caller, data_dir: object) -> Report:
        """Admin: import hypeman's `devices/<id>/metadata.json` records, keeping ids and names."""
        self._require_admin(caller, "ImportHypeman")
        return hypeman_import.import_devices(self, caller, data_dir)

    def refresh_device(self, pci_address: str) -> None:
        """Re-read one registered device's state from the kernel (a uevent: another tool may have bound or
        unbound it). Devices in the middle of a vfiod operation are left to that operation."""
        try:
            addr = PciAddress.parse(pci_address)
        except ValueError:
            return
        row = self.registry.by_pci_address(addr)
        if row is None or row.id in self.recovering:
            return  # a device being recovered is re-read when its recovery ends
        group = self.group_of(row)
        with self.locks.try_hold([group]) as held:
            if not held:
                # A call is working on this group (perhaps waiting on the kernel): never wait behind it.
                # The refresh runs when that call lets go of the group; repeated uevents merge into one.
                with self._lock:
                    self._deferred_refreshes.setdefault(group, set()).add(str(addr))
                return
            fresh = self.registry.get_device(row.id)
            if fresh is None or fresh.state in ("binding", "releasing"):
                return
            before = fresh.state
            recovery.refresh_one(self, fresh)
            after = self.registry.get_device(row.id)
        if after is not None and after.state != before:
            self._changed([row.id])

    def _run_deferred_refreshes(self, groups: set[int]) -> None:
        with self._lock:
            due = [a for g in groups for a in sorted(self._deferred_refreshes.pop(g, ()))]
        for addr in due:
            try:
                self.refresh_device(addr)
            except Exception:
                log.exception("deferred refresh of %s failed", addr)

    def reconfigure(self, config: ManagerConfig) -> None:
        """SIGHUP: new persistence units and register allow-list for the calls that start from now on."""
        self.config = config
        self.hold.units_by_vendor = dict(config.units_by_vendor)

    def _keep_hold_for_stuck(self, stuck: Iterable[str], rows: Mapping[PciAddress, DeviceRow]) -> None:
        """A write still pending in the kernel is a bind/unbind in progress: the persistence units stay
        stopped until it returns (restarting nvidia-persistenced now would hold the GPU it unbinds)."""
        for addr in stuck:
            row = rows.get(PciAddress.parse(addr))
            if row is None or not self.host.pending_writes(row.pci_address):
                continue
            units = self.hold.units_for([row.vendor_id])
            self.hold.acquire(units)
            with self._lock:
                self._stuck_holds.setdefault(str(row.pci_address), []).extend(units)

    def _on_late_write(self, record: WriteRecord) -> None:
        """A write that missed its deadline finished after all: move the device to its real state."""
        if record.pci_address is None:
            return
        if not self.host.pending_writes(PciAddress.parse(record.pci_address)):
            with self._lock:
                units = self._stuck_holds.pop(record.pci_address, [])
            self.hold.release(units)
        row = self.registry.by_pci_address(record.pci_address)
        if row is None:
            return
        # This runs on the thread of the write that came back late; the call that issued it has long
        # answered Timeout and let go of the group, so waiting for the group here waits for no one of ours.
        with self.locks.hold([self.group_of(row)]):
            fresh = self.registry.get_device(row.id)
            if fresh is None:
                return
            recovery.refresh_one(self, fresh)
        self._changed([row.id])

    # ----- helpers -------------------------------------------------------------------------------------

    def _require_admin(self, caller: Caller, what: str, row: DeviceRow | None = None) -> None:
        details = {"pci_address": str(row.pci_address), "device": row.name} if row else {}
        if not caller.is_admin(details):
            raise NotAuthorized(f"{what} needs the admin authorization (org.hypeman.devices.admin)")

    def _instance(self, instance_id: object) -> str:
        try:
            return validation.instance_id(instance_id)
        except validation.InvalidInstanceIdInput as e:
            raise InvalidArgument(str(e)) from e

    def group_of(self, row: DeviceRow) -> int:
        """The device's IOMMU group: the live one while it is on the bus, else the registered one."""
        live = self.host.iommu_group(row.pci_address) if self.host.device_exists(row.pci_address) else None
        return live if live is not None else row.iommu_group

    def _fresh(self, row: DeviceRow) -> DeviceRow:
        fresh = self.registry.get_device(row.id)
        if fresh is None:
            raise NotFound(f"device {row.name!r} was unregistered meanwhile")
        return fresh

    def _members(self, group: int) -> list[PciAddress]:
        return self.host.group_members(group) if group >= 0 else []

    def _require_no_pending(self, addrs: Iterable[PciAddress]) -> None:
        """Timeout at once, writing nothing, while the kernel still has a write of ours to one of them: any
        new write would hang behind it (and land whenever it is let go, whatever happened since)."""
        for addr in sorted(set(addrs)):
            pending = self.host.pending(addr)
            if pending:
                raise Timeout(
                    f"{addr}: the kernel has not finished {pending[0].describe()}; nothing was written. "
                    "Call again once it has (an admin's Recover returns the device then)"
                )

    def _usable(self, row: DeviceRow) -> None:
        if row.state == "stuck":
            raise Failed(
                f"device {row.name!r} ({row.pci_address}) is stuck after an earlier failure; an admin must "
                "Recover it first"
            )
        if row.state == "missing" or not self.host.device_exists(row.pci_address):
            raise Failed(f"device {row.name!r} ({row.pci_address}) is not on the bus")

    def _warnings(self, pid: int | None) -> list[str]:
        out: list[str] = []
        if pid is not None:
            limits = procfs.memlock_limit(self.host, pid)
            if limits is not None and limits[0] is not None:
                out.append(
                    f"RLIMIT_MEMLOCK of the caller (pid {pid}) is {limits[0] // 1024} KiB; the VMM inherits "
                    f"it and must be able to lock all guest RAM: set {MEMLOCK_HINT}"
                )
        container = self.host.roots.dev / "vfio/vfio"
        try:
            mode = container.stat().st_mode & 0o777
            if mode & 0o006 != 0o006:
                out.append(
                    f"/dev/vfio/vfio is mode {mode:04o}; the VMM needs to open it (0666 is the default)"
                )
        except OSError:
            out.append("/dev/vfio/vfio is missing; the vfio module is not loaded")
        if not (self.host.roots.dev / "kvm").exists():
            out.append("/dev/kvm is missing: the VMM needs KVM (load kvm_intel or kvm_amd)")
        return out


def _unique(rows: Iterable[DeviceRow]) -> list[DeviceRow]:
    seen: dict[str, DeviceRow] = {}
    for row in rows:
        seen.setdefault(row.id, row)
    return sorted(seen.values(), key=lambda r: r.pci_address)


def _identity(row: DeviceRow) -> Identity:
    return Identity(
        vendor_id=row.vendor_id,
        device_id=row.device_id,
        subsystem_vendor_id=row.subsystem_vendor_id,
        subsystem_device_id=row.subsystem_device_id,
        class_code=row.class_code,
    )


def _native(row: DeviceRow) -> NativeDriver:
    def name(text: str) -> DriverName | None:
        try:
            return DriverName.parse(text) if text else None
        except InvalidDriverName:
            return None

    return NativeDriver(name(row.native_driver), name(row.native_module))


def _settled_previous(state: str) -> str:
    return "host" if state in ("binding", "releasing", "missing") else state


def _fields(row: DeviceRow, *, action: str, uid: int | None = None) -> dict[str, object]:
    out: dict[str, object] = {
        "ACTION": action,
        "DEVICE_ID": row.id,
        "DEVICE": row.name,
        "PCI_ADDRESS": str(row.pci_address),
    }
    if uid is not None:
        out["CALLER_UID"] = uid
    return out


def _role(role: str) -> AttachmentRole:
    return "companion" if role == "companion" else "requested"
