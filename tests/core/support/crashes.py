"""Crashing the manager and what must hold afterwards: a child process SIGKILLed at a journal point, the
manager a restarted daemon would have, and every way its registry and the kernel can disagree (used by
the crash, crash-loop, consistency, start-up and disk-full tests)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from vfiod.core.context import Caller
from vfiod.core.manager import Manager
from vfiod_sim import processes
from vfiod_sim.simulation import Simulation

PERSISTENCED = "nvidia-persistenced.service"
HM = Caller(uid=1000)


def open_manager(sim_root: Path, state: Path) -> Manager:
    """The manager a restarted daemon would have on `sim_root`'s simulated host and `state`."""
    return Simulation.open(sim_root).manager(state, verify_timeout=1.0)


def violations(m: Manager, sim_root: Path) -> list[str]:
    """Every way the registry and the kernel disagree after a restart."""
    out: list[str] = []
    host = m.host
    for row in m.registry.list_devices():
        addr = row.pci_address
        drv, override = host.driver(addr), host.driver_override(addr)
        att = m.registry.attachment_of_device(row.id)
        if row.state == "host" and ((drv or "") != row.native_driver or override not in (None, drv)):
            out.append(f"{addr} is stored host but the kernel has {drv} (override {override})")
        if row.state in ("vfio", "attached") and drv != "vfio-pci":
            out.append(f"{addr} is stored {row.state} but the kernel has {drv}")
        if row.state == "stuck" and not host.pending_writes(addr):
            out.append(f"{addr} is stuck with no write pending")
        if row.state in ("binding", "releasing", "missing"):
            out.append(f"{addr} is left {row.state}")
        if (att is not None) != (row.state == "attached"):
            out.append(f"{addr} is {row.state} with attachment {att.instance_id if att else None}")
    for group in host.iommu_groups():
        if not host.vfio_group_node(group).exists():
            continue
        owner = host.node_owner(group)
        owners = {a.owner_uid for a in m.registry.attachments_in_group(group)}
        if owners and owner.uid not in owners:
            out.append(f"/dev/vfio/{group} is uid {owner.uid}, its attachment is uid {sorted(owners)}")
        if not owners and (owner.uid, owner.mode) != (0, 0o600):
            out.append(f"/dev/vfio/{group} is uid {owner.uid} mode {owner.mode:o} with no attachment")
    if m.registry.open_intents():
        out.append(f"{len(m.registry.open_intents())} intents open after the devices settled")
    holds = m.registry.all_holds()
    active = processes.unit_active(sim_root, PERSISTENCED)
    has_unit = any(p.cgroup_unit == PERSISTENCED for p in Simulation.open(sim_root).kernel.profile.processes)
    if holds or (has_unit and not active):
        out.append(f"persistence holds {[(h.unit, h.holders) for h in holds]} with the unit active={active}")
    return out


def child(sim_root: str, state: str, action: str, crash_at: str) -> None:
    os.environ["VFIOD_TEST_HOOKS"] = "1"
    os.environ["VFIOD_TEST_CRASH_AT"] = f"{action}:{crash_at}"
    m = open_manager(Path(sim_root), Path(state))
    if action == "attach":
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    else:
        m.detach(HM, "vm1")
    os._exit(0)  # reached only if the crash point was never hit


def run_and_kill(sim_root: Path, state: Path, action: str, point: str) -> int | None:
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=child, args=(str(sim_root), str(state), action, point))
    proc.start()
    proc.join(60)
    return proc.exitcode
