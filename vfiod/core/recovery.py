"""What the daemon does at start so that the registry and the kernel agree again.

1. A new boot (the boot id differs from the last one seen): intents and persistence holds of the earlier
   boot are dropped (the kernel state they described is gone); attachments stay as reservations.
2. Open intents of this boot (vfiod died mid-operation): every function an unfinished operation touched is
   put back on its native driver (an Attach or Bind is rolled back; a Detach, Unbind or Recover is
   completed), grants it made are revoked, a finished Detach's attachments are removed. A function whose
   group node is held is left alone and marked `stuck`. An intent older than its device's generation
   (`settled_through`: the device was settled after it was written) describes nothing current: it is closed,
   never replayed over what came after it. An interrupted SetVirtualFunctions is finished once the old VFs
   are gone, and otherwise closed (`ops/sriov`); an interrupted AttachVGPU is rolled back and a vGPU's
   interrupted release completed (`ops/vgpu`).
3. Group nodes: one owned by a uid that no attachment of this boot names goes back to root 0600.
4. Persistence units a dead vfiod left stopped are started again.
5. Every registered device is re-read: gone → `missing`; back with the same identity → its real state; a
   different card at its address → reported and never touched. A device with a write still pending, or
   with an open intent while it is not back on its native driver, is `stuck`; one that the kernel has
   settled has its intents closed.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from vfiod.core import access
from vfiod.core.binder import NativeDriver
from vfiod.core.context import Report
from vfiod.core.deps import CoreDeps
from vfiod.core.devstate import group_of, identity_of, settled_state
from vfiod.core.errors import VfiodError
from vfiod.core.ops import gpu_recover, release, sriov, vgpu
from vfiod.core.registry import DeviceRow, IntentRow
from vfiod.host.pciaddr import DriverName, InvalidDriverName, InvalidPciAddressText, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.recovery")

COMPLETING_KINDS = frozenset({"detach", "unbind", "unregister", "recover"})


def _driver(text: str) -> DriverName | None:
    try:
        return DriverName.parse(text) if text else None
    except InvalidDriverName:
        return None


Operation = tuple[str, list[IntentRow]]  # an interrupted operation: its id and its open intents
RECOVERY_WORKERS = 16  # interrupted operations finished side by side (each write has its own deadline)


def startup(deps: CoreDeps, report: Report) -> None:
    """All of it, in this thread (tests and tools; the daemon runs `plan` before taking its bus name and
    `finish` after, in the background)."""
    finish(deps, report, plan(deps, report))


def plan(deps: CoreDeps, report: Report) -> list[Operation]:
    """The quick part: forget an earlier boot, and list the interrupted operations of this one."""
    last = deps.registry.get_meta("boot_id")
    if last != deps.boot_id:
        dropped = deps.registry.drop_intents_of_other_boots(deps.boot_id)
        units = deps.hold.drop_other_boots()
        report.count("earlier_boot_intents_dropped", len(dropped))
        if last is not None:
            report.findings.append(
                f"new boot since the last run: {len(dropped)} unfinished step(s) of the earlier boot "
                f"dropped{', holds on ' + ', '.join(units) + ' forgotten' if units else ''}; attachments "
                "of the earlier boot stay as reservations until their owner attaches again"
            )
        deps.registry.set_meta("boot_id", deps.boot_id)
    return _open_operations(deps, report)


def devices_of(deps: CoreDeps, operations: Sequence[Operation]) -> dict[str, str]:
    """Device id -> PCI address of every registered device an interrupted operation moved."""
    out: dict[str, str] = {}
    for _, intents in operations:
        for intent in intents:
            row = deps.registry.get_device(intent.device_id) if intent.device_id else None
            if row is None and intent.pci_address:
                row = deps.registry.by_pci_address(intent.pci_address)
            if row is not None:
                out[row.id] = str(row.pci_address)
    return out


def finish(
    deps: CoreDeps,
    report: Report,
    operations: Sequence[Operation],
    done: Callable[[Operation], None] | None = None,
) -> None:
    """The slow part: finish the interrupted operations side by side (`done` after each), then the group
    nodes, the persistence units, and a re-read of every device. Safe beside calls being served: each
    step takes the groups it touches, and a group a call is working on is left to that call."""
    lock = threading.Lock()

    def one(operation: Operation) -> None:
        mine = Report()
        try:
            _finish_operation(deps, operation, mine)
        except Exception as e:  # one operation's trouble must not stop the others
            log.exception("recovering %s failed", operation[0])
            mine.count("stuck")
            mine.findings.append(f"{operation[0]}: could not be finished: {e}")
        for finding in mine.findings:  # as each finishes: an admin watching the journal sees it now
            log.warning(
                "startup: %s",
                finding,
                extra={"ACTION": Action.STARTUP, "MESSAGE_ID": MessageId.STARTUP_REPAIRED},
            )
        with lock:
            for key, n in mine.counters.items():
                report.count(key, n)
            report.findings.extend(mine.findings)
        if done is not None:
            done(operation)

    if operations:
        with ThreadPoolExecutor(
            min(RECOVERY_WORKERS, len(operations)), thread_name_prefix="vfiod-recover"
        ) as pool:
            list(pool.map(one, operations))
    rest = Report()
    _sweep_group_nodes(deps, rest)
    for unit in deps.hold.recover():
        rest.count("units_restarted")
        rest.findings.append(f"started {unit} again (a previous run left it stopped)")
    refresh_all(deps, rest)
    for finding in rest.findings:
        log.warning(
            "startup: %s", finding, extra={"ACTION": Action.STARTUP, "MESSAGE_ID": MessageId.STARTUP_REPAIRED}
        )
    for key, n in rest.counters.items():
        report.count(key, n)
    report.findings.extend(rest.findings)


def _superseded(deps: CoreDeps, intent: IntentRow) -> bool:
    """The intent's device was settled after the intent was written."""
    row = deps.registry.get_device(intent.device_id) if intent.device_id else None
    if row is None and intent.pci_address:
        row = deps.registry.by_pci_address(intent.pci_address)
    return row is not None and intent.id <= row.settled_through


def _open_operations(deps: CoreDeps, report: Report) -> list[Operation]:
    by_op: dict[str, list[IntentRow]] = defaultdict(list)
    for intent in deps.registry.open_intents(deps.boot_id):
        if _superseded(deps, intent):
            deps.registry.clear_intent(intent.id)
            report.count("superseded_intents")
            report.findings.append(
                f"{intent.pci_address or 'a group node'}: a {intent.action} intent of {intent.operation} was "
                "left open although the device was settled after it; closed, not replayed"
            )
            continue
        by_op[intent.operation].append(intent)
    return sorted(by_op.items())


def _finish_operation(deps: CoreDeps, operation: Operation, report: Report) -> None:
    op_id, intents = operation
    if sriov.is_sriov(intents):
        sriov.finish_interrupted(deps, intents, report, deps.verify_timeout)
        return
    if vgpu.is_vgpu(intents):
        vgpu.finish_interrupted(deps, intents, report)
        return
    if gpu_recover.is_cycle(intents):
        gpu_recover.finish_interrupted(deps, intents, report)
        return
    groups = {i.iommu_group for i in intents if i.iommu_group >= 0}
    with deps.locks.hold(groups):
        functions = [i for i in intents if i.kind == "function"]
        kind = functions[0].action if functions else ""
        grants = [i for i in intents if i.kind == "grant"]
        report.count("operations_recovered")
        stuck: list[str] = []
        for grant in grants:
            assert grant.node_prev is not None  # the schema: a grant intent always records it
            live = [
                a
                for a in deps.registry.attachments_in_group(grant.iommu_group)
                if a.boot_id == deps.boot_id and kind not in COMPLETING_KINDS
            ]
            if not live:
                try:
                    access.revoke(deps.host, grant.iommu_group, grant.node_prev)
                except VfiodError as e:
                    report.findings.append(f"could not give /dev/vfio/{grant.iommu_group} back: {e.message}")
        binder = deps.binder()
        for fn in sorted(functions, key=lambda i: i.pci_address, reverse=True):
            try:
                addr = PciAddress.parse(fn.pci_address)
            except InvalidPciAddressText:
                continue
            if not deps.host.device_exists(addr):
                continue
            native = NativeDriver(_driver(fn.from_driver), _driver(fn.native_module))
            try:
                binder.restore(addr, native)
                done = "completed" if kind in COMPLETING_KINDS else "rolled back"
                now = deps.host.driver(addr) or "no driver"
                report.findings.append(f"{addr}: an interrupted {kind} was {done}; it is on {now}")
            except VfiodError as e:
                stuck.append(str(addr))
                report.count("stuck")
                report.findings.append(f"{addr}: could not finish an interrupted {kind}: {e.message}")
        with deps.registry.transaction():
            for fn in functions:
                row = deps.registry.get_device(fn.device_id) if fn.device_id else None
                if row is None and fn.pci_address:
                    row = deps.registry.by_pci_address(fn.pci_address)
                if row is None:
                    continue
                if kind in COMPLETING_KINDS and str(row.pci_address) not in stuck:
                    att = deps.registry.remove_attachment(row.id)
                    release.drop_released_siblings(deps, att)
                if str(row.pci_address) in stuck:
                    deps.registry.update_device(row.id, state="stuck")
            for intent in intents:
                if intent.pci_address not in stuck:
                    deps.registry.clear_intent(intent.id)
        log.info(
            "recovered interrupted operation %s (%s)", op_id, kind, extra={"ACTION": Action.RECOVER_JOURNAL}
        )


def _sweep_group_nodes(deps: CoreDeps, report: Report) -> None:
    """A group node handed to a uid that no attachment of this boot names goes back to root 0600."""
    for group in deps.host.iommu_groups():
        if not deps.host.vfio_group_node(group).exists():
            continue
        with deps.locks.try_hold([group]) as held:
            if held:  # a group a call is working on is that call's to settle
                _sweep_group_node(deps, group, report)


def _sweep_group_node(deps: CoreDeps, group: int, report: Report) -> None:
    try:
        owner = deps.host.node_owner(group)
    except OSError:
        return
    named = access.node_uids(deps.registry, group, deps.boot_id)
    if owner.uid == 0 or owner.uid in named:
        return
    try:
        access.revoke(deps.host, group, access.KERNEL_DEFAULT)
    except VfiodError as e:
        report.findings.append(
            f"/dev/vfio/{group} is owned by uid {owner.uid} and cannot be taken back: {e.message}"
        )
        return
    report.count("nodes_taken_back")
    report.findings.append(
        f"/dev/vfio/{group} was owned by uid {owner.uid}, which no attachment names: root 0600 again"
    )


def refresh_all(deps: CoreDeps, report: Report) -> None:
    for row in deps.registry.list_devices():
        with deps.locks.try_hold([group_of(deps, row)]) as held:
            if not held:
                continue  # a call is working on it: that call settles it
            # Held: nobody is working on it, so a `binding` or `releasing` left by a crash is stale.
            fresh = deps.registry.get_device(row.id)
            if fresh is not None:
                refresh_one(deps, fresh, report)


def refresh_one(deps: CoreDeps, row: DeviceRow, report: Report | None = None) -> None:
    addr = row.pci_address
    if not deps.host.device_exists(addr):
        if row.state != "missing":
            deps.registry.update_device(row.id, state="missing")
            if report is not None:
                report.count("missing")
                report.findings.append(f"{row.name} ({addr}) is gone from the bus")
        return
    live = read_function(deps.host, addr).identity
    expected = identity_of(row)
    if live != expected:
        if row.state != "missing":
            deps.registry.update_device(row.id, state="missing")
        if report is not None:
            report.count("replaced")
            found = live.describe() if live else "an unreadable device"
            report.findings.append(
                f"{row.name}: the card at {addr} is now {found}, not the registered {expected.describe()}; "
                "vfiod will not touch it"
            )
        return
    open_intents = deps.registry.intents_of_device(row.id, str(addr))
    if row.state == "stuck" or open_intents or deps.host.pending_writes(addr):
        if not _clean(deps, row, open_intents=bool(open_intents)):
            if row.state != "stuck":
                deps.registry.update_device(row.id, state="stuck")
            return
        deps.registry.settle_intents(row.id)
    deps.registry.update_device(row.id, **settled_state(deps, row, False))


def _clean(deps: CoreDeps, row: DeviceRow, *, open_intents: bool) -> bool:
    """A stuck device (or one with open intents) the kernel has since settled: no write of vfiod's is
    pending on it, and it is on its native driver with no stray override, or on vfio-pci with its
    attachment and no intent open (an open one may be a Detach that never got to run)."""
    addr = row.pci_address
    if deps.host.pending_writes(addr):
        return False
    drv = deps.host.driver(addr)
    override = deps.host.driver_override(addr)
    if drv is not None and drv == row.native_driver and override in (None, drv):
        return True
    return (
        not open_intents
        and read_function(deps.host, addr).is_vfio_bound
        and (override is None or override == drv)
        and deps.registry.attachment_of_device(row.id) is not None
    )
