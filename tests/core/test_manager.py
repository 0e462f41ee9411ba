"""The manager on the simulated kernel: the seed's workflow, the contract's semantics, the Go flaws that
must be impossible here, concurrency, and reconcile."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from tests.core.support.worlds import ADMIN, HM, OTHER, PERSISTENCED, MakeEnv, drivers
from tests.machines import IGPU, L4, L4_AUDIO, NIC
from vfiod.core.errors import (
    AlreadyBound,
    AlreadyExists,
    DeviceBusy,
    DeviceNotFound,
    Failed,
    HostCritical,
    InUse,
    InvalidArgument,
    InvalidName,
    InvalidPCIAddress,
    IOMMUGroupConflict,
    NameExists,
    NotAuthorized,
    NotBound,
    NotFound,
    NotOwner,
    Timeout,
)
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.writes import WriteRecord
from vfiod_sim import faults, processes


def test_seed_workflow(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    available = {d.pci_address: d for d in m.list_available()}
    assert available[L4].vendor_name == "NVIDIA Corporation"
    dev = m.register(HM, "0000:a2:00.0", "l4-gpu")
    assert dev.name == "l4-gpu" and dev.state == "host" and dev.driver == "nvidia"
    assert dev.sysfs_path == "/sys/bus/pci/devices/0000:a2:00.0/"
    assert drivers(e, L4) == ["nvidia"]  # registration changes no binding
    with pytest.raises(IOMMUGroupConflict, match="snd_hda_intel"):
        m.attach(HM, "ml-training", ["l4-gpu"])
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    atts, _warnings = m.attach(HM, "ml-training", ["l4-gpu"], include_group=True)
    assert [(a.pci_address, a.role) for a in atts] == [(L4, "requested"), (L4_AUDIO, "companion")]
    group = e.host.iommu_group(L4)
    assert group is not None
    assert all(a.vfio_group_path == f"/dev/vfio/{group}" for a in atts)
    assert atts[0].to_record()["device_config"] == {"path": "/sys/bus/pci/devices/0000:a2:00.0/"}
    assert drivers(e, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]
    assert e.host.node_owner(group).uid == 1000 and e.host.node_owner(group).mode == 0o600
    got = m.get_device("l4-gpu")
    assert got.state == "attached" and got.attached_to == "ml-training" and got.owner_uid == 1000
    assert got.bound_to_vfio
    # nvidia-persistenced was stopped around the bind and is running again
    assert e.units.calls == [("stop", PERSISTENCED), ("start", PERSISTENCED)]
    assert processes.unit_active(e.root, PERSISTENCED)
    # idempotent repeat
    writes = len(e.writes)
    again, _ = m.attach(HM, "ml-training", ["l4-gpu"], include_group=True)
    assert again == [dataclasses.replace(a, changed=False) for a in atts] and len(e.writes) == writes
    assert all(a.changed for a in atts)  # what the first call made; the repeat changed nothing
    m.detach(HM, "ml-training")
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    assert not e.host.vfio_group_node(group).exists()
    assert [d.state for d in m.list_devices()] == ["host", "host"]
    assert m.get_device("l4-gpu").attached_to == ""
    m.detach(HM, "ml-training")  # idempotent
    m.detach(HM, "never-existed")
    m.unregister(HM, "l4-gpu")
    with pytest.raises(NotFound):
        m.get_device("l4-gpu")


def test_register_validation_order_and_conflicts(env: MakeEnv) -> None:
    m = env().manager
    with pytest.raises(InvalidPCIAddress):
        m.register(HM, "a2:00.0", "x1")
    with pytest.raises(InvalidPCIAddress):
        m.register(HM, "0000:a2:00.8", "x1")
    # an invalid name on a missing device is InvalidName (Go said 404)
    with pytest.raises(InvalidName):
        m.register(HM, "0000:ff:00.0", "-bad")
    with pytest.raises(DeviceNotFound):
        m.register(HM, "0000:ff:00.0", "ok-name")
    with pytest.raises(InvalidArgument):
        m.register(HM, "0000:a2:00.0", "x1", {"bad\nkey": "v"})
    dev = m.register(HM, "0000:A2:00.0", "")  # upper case normalised; default name
    assert dev.pci_address == "0000:a2:00.0" and dev.name == "pci-0000-a2-00-0"
    with pytest.raises(AlreadyExists):
        m.register(HM, "0000:a2:00.0", "other")
    with pytest.raises(NameExists):
        m.register(HM, "0000:a2:00.1", "pci-0000-a2-00-0")
    # the audio function is a same-slot function of a candidate: no admin needed
    m.register(HM, "0000:a2:00.1", "l4-audio")
    # a NIC is not a candidate: admin only
    with pytest.raises(NotAuthorized):
        m.register(HM, str(NIC), "nic")
    assert m.register(ADMIN, str(NIC), "nic").name == "nic"
    assert [d.name for d in m.list_devices({"k": "v"})] == []


def test_tags_filter(env: MakeEnv) -> None:
    m = env().manager
    m.register(HM, str(L4), "l4-gpu", {"pool": "a", "zone": "1"})
    m.register(HM, str(IGPU), "igpu", {"pool": "b"})
    assert [d.name for d in m.list_devices({"pool": "a"})] == ["l4-gpu"]
    assert [d.name for d in m.list_devices({"pool": "a", "zone": "2"})] == []


def test_host_critical_igpu_refused_unless_force_by_admin(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(IGPU), "igpu")
    with pytest.raises(HostCritical, match="console"):
        m.attach(HM, "vm1", ["igpu"])
    assert drivers(e, IGPU) == ["i915"]
    with pytest.raises(NotAuthorized):
        m.attach(HM, "vm1", ["igpu"], force=True)


def test_in_use_and_not_owner(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    with pytest.raises(InUse):
        m.attach(HM, "vm2", ["l4-gpu"], include_group=True)
    with pytest.raises(InUse):
        m.attach(OTHER, "vm1", ["l4-gpu"], include_group=True)
    with pytest.raises(InUse):
        m.unregister(HM, "l4-gpu")
    with pytest.raises(NotOwner):
        m.detach(OTHER, "vm1")
    assert m.get_device("l4-gpu").state == "attached"
    # an admin may detach anybody's attachment
    m.detach(ADMIN, "vm1")
    assert drivers(e, L4) == ["nvidia"]


def test_owner_uid_needs_admin(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    with pytest.raises(NotAuthorized):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True, owner_uid=2000)
    atts, _ = m.attach(ADMIN, "vm1", ["l4-gpu"], include_group=True, owner_uid=2000, gpudirect_clique=3)
    assert atts[0].to_record()["device_config"] == {
        "path": "/sys/bus/pci/devices/0000:a2:00.0/",
        "x_nv_gpudirect_clique": 3,
    }
    assert e.host.node_owner(e.host.iommu_group(L4) or 0).uid == 2000


def test_attach_again_with_another_clique_is_refused(env: MakeEnv) -> None:
    """Before, the repeat silently answered the old clique; now InUse says which it has. The same clique,
    or none asked, is the idempotent repeat."""
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    first, _ = m.attach(HM, "vm1", ["l4-gpu"], include_group=True, gpudirect_clique=3)
    with pytest.raises(InUse, match="with gpudirect_clique 3, not 5"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True, gpudirect_clique=5)
    same = [dataclasses.replace(a, changed=False) for a in first]
    assert m.attach(HM, "vm1", ["l4-gpu"], include_group=True, gpudirect_clique=3)[0] == same
    assert m.attach(HM, "vm1", ["l4-gpu"], include_group=True)[0] == same


def test_held_group_node_makes_detach_refuse_without_touching_sysfs(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    group = e.host.iommu_group(L4)
    pid = processes.add_process(e.root, exe="/usr/bin/cloud-hypervisor", uid=1000, fds=[f"/dev/vfio/{group}"])
    before = len(e.writes)
    owner_before = e.host.node_owner(group or 0)
    with pytest.raises(DeviceBusy) as err:
        m.detach(HM, "vm1")
    assert (pid, "/usr/bin/cloud-hypervisor") in err.value.holders
    assert len(e.writes) == before
    assert e.host.node_owner(group or 0) == owner_before
    assert m.get_device("l4-gpu").state == "attached"
    processes.remove_process(e.root, pid)
    m.detach(HM, "vm1")
    assert drivers(e, L4) == ["nvidia"]


def test_keep_bound_and_admin_bind_unbind(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    group = e.host.iommu_group(L4) or 0
    m.detach(HM, "vm1", keep_bound=True)
    assert drivers(e, L4) == ["vfio-pci"]
    assert m.get_device("l4-gpu").state == "vfio"
    assert e.host.node_owner(group).uid == 0  # access revoked even though it stays bound
    with pytest.raises(NotAuthorized):
        m.bind(HM, "l4-gpu")
    m.bind(ADMIN, "l4-gpu")  # already on vfio: idempotent
    with pytest.raises(AlreadyBound):
        m.bind(ADMIN, "l4-gpu", exclusive=True)
    with pytest.raises(NotAuthorized):
        m.unbind(HM, "l4-gpu")
    m.unbind(ADMIN, "l4-gpu")
    assert drivers(e, L4) == ["nvidia"]
    m.unbind(ADMIN, "l4-gpu")
    with pytest.raises(NotBound):
        m.unbind(ADMIN, "l4-gpu", exclusive=True)
    m.bind(ADMIN, "l4-gpu", include_group=True)
    assert drivers(e, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]
    # a bound, unattached device joins an attach of the same group
    atts, _ = m.attach(HM, "vm2", ["l4-gpu"])
    assert {a.pci_address for a in atts} == {L4, L4_AUDIO}
    m.detach(HM, "vm2")
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]


def test_unregister_returns_a_bound_device_to_its_driver(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.bind(ADMIN, "l4-gpu", include_group=True)
    m.unregister(HM, "l4-gpu")
    assert drivers(e, L4) == ["nvidia"]


def test_failed_detach_keeps_attachment_and_marks_stuck_then_recover(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    faults.inject(
        e.root, "nv", kind="probe_fail", path="/sys/bus/pci/drivers_probe", driver="nvidia", errno="ENODEV"
    )
    with pytest.raises(Exception, match="did not come back"):
        m.detach(HM, "vm1")
    dev = m.get_device("l4-gpu")
    assert dev.state == "stuck" and dev.attached_to == "vm1"
    assert processes.unit_active(e.root, PERSISTENCED)  # the hold was released all the same
    with pytest.raises(Failed, match="stuck"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    with pytest.raises(NotAuthorized):
        m.recover(HM)
    plan = m.recover(ADMIN, dry_run=True)
    assert any("would return" in f for f in plan.findings)
    assert m.get_device("l4-gpu").state == "stuck"
    faults.clear(e.root, "nv")
    report = m.recover(ADMIN)
    assert report.counters["recovered"] == 1
    dev = m.get_device("l4-gpu")
    assert dev.state == "host" and dev.driver == "nvidia" and dev.attached_to == ""


def test_hung_unbind_times_out_and_device_is_stuck_until_the_kernel_finishes(env: MakeEnv) -> None:
    e = env(deadline=0.5)
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    faults.inject(e.root, "hang", kind="hang", path="/sys/bus/pci/drivers/nvidia/unbind")
    with pytest.raises(Timeout):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert m.get_device("l4-gpu").state == "stuck"
    # ListDevices answers while the write hangs
    assert sorted(d.name for d in m.list_devices()) == ["l4-gpu", "pci-0000-a2-00-1"]
    # while the kernel still has the write, the persistence unit stays stopped and Recover leaves it alone
    assert not processes.unit_active(e.root, PERSISTENCED)
    assert m.recover(ADMIN).counters["recovered"] == 0
    faults.release(e.root, "hang")
    for _ in range(200):
        if not e.host.pending_writes():
            break
        threading.Event().wait(0.05)
    # the late completion re-read the device (driverless, stray override: still stuck) and released the hold
    assert e.host.driver(L4) is None and m.get_device("l4-gpu").state == "stuck"
    assert processes.unit_active(e.root, PERSISTENCED)
    report = m.recover(ADMIN)
    assert report.counters["recovered"] == 1
    assert drivers(e, L4) == ["nvidia"]


def test_reconcile_releases_only_the_callers_dead_instances(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    gpus = [PciAddress.parse(a.pci_address) for a in m.list_available() if a.vendor_id == "10de"]
    assert len(gpus) == 8
    for i, addr in enumerate(gpus[:3]):
        m.register(HM, str(addr), f"gpu{i}")
    m.attach(HM, "alive", ["gpu0"])
    m.attach(HM, "dead", ["gpu1"])
    m.attach(OTHER, "others", ["gpu2"])
    # an empty live list with dry_run changes nothing
    before = len(e.writes)
    report = m.reconcile(HM, [], dry_run=True)
    assert report.counters["released"] == 2 and len(e.writes) == before
    assert m.get_device("gpu0").state == "attached"
    report = m.reconcile(HM, ["alive"])
    assert report.counters["released"] == 1 and report.counters["kept"] == 1
    assert m.get_device("gpu1").state == "host" and m.get_device("gpu0").state == "attached"
    assert m.get_device("gpu2").state == "attached"  # another uid's: untouched
    # a held node is never released, and its holder is reported
    group = e.host.iommu_group(gpus[0]) or 0
    processes.add_process(e.root, exe="/usr/bin/qemu-system-x86_64", uid=4242, fds=[f"/dev/vfio/{group}"])
    report = m.reconcile(HM, [])
    assert report.counters["held"] == 1
    assert any("not the owner" in f for f in report.findings)
    assert m.get_device("gpu0").state == "attached"
    with pytest.raises(NotAuthorized):
        m.reconcile(HM, [], all_users=True)


def test_64_concurrent_attaches_on_dgx(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    gpus = [PciAddress.parse(a.pci_address) for a in m.list_available() if a.vendor_id == "10de"]
    for i, addr in enumerate(gpus):
        m.register(HM, str(addr), f"gpu{i}")
    violations: list[str] = []

    def watch(record: WriteRecord) -> None:
        if record.path == "/sys/bus/pci/drivers/nvidia/unbind" and processes.unit_active(
            e.root, PERSISTENCED
        ):
            violations.append(record.value)

    e.host.add_write_listener(watch)
    results: dict[int, object] = {}
    barrier = threading.Barrier(64)

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = m.attach(HM, f"vm{i}", [f"gpu{i % 8}"])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 64
    winners = [i for i, r in results.items() if isinstance(r, tuple)]
    losers = [r for r in results.values() if not isinstance(r, tuple)]
    assert len(winners) == 8 and sorted(i % 8 for i in winners) == list(range(8))
    assert all(isinstance(r, InUse) for r in losers)
    assert violations == []
    stops = [c for c in e.units.calls if c[0] == "stop"]
    starts = [c for c in e.units.calls if c[0] == "start"]
    assert len(stops) == len(starts) >= 1
    # every stop is followed by its start before the next stop: the hold never double-stops
    assert [c[0] for c in e.units.calls] == ["stop", "start"] * len(stops)
    assert processes.unit_active(e.root, PERSISTENCED)
    for i in winners:
        m.detach(HM, f"vm{i}")
    assert all(e.host.driver(a) == "nvidia" for a in gpus)


def test_new_boot_keeps_attachments_as_reservations(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    e.kernel.reboot()
    m = e.reopen()
    report = m.startup()
    dev = m.get_device("l4-gpu")
    assert dev.state == "host" and dev.driver == "nvidia" and dev.attached_to == "vm1"
    assert any("new boot" in f for f in report.findings)
    with pytest.raises(InUse):
        m.attach(OTHER, "vm9", ["l4-gpu"], include_group=True)
    atts, _ = m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert len(atts) == 2 and drivers(e, L4) == ["vfio-pci"]
    assert m.get_device("l4-gpu").state == "attached"


def test_missing_device_and_replaced_card(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    kernel = e.kernel
    kernel.unplug(str(L4))
    m.startup()
    assert m.get_device("l4-gpu").state == "missing"
    with pytest.raises(Failed, match="not on the bus"):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    kernel.replug(str(L4))
    m.startup()
    assert m.get_device("l4-gpu").state == "host"
    kernel.replace_card(str(L4), vendor="1002", device="744c")
    report = m.startup()
    assert report.counters.get("replaced") == 1
    assert m.get_device("l4-gpu").state == "missing"
    before = len(e.writes)
    with pytest.raises(Failed):
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert len(e.writes) == before


def test_import_hypeman(env: MakeEnv, tmp_path: Path) -> None:
    e = env()
    m = e.manager
    data = tmp_path / "hypeman"
    good = data / "devices" / "tz4a98xxat96iws9zmbrgj3a"
    good.mkdir(parents=True)
    (good / "metadata.json").write_text(
        '{"id": "tz4a98xxat96iws9zmbrgj3a", "name": "l4-gpu", "type": "gpu", "pci_address": "0000:a2:00.0",'
        ' "vendor_id": "10de", "device_id": "27b8", "iommu_group": 7, "bound_to_vfio": false,'
        ' "attached_to": "inst-1", "created_at": "2026-01-12T10:00:00.123456+01:00"}'
    )
    bad = data / "devices" / "broken"
    bad.mkdir()
    (bad / "metadata.json").write_text('{"id": "trunc')
    with pytest.raises(NotAuthorized):
        m.import_hypeman(HM, str(data))
    report = m.import_hypeman(ADMIN, str(data))
    assert report.counters["imported"] == 1 and report.counters["skipped"] == 1
    assert any("broken" in f and "unreadable" in f for f in report.findings)
    dev = m.get_device("tz4a98xxat96iws9zmbrgj3a")
    assert dev.name == "l4-gpu" and dev.created_at == "2026-01-12T09:00:00Z"
    assert dev.attached_to == "inst-1"  # a reservation for the importing uid


def test_refresh_after_another_tool_binds_the_device(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.register(HM, str(L4_AUDIO), "l4-audio")
    changed: list[str] = []
    m.add_change_listener(changed.append)
    # another tool (driverctl, a script) moves the audio function to vfio-pci behind vfiod's back
    e.host.set_driver_override(L4_AUDIO, DriverName.parse("vfio-pci"))
    e.host.unbind(L4_AUDIO, DriverName.parse("snd_hda_intel"))
    e.host.probe(L4_AUDIO)
    m.refresh_device(str(L4_AUDIO))
    dev = m.get_device("l4-audio")
    assert dev.state == "vfio" and dev.bound_to_vfio and dev.id in changed
    # it is not vfiod's to put back: it was not bound by vfiod
    m.attach(HM, "vm1", ["l4-gpu", "l4-audio"])
    m.detach(HM, "vm1")
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "vfio-pci"]
