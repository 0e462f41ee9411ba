"""The binder and its guards on the simulated kernel: every bind/restore path and every injected fault."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import SimFactory, SimHost
from tests.machines import HDA, IGPU, L4, L4_AUDIO, NVIDIA
from vfiod.core.binder import Binder, NativeDriver, Step
from vfiod.core.errors import (
    DeviceBusy,
    Failed,
    HostCritical,
    InvalidArgument,
    IOMMUGroupConflict,
    NativeDriverNotRestored,
    Timeout,
    VFIONotAvailable,
)
from vfiod.core.guard import (
    check_identity,
    check_not_host_critical,
    plan_groups,
    require_not_held,
    require_not_in_use,
)
from vfiod.core.system import LoadedModulesOnly
from vfiod.host.errors import SysfsBusy
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod_sim import faults, processes
from vfiod_sim.system import SimulatedModules


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[str, Step, bool | None]] = []

    def before(self, step: Step) -> None:
        self.steps.append(("before", step, None))

    def after(self, step: Step, ok: bool) -> None:
        self.steps.append(("after", step, ok))


def binder_for(sh: SimHost, observer: Recorder | None = None) -> Binder:
    return Binder(sh.host, SimulatedModules(sh.kernel), observer, verify_timeout=1.0, poll_interval=0.01)


def drivers(sh: SimHost, *addrs: PciAddress) -> list[str | None]:
    return [sh.host.driver(a) for a in addrs]


def bind_l4_group(sh: SimHost) -> tuple[Binder, list[NativeDriver]]:
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    binder = binder_for(sh)
    bound = binder.bind_group(plan)
    return binder, [f.native for f in bound]


def test_l4_alone_is_a_group_conflict_naming_the_audio_function(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    with pytest.raises(IOMMUGroupConflict) as e:
        plan_groups(sh.host, [L4], include_group=False)
    assert str(L4_AUDIO) in e.value.message
    assert "snd_hda_intel" in e.value.message
    assert "include_group" in e.value.message
    assert drivers(sh, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert sh.writes == []


def test_include_group_binds_both_and_restores_both(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    assert plan.to_bind == [L4, L4_AUDIO]
    assert plan.roles == {L4: "requested", L4_AUDIO: "companion"}
    recorder = Recorder()
    binder = binder_for(sh, recorder)
    bound = binder.bind_group(plan)

    assert [f.pci_address for f in bound] == [L4, L4_AUDIO]
    assert [f.native.driver for f in bound] == ["nvidia", "snd_hda_intel"]
    assert [f.native.module for f in bound] == ["nvidia", "snd_hda_intel"]
    assert drivers(sh, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]
    assert sh.host.has_vfio_dev(L4) and sh.host.has_vfio_dev(L4_AUDIO)
    assert sh.host.vfio_group_node(plan.group).exists()
    # override stays set while on vfio so another tool's drivers_probe cannot steal the device
    assert sh.host.driver_override(L4) == "vfio-pci"
    # the journal saw override -> unbind -> probe for each function, each before and after
    actions = [(kind, s.pci_address, s.action) for kind, s, _ in recorder.steps]
    assert actions[:6] == [
        ("before", L4, "override"),
        ("after", L4, "override"),
        ("before", L4, "unbind"),
        ("after", L4, "unbind"),
        ("before", L4, "probe"),
        ("after", L4, "probe"),
    ]

    for f in reversed(bound):
        binder.restore(f.pci_address, f.native)
    assert drivers(sh, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert sh.host.driver_override(L4) is None and sh.host.driver_override(L4_AUDIO) is None
    assert not sh.host.vfio_group_node(plan.group).exists()


def test_bind_is_idempotent_for_functions_already_on_vfio(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    bind_l4_group(sh)
    before = len(sh.writes)
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    assert plan.to_bind == [] and plan.already_bound == [L4, L4_AUDIO]
    bound = binder_for(sh).bind_group(plan)
    assert [f.changed for f in bound] == [False, False]
    assert len(sh.writes) == before


def test_every_write_is_logged_with_path_value_and_result(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    bind_l4_group(sh)
    paths = [(w.path, w.value, w.result) for w in sh.writes[:3]]
    assert paths == [
        (f"/sys/bus/pci/devices/{L4}/driver_override", "vfio-pci", "ok"),
        ("/sys/bus/pci/drivers/nvidia/unbind", str(L4), "ok"),
        ("/sys/bus/pci/drivers_probe", str(L4), "ok"),
    ]
    assert all(w.duration >= 0 for w in sh.writes)


def test_vfio_pci_not_loaded_and_not_loadable(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    sh.kernel.unload_module("vfio_pci")
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    with pytest.raises(VFIONotAvailable, match="modprobe vfio_pci"):
        Binder(sh.host, LoadedModulesOnly(sh.host)).bind_group(plan)
    assert drivers(sh, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    # a loader that can load it (systemd's modprobe@) makes the same bind work
    binder_for(sh).bind_group(plan)
    assert drivers(sh, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]


def test_host_critical_boot_vga_with_console(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    with pytest.raises(HostCritical, match="console"):
        check_not_host_critical(sh.host, [IGPU], force=False)
    check_not_host_critical(sh.host, [IGPU], force=True)
    check_not_host_critical(sh.host, [L4, L4_AUDIO], force=False)


def test_no_iommu_refuses_with_the_fix(sim: SimFactory) -> None:
    sh = sim("no-iommu")
    with pytest.raises(VFIONotAvailable, match="intel_iommu=on"):
        plan_groups(sh.host, [L4], include_group=True)


def test_bridges_are_never_rebound(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    with pytest.raises(InvalidArgument, match="bridge"):
        plan_groups(sh.host, [PciAddress.parse("0000:00:01.0")], include_group=True)
    # a host bridge is a header-type-0 function, but the chipset is never handed to a VM either
    with pytest.raises(InvalidArgument, match="bridge"):
        plan_groups(sh.host, [PciAddress.parse("0000:00:00.0")], include_group=False)
    assert sh.writes == []


def test_group_with_bridge_and_driverless_member(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    e1000 = PciAddress.parse("0000:02:01.0")
    edu = PciAddress.parse("0000:02:02.0")
    bridge = PciAddress.parse("0000:01:00.0")
    [plan] = plan_groups(sh.host, [e1000, edu], include_group=False)
    assert plan.to_bind == [e1000, edu]
    binder = binder_for(sh)
    bound = binder.bind_group(plan)
    assert drivers(sh, e1000, edu, bridge) == ["vfio-pci", "vfio-pci", None]
    assert {f.pci_address: f.native.driver for f in bound} == {e1000: "e1000", edu: None}
    for f in reversed(bound):
        binder.restore(f.pci_address, f.native)
    assert drivers(sh, e1000, edu, bridge) == ["e1000", None, None]
    assert sh.host.driver_override(edu) is None


def test_driverless_group_member_does_not_block(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    e1000 = PciAddress.parse("0000:02:01.0")
    [plan] = plan_groups(sh.host, [e1000], include_group=False)  # edu in the group has no driver
    binder_for(sh).bind_group(plan)
    assert sh.host.driver(e1000) == "vfio-pci"


def test_vfio_member_outside_request_joins_unless_attached_elsewhere(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    bind_l4_group(sh)
    [plan] = plan_groups(sh.host, [L4], include_group=False)
    assert plan.joined == [L4_AUDIO] and plan.already_bound == [L4]
    with pytest.raises(IOMMUGroupConflict, match="vm-other"):
        plan_groups(sh.host, [L4], include_group=False, attached_elsewhere={L4_AUDIO: "vm-other"})


def test_gpu_in_use_on_host_is_busy_but_persistence_daemon_is_ignored(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    # nvidia-persistenced (its own unit) holds /dev/nvidia0 and does not count
    require_not_in_use(sh.host, [L4], ignore_units={"nvidia-persistenced.service"})
    with pytest.raises(DeviceBusy, match="nvidia-persistenced"):
        require_not_in_use(sh.host, [L4], ignore_units=set())
    pid = processes.add_process(sh.root, exe="/usr/bin/python3", uid=1000, fds=["/dev/nvidia0"])
    with pytest.raises(DeviceBusy) as e:
        require_not_in_use(sh.host, [L4], ignore_units={"nvidia-persistenced.service"})
    assert (pid, "/usr/bin/python3") in e.value.holders
    processes.remove_process(sh.root, pid)
    # holders of only nvidiactl/nvidia-uvm do not pin one GPU
    processes.add_process(sh.root, exe="/usr/bin/nvidia-smi", fds=["/dev/nvidiactl", "/dev/nvidia-uvm"])
    require_not_in_use(sh.host, [L4], ignore_units={"nvidia-persistenced.service"})


def test_unreadable_proc_is_an_error_not_free(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    pid = processes.add_process(sh.root, exe="/usr/bin/mystery", fds=[])
    processes.set_fd_unreadable(sh.root, pid)
    with pytest.raises(Failed, match="cannot tell"):
        require_not_in_use(sh.host, [L4], ignore_units=set())


def test_held_group_node_makes_restore_refuse_without_writing(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    binder, natives = bind_l4_group(sh)
    group = sh.host.iommu_group(L4)
    pid = processes.add_process(
        sh.root, exe="/usr/bin/cloud-hypervisor", uid=1000, fds=[f"/dev/vfio/{group}"]
    )
    before = len(sh.writes)
    with pytest.raises(DeviceBusy) as e:
        binder.restore(L4, natives[0])
    assert f"pid {pid}" in e.value.message and "/usr/bin/cloud-hypervisor" in e.value.message
    assert e.value.holders == [(pid, "/usr/bin/cloud-hypervisor")]
    assert len(sh.writes) == before
    with pytest.raises(DeviceBusy):
        require_not_held(sh.host, [L4_AUDIO], "unbind")
    processes.remove_process(sh.root, pid)
    binder.restore(L4, natives[0])
    assert sh.host.driver(L4) == "nvidia"


def test_hung_unbind_times_out_within_deadline_and_leaves_device_stuck(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True, deadline=0.4)
    faults.inject(
        sh.root, "hang-nvidia", path="/sys/bus/pci/drivers/nvidia/unbind", value=str(L4), kind="hang"
    )
    late: list[str] = []
    done = threading.Event()

    def on_write(record: object) -> None:
        if getattr(record, "late", False):
            late.append(getattr(record, "result", ""))
            done.set()

    sh.host.add_write_listener(on_write)
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    started = time.monotonic()
    with pytest.raises(Timeout) as e:
        binder_for(sh).bind_group(plan)
    elapsed = time.monotonic() - started
    assert e.value.stuck == (L4,)
    assert elapsed < 0.4 + 2.0  # the deadline plus slack for a loaded machine, never the hang itself
    assert str(L4) in e.value.message
    # the audio function was never touched; the L4 is left alone (its device lock is held)
    assert sh.host.driver(L4_AUDIO) == "snd_hda_intel"
    faults.release(sh.root, "hang-nvidia")
    assert done.wait(5.0)
    assert late == ["ok"]
    # the kernel finished the unbind late: the device is driverless with the override set
    assert sh.host.driver(L4) is None


def test_hung_write_blocks_same_device_only(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True, deadline=0.3)
    faults.inject(sh.root, "hang", path="/sys/bus/pci/drivers/nvidia/unbind", value=str(L4), kind="hang")
    with pytest.raises(Exception, match="did not complete"):
        sh.host.unbind(L4, NVIDIA)
    faults.wait_hung(sh.root, "hang", 2.0)
    # another device is not blocked
    sh.host.set_driver_override(L4_AUDIO, DriverName.parse("vfio-pci"))
    # the same device would be (the kernel's device lock): the write is refused at once, not tried
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(SysfsBusy, match=r"was not tried: 0000:a2:00\.0 still has .*nvidia/unbind"):
        sh.host.set_driver_override(L4, DriverName.parse("vfio-pci"))
    assert time.monotonic() - started < 0.3 and threading.active_count() == threads
    faults.release(sh.root, "hang")


def test_refused_unbind_rolls_back(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    faults.inject(
        sh.root, "busy", path="/sys/bus/pci/drivers/snd_hda_intel/unbind", kind="errno", errno="EBUSY"
    )
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    with pytest.raises(Failed, match="EBUSY"):
        binder_for(sh).bind_group(plan)
    assert drivers(sh, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert sh.host.driver_override(L4) is None and sh.host.driver_override(L4_AUDIO) is None
    assert not sh.host.vfio_group_node(plan.group).exists()


def test_vfio_probe_that_binds_nothing_rolls_back(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    faults.inject(
        sh.root,
        "nothing",
        path="/sys/bus/pci/drivers_probe",
        kind="probe_nothing",
        pci_address=str(L4_AUDIO),
        driver="vfio-pci",
    )
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    with pytest.raises(Failed, match="did not claim"):
        binder_for(sh).bind_group(plan)
    assert drivers(sh, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert sh.host.driver_override(L4_AUDIO) is None


def test_slow_probe_within_deadline_succeeds(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True, deadline=3.0)
    faults.inject(
        sh.root, "slow", path="/sys/bus/pci/drivers_probe", value=str(L4), kind="delay", seconds=0.3
    )
    [plan] = plan_groups(sh.host, [L4], include_group=True)
    binder_for(sh).bind_group(plan)
    assert sh.host.driver(L4) == "vfio-pci"
    assert any(w.duration >= 0.3 for w in sh.writes if w.path.endswith("drivers_probe"))


def test_native_driver_that_refuses_to_come_back(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    binder, natives = bind_l4_group(sh)
    faults.inject(
        sh.root,
        "nv-dead",
        path="/sys/bus/pci/drivers_probe",
        kind="probe_fail",
        driver="nvidia",
        pci_address=str(L4),
        errno="ENODEV",
    )
    with pytest.raises(NativeDriverNotRestored) as e:
        binder.restore(L4, natives[0])
    assert e.value.stuck == (L4,)
    assert sh.host.driver(L4) is None
    assert sh.host.driver_override(L4) is None
    faults.clear(sh.root, "nv-dead")
    binder.restore(L4, natives[0])  # Recover's retry
    assert sh.host.driver(L4) == "nvidia"


def test_native_module_is_loaded_before_restore(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    binder, natives = bind_l4_group(sh)
    binder.restore(L4_AUDIO, natives[1])
    sh.kernel.unload_module("snd_hda_intel")
    assert not sh.host.driver_loaded(HDA)
    # bind the audio function again, unload its module, and restore: the module comes back first
    sh2 = sim("workstation-l4", idle=True)
    binder2, natives2 = bind_l4_group(sh2)
    sh2.kernel.unload_module("snd_hda_intel")
    binder2.restore(L4_AUDIO, natives2[1])
    assert sh2.host.driver(L4_AUDIO) == "snd_hda_intel"


def test_prebound_vfio_device_is_left_alone(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    bind_l4_group(sh)
    before = len(sh.writes)
    binder_for(sh).restore(L4, NativeDriver(DriverName.parse("vfio-pci"), None))
    assert sh.host.driver(L4) == "vfio-pci" and len(sh.writes) == before


def test_group_not_viable_after_bind_rolls_back(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    e1000 = PciAddress.parse("0000:02:01.0")
    edu = PciAddress.parse("0000:02:02.0")
    [plan] = plan_groups(sh.host, [e1000], include_group=False)
    # between the plan and the bind another tool binds the driverless edu to a DMA-owning driver
    sh.kernel.add_driver_match("e1000", vendor="1234", device="11e8")
    sh.host.probe(edu)
    assert sh.host.driver(edu) == "e1000"
    with pytest.raises(IOMMUGroupConflict, match="not viable"):
        binder_for(sh).bind_group(plan)
    assert sh.host.driver(e1000) == "e1000"


def test_identity_check_refuses_a_swapped_card(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    identity = read_function(sh.host, L4).identity
    assert identity is not None and identity.vendor_id == "10de" and identity.device_id == "27b8"
    check_identity(sh.host, L4, identity)
    sh.kernel.replace_card(L4, vendor="1002", device="744c")
    with pytest.raises(Failed, match="not the registered one"):
        check_identity(sh.host, L4, identity)
