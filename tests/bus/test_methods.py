"""Every method of the contract through the bus, and every error of the contract reachable."""

from __future__ import annotations

import json
from pathlib import Path

from dbus_fast import MessageFlag, Variant

from tests.bus.conftest import Clients, StartVfiod
from tests.bus.support.harness import Client, PolkitMock
from tests.bus.support.helpers import (
    ABSENT,
    AUDIO,
    GPU,
    IGPU,
    attach,
    b,
    detach,
    device,
    devices,
    ok,
    plain,
    register,
)
from vfiod.bus.names import (
    ACTION_ADMIN,
    ACTION_ATTACH,
    ACTION_INSPECT,
    ACTION_REGISTER,
    DEVICE_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    PROPERTIES_IFACE,
)
from vfiod.config import Config, Deadlines, PerCaller
from vfiod.core.errors import ALL_ERRORS
from vfiod.host.pciaddr import PciAddress
from vfiod_sim import faults, processes

SHORT_DEADLINES = Config(deadlines=Deadlines(default=1.0))


def test_the_seed_workflow(start_vfiod: StartVfiod, clients: Clients) -> None:
    start_vfiod()
    root = clients.root
    root.watch(f"type='signal',sender='org.hypeman.Devices1',path_namespace='{MANAGER_PATH}'")

    available = ok(root.m("ListAvailable", "a{sv}", {}))
    assert {d["pci_address"] for d in available} == {IGPU, GPU}
    everything = ok(root.m("ListAvailable", "a{sv}", {"all": b(True)}))
    assert len(everything) > len(available)
    status = ok(root.m("GetHostStatus", "a{sv}", {}))
    assert status["iommu_enabled"] is True and status["gpu_slots_total"] == 1

    rec = register(root, GPU, "l4-gpu", tags=Variant("a{ss}", {"pool": "ml"}))
    assert rec["state"] == "host" and rec["driver"] == "nvidia" and rec["tags"] == {"pool": "ml"}
    added = root.wait_signal(lambda s: s.member == "InterfacesAdded")
    assert added.path == MANAGER_PATH and added.body[0] == rec["object_path"]
    assert plain(added.body[1])[DEVICE_IFACE]["Name"] == "l4-gpu"
    assert [
        d["name"] for d in ok(root.m("ListDevices", "a{sv}", {"tags": Variant("a{ss}", {"pool": "ml"})}))
    ] == ["l4-gpu"]
    assert ok(root.m("ListDevices", "a{sv}", {"tags": Variant("a{ss}", {"pool": "web"})})) == []
    assert device(root, rec["id"])["name"] == "l4-gpu"

    attachments, warnings = ok(attach(root, "ml-training", "l4-gpu", include_group=b(True)))
    assert [(a["pci_address"], a["role"]) for a in attachments] == [(GPU, "requested"), (AUDIO, "companion")]
    assert attachments[0]["device_config"] == {"path": f"/sys/bus/pci/devices/{GPU}/"}
    assert attachments[0]["vfio_group_path"] == "/dev/vfio/7"
    assert all(isinstance(w, str) for w in warnings)
    changed = root.wait_signal(lambda s: s.member == "PropertiesChanged" and s.path == rec["object_path"])
    assert changed.body[0] == DEVICE_IFACE
    # idempotent: the same records again
    again, _ = ok(attach(root, "ml-training", "l4-gpu", include_group=b(True)))
    assert again == [{**a, "changed": False} for a in attachments]
    assert all(a["changed"] is True for a in attachments)  # `changed`: made by that call, not the repeat
    gpu = device(root, "l4-gpu")
    assert (gpu["state"], gpu["attached_to"], gpu["owner_uid"], gpu["bound_to_vfio"]) == (
        "attached",
        "ml-training",
        0,
        True,
    )

    props = ok(root.call("GetAll", "s", [DEVICE_IFACE], path=rec["object_path"], interface=PROPERTIES_IFACE))
    assert props["State"] == "attached" and props["OwnerUid"] == 0 and props["IommuGroup"] == 7
    assert (
        ok(
            root.call(
                "Get", "ss", [DEVICE_IFACE, "Driver"], path=rec["object_path"], interface=PROPERTIES_IFACE
            )
        )
        == "vfio-pci"
    )
    managed = ok(root.call("GetManagedObjects", "", [], interface=OBJECT_MANAGER_IFACE))
    assert rec["object_path"] in managed
    assert ok(root.call("Ping", "", [], interface=PEER_IFACE)) == []

    report = ok(root.m("Reconcile", "asa{sv}", ["ml-training"], {"dry_run": b(True)}))
    assert report["kept"] == 2 and isinstance(report["findings"], list)
    ok(detach(root, "ml-training"))
    ok(detach(root, "ml-training"))  # idempotent
    gpu = device(root, "l4-gpu")
    assert (gpu["state"], gpu["driver"], gpu["attached_to"]) == ("host", "nvidia", "")
    assert gpu["owner_uid"] == 4294967295  # always present: none is (uint32) -1, never a missing key (root)

    ok(root.m("Bind", "sa{sv}", "l4-gpu", {"include_group": b(True)}))
    assert device(root, "l4-gpu")["state"] == "vfio"
    ok(root.m("Bind", "sa{sv}", "l4-gpu", {}))  # already on vfio: nothing to do
    ok(root.m("Unbind", "sa{sv}", "l4-gpu", {}))
    assert device(root, "l4-gpu")["driver"] == "nvidia"
    ok(root.m("Unbind", "sa{sv}", "l4-gpu", {}))  # not on vfio: nothing to do
    recovered = ok(root.m("Recover", "sa{sv}", "", {"dry_run": b(True)}))
    assert "candidates" in recovered
    ok(root.m("Recover", "sa{sv}", "l4-gpu", {}))

    ok(root.m("UnregisterDevice", "sa{sv}", "l4-gpu", {}))
    removed = root.wait_signal(lambda s: s.member == "InterfacesRemoved" and s.body[0] == rec["object_path"])
    assert removed.body[1] == [DEVICE_IFACE]
    assert "l4-gpu" not in [d["name"] for d in devices(root)]


def test_import_hypeman(start_vfiod: StartVfiod, clients: Clients, tmp_path: Path) -> None:
    start_vfiod()
    data = tmp_path / "hypeman"
    (data / "devices" / "x").mkdir(parents=True)
    (data / "devices" / "x" / "metadata.json").write_text(
        json.dumps({"id": "abcdefghijklmnopqrstuvwx", "name": "imported-gpu", "pci_address": GPU}),
        encoding="utf-8",
    )
    report = ok(clients.root.m("ImportHypeman", "sa{sv}", str(data), {}))
    assert report["imported"] == 1
    assert device(clients.root, "imported-gpu")["id"] == "abcdefghijklmnopqrstuvwx"
    # the new device object is on the bus at once
    path = "/org/hypeman/Devices1/devices/abcdefghijklmnopqrstuvwx"
    assert (
        ok(clients.root.call("Get", "ss", [DEVICE_IFACE, "Name"], path=path, interface=PROPERTIES_IFACE))
        == "imported-gpu"
    )


def expect(c: Client, name: str, member: str, signature: str, *args: object) -> str:
    reply = c.m(member, signature, *args)
    assert not reply.ok, f"{member} succeeded"
    assert reply.error == f"org.hypeman.Devices1.Error.{name}", (reply.error, reply.text)
    assert reply.text and "Traceback" not in reply.text
    return reply.text


def test_input_and_registry_errors(start_vfiod: StartVfiod, clients: Clients) -> None:
    start_vfiod()
    root = clients.root
    seen = set()
    expect(root, "NotFound", "GetDevice", "sa{sv}", "no-such-device", {})
    expect(root, "DeviceNotFound", "RegisterDevice", "ssa{sv}", ABSENT, "", {})
    expect(root, "InvalidPCIAddress", "RegisterDevice", "ssa{sv}", "zz:1", "", {})
    expect(root, "InvalidName", "RegisterDevice", "ssa{sv}", GPU, "-bad name", {})
    text = expect(root, "InvalidArgument", "ListDevices", "a{sv}", {"bogus": b(True)})
    assert "'bogus'" in text
    text = expect(root, "InvalidArgument", "ListAvailable", "a{sv}", {"all": Variant("s", "yes")})
    assert "'all'" in text
    text = expect(root, "InvalidArgument", "Attach", "sasa{sv}", "bad instance!", ["x"], {})
    wrong = root.call("GetDevice", "s", ["x"])  # wrong signature
    assert wrong.error == "org.hypeman.Devices1.Error.InvalidArgument", wrong
    register(root, GPU, "gpu")
    expect(root, "NameExists", "RegisterDevice", "ssa{sv}", AUDIO, "gpu", {})
    expect(root, "AlreadyExists", "RegisterDevice", "ssa{sv}", GPU, "other", {})
    seen |= {
        "NotFound",
        "DeviceNotFound",
        "InvalidPCIAddress",
        "InvalidName",
        "InvalidArgument",
        "NameExists",
        "AlreadyExists",
    }

    expect(
        root, "IOMMUGroupConflict", "Attach", "sasa{sv}", "vm1", ["gpu"], {}
    )  # its audio is on snd_hda_intel
    ok(attach(root, "vm1", "gpu", include_group=b(True)))
    expect(root, "InUse", "Attach", "sasa{sv}", "vm2", ["gpu"], {"include_group": b(True)})
    expect(root, "AlreadyBound", "Bind", "sa{sv}", "gpu", {"exclusive": b(True)})
    ok(detach(root, "vm1"))
    expect(root, "NotBound", "Unbind", "sa{sv}", "gpu", {"exclusive": b(True)})
    register(root, IGPU, "igpu")
    text = expect(root, "HostCritical", "Attach", "sasa{sv}", "vm3", ["igpu"], {})
    assert "console" in text
    seen |= {"IOMMUGroupConflict", "InUse", "AlreadyBound", "NotBound", "HostCritical"}
    assert seen


def test_a_pf_with_vfs_enabled_is_sriov_enabled(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod("dgx-h100")
    pf = "0000:1c:00.0"  # the first ConnectX-7: SR-IOV with 4 VFs
    register(clients.root, pf, "cx7")
    sysfs = vfiod.daemon.simulation.host.from_logical  # type: ignore[union-attr]
    vfiod.kernel.write_attribute(sysfs(f"/sys/bus/pci/devices/{pf}/sriov_numvfs"), b"2")
    text = expect(clients.root, "SriovEnabled", "Bind", "sa{sv}", "cx7", {})
    assert "0000:1c:00.1" in text and "0000:1c:00.2" in text
    (listed,) = [
        d for d in ok(clients.root.m("ListAvailable", "a{sv}", {"all": b(True)})) if d["pci_address"] == pf
    ]
    assert (listed["sriov_totalvfs"], listed["sriov_numvfs"]) == (4, 2)
    assert listed["virtfns"] == ["0000:1c:00.1", "0000:1c:00.2"] and listed["physfn"] == ""


def test_busy_and_ownership_errors(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> None:
    vfiod = start_vfiod()
    polkit.allow(ACTION_INSPECT, ACTION_REGISTER, ACTION_ATTACH)
    register(clients.alice, GPU, "gpu")
    ok(attach(clients.alice, "vm1", "gpu", include_group=b(True)))
    text = expect(clients.bob, "NotOwner", "Detach", "sasa{sv}", "vm1", [], {})
    assert str(clients.alice.uid) in text
    pid = processes.add_process(
        vfiod.root, exe="/usr/bin/cloud-hypervisor", uid=clients.alice.uid, fds=["/dev/vfio/7"]
    )
    text = expect(clients.alice, "DeviceBusy", "Detach", "sasa{sv}", "vm1", [], {})
    assert str(pid) in text and "cloud-hypervisor" in text
    processes.remove_process(vfiod.root, pid)
    ok(detach(clients.alice, "vm1"))
    polkit.allow(ACTION_INSPECT)
    text = expect(clients.alice, "NotAuthorized", "Bind", "sa{sv}", "gpu", {})
    assert ACTION_ADMIN in text


def test_kernel_errors(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod(config=SHORT_DEADLINES)
    root = clients.root
    register(root, GPU, "gpu")
    # the audio function's native driver does not come back (1 s deadline for snd_hda_intel)
    ok(attach(root, "vm1", "gpu", include_group=b(True)))
    faults.inject(vfiod.root, "no-audio", kind="probe_nothing", pci_address=AUDIO, driver="snd_hda_intel")
    expect(root, "NativeDriverNotRestored", "Detach", "sasa{sv}", "vm1", [], {})
    faults.clear(vfiod.root, "no-audio")
    assert device(root, "pci-0000-a2-00-1")["state"] == "stuck"
    text = expect(root, "Failed", "Attach", "sasa{sv}", "vm1", ["pci-0000-a2-00-1"], {})
    assert "Recover" in text
    ok(root.m("Recover", "sa{sv}", "", {}))
    ok(detach(root, "vm1"))
    assert device(root, "gpu")["driver"] == "nvidia"

    # a write that hangs past its deadline
    ok(root.m("Bind", "sa{sv}", "gpu", {"include_group": b(True)}))
    faults.inject(vfiod.root, "hang", kind="hang", path="/sys/bus/pci/drivers/vfio-pci/unbind", value=AUDIO)
    text = expect(root, "Timeout", "Unbind", "sa{sv}", "pci-0000-a2-00-1", {})
    assert "stuck" in text
    faults.release(vfiod.root, "hang")


def test_vfio_not_available(start_vfiod: StartVfiod, clients: Clients) -> None:
    # No persistence linger: the unit is started again before Attach answers (tests/core covers the linger).
    vfiod = start_vfiod(systemd=True, config=Config(persistence_linger=0))
    assert vfiod.standin is not None
    vfiod.kernel.unload_module("vfio_pci")
    vfiod.standin.modprobe_works = False
    register(clients.root, GPU, "gpu")
    text = expect(
        clients.root, "VFIONotAvailable", "Attach", "sasa{sv}", "vm1", ["gpu"], {"include_group": b(True)}
    )
    assert "modprobe vfio_pci" in text
    # modprobe@vfio_pci.service through the systemd stand-in loads it
    vfiod.standin.modprobe_works = True
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))
    calls = vfiod.standin.calls
    assert ("StartUnit", "modprobe@vfio_pci.service") in calls
    # the persistence unit was held stopped around the NVIDIA bind, through systemd
    stop = calls.index(("StopUnit", "nvidia-persistenced.service"))
    assert ("StartUnit", "nvidia-persistenced.service") in calls[stop:]


def test_handoff_fd_on_a_kernel_without_cdevs(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()  # workstation-l4: Debian's 6.1, neither VFIO device cdevs nor iommufd
    register(clients.root, GPU, "gpu")
    mark = vfiod.trace_len()
    text = expect(
        clients.root,
        "HandoffUnsupported",
        "Attach",
        "sasa{sv}",
        "vm1",
        ["gpu"],
        {"include_group": b(True), "handoff": Variant("s", "fd")},
    )
    assert "no iommufd" in text and "handoff node" in text and vfiod.trace_len() == mark
    text = expect(
        clients.root, "InvalidArgument", "Attach", "sasa{sv}", "vm1", ["gpu"], {"handoff": Variant("s", "x")}
    )
    assert "handoff must be one of node, fd" in text
    assert device(clients.root, "gpu")["driver"] == "nvidia"


def test_busy_when_a_connection_is_at_its_cap(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod(config=Config(per_caller=PerCaller(max_calls_in_flight=1)))
    assert vfiod.service.max_calls_per_caller == 1
    vfiod.service._calls_of[clients.bob.unique_name] = 1  # as if one call of bob's were still running
    text = expect(clients.bob, "Busy", "ListDevices", "a{sv}", {})
    assert "1 calls in flight (at most 1)" in text and "nothing was done" in text
    ok(clients.alice.m("ListDevices", "a{sv}", {}))
    vfiod.service._calls_of.pop(clients.bob.unique_name)
    ok(clients.bob.m("ListDevices", "a{sv}", {}))


def test_recovering_while_start_up_finishes_a_device(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    dev = register(clients.root, GPU, "gpu")
    vfiod.manager.recovering = {dev["id"]: GPU}  # as while start-up finishes an interrupted operation
    text = expect(
        clients.root, "Recovering", "Attach", "sasa{sv}", "vm1", ["gpu"], {"include_group": b(True)}
    )
    assert "still finishing the operation on gpu (0000:a2:00.0)" in text and "call again" in text
    assert device(clients.root, "gpu")["state"] == "host"  # reads are served meanwhile
    vfiod.manager.recovering = {}
    ok(attach(clients.root, "vm1", "gpu", include_group=b(True)))


def test_every_contract_error_is_covered_here() -> None:
    text = Path(__file__).read_text(encoding="utf-8")
    missing = [e.name for e in ALL_ERRORS if f'"{e.name}"' not in text]
    assert missing == []


def test_shutting_down_refuses_new_calls(start_vfiod: StartVfiod, clients: Clients) -> None:
    vfiod = start_vfiod()
    vfiod.service.accepting = False
    reply = clients.root.m("ListDevices", "a{sv}", {})
    assert reply.error == "org.hypeman.Devices1.Error.Failed" and "shutting down" in reply.text
    reply = clients.root.call("Introspect", "", [], interface="org.freedesktop.DBus.Introspectable")
    assert reply.error == "org.hypeman.Devices1.Error.Failed"
    vfiod.service.accepting = True
    no_reply = clients.root.m("ListDevices", "a{sv}", {}, flags=MessageFlag.NONE)
    assert no_reply.ok


def test_set_virtual_functions(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> None:
    """qemu-q35's NVMe PF 00:09.0 (2 VFs): enable, a VF registered and attached like any device, refusals
    while it is attached, and a disable once it is detached."""
    start_vfiod(profile="qemu-q35")
    root, alice = clients.root, clients.alice
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    pf, vf1, vf2 = "0000:00:09.0", "0000:00:09.1", "0000:00:09.2"
    assert ok(root.m("SetVirtualFunctions", "sua{sv}", pf, 2, {})) == [vf1, vf2]
    listed = {d["pci_address"]: d for d in ok(root.m("ListAvailable", "a{sv}", {"all": b(True)}))}
    assert listed[pf]["virtfns"] == [vf1, vf2] and listed[pf]["sriov_numvfs"] == 2
    assert listed[vf2]["physfn"] == pf and listed[vf2]["current_driver"] == ""
    register(root, pf, "nvme-pf")
    register(root, vf2, "vf2")
    ok(attach(alice, "vm1", "vf2"))
    refused = root.m("SetVirtualFunctions", "sua{sv}", "nvme-pf", 1, {})
    assert refused.short == "InUse" and "is attached to instance 'vm1'" in refused.text
    assert alice.m("SetVirtualFunctions", "sua{sv}", pf, 0, {}).short == "NotAuthorized"
    too_many = root.m("SetVirtualFunctions", "sua{sv}", pf, 3, {})
    assert too_many.short == "InvalidArgument" and "at most 2" in too_many.text
    bad = root.m("SetVirtualFunctions", "sua{sv}", pf, 2, {"autoprobe": Variant("s", "yes")})
    assert bad.short == "InvalidArgument"
    ok(detach(alice, "vm1"))
    assert ok(root.m("SetVirtualFunctions", "sua{sv}", "nvme-pf", 0, {})) == []
    assert device(root, "vf2")["state"] == "missing"


def test_list_profiles_and_vgpus(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> None:
    """mdev-samples: the sample types as Profile records, an mdev made behind vfiod's back as an unmanaged
    VGPU record with the contract's types, and the options checked."""
    running = start_vfiod(profile="mdev-samples")
    polkit.allow(ACTION_INSPECT)
    alice = clients.alice
    profiles = {p["type_id"]: p for p in ok(alice.m("ListProfiles", "a{sv}", {}))}
    assert profiles["mtty-2"] == {
        "name": "Dual port serial",
        "type_id": "mtty-2",
        "framework": "mdev",
        "framebuffer_mb": 0,
        "description": "",
        "device_api": "vfio-pci",
        "available": 12,
        "parents": ["mtty"],
    }
    only = ok(alice.m("ListProfiles", "a{sv}", {"parent": Variant("s", "mbochs")}))
    assert {p["type_id"] for p in only} == {"mbochs-small", "mbochs-medium", "mbochs-large"}
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    running.manager.host.create_mdev("mtty", "mtty-1", uuid)
    (vgpu,) = ok(alice.m("ListVGPUs", "a{sv}", {}))
    assert (vgpu["uuid"], vgpu["managed"], vgpu["owner_uid"], vgpu["id"]) == (uuid, False, 4294967295, "")
    reply = alice.m("ListVGPUs", "a{sv}", {"instance": Variant("s", "bad instance")})
    assert reply.short == "InvalidArgument"
    assert alice.m("ListProfiles", "a{sv}", {"parent": Variant("u", 1)}).short == "InvalidArgument"


def test_attach_vgpu_and_detach(start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock) -> None:
    """mdev-samples through the bus: AttachVGPU's Attachment record with the QEMU and cloud-hypervisor
    forms, the vGPU as a Device record of type vgpu, its contract errors, and Detach removing it."""
    running = start_vfiod(profile="mdev-samples")
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH)
    alice = clients.alice
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    att, warnings = ok(alice.m("AttachVGPU", "ssa{sv}", "vm1", "mtty-2", {"uuid": Variant("s", uuid)}))
    path = f"/sys/bus/mdev/devices/{uuid}/"
    assert att["device_config"] == {"path": path, "sysfsdev": path.rstrip("/"), "uuid": uuid}
    assert att["pci_address"] == "" and att["vfio_group_path"].startswith("/dev/vfio/")
    assert isinstance(warnings, list)
    rec = device(alice, att["id"])
    assert (rec["type"], rec["pci_address"], rec["sysfs_path"], rec["attached_to"]) == (
        "vgpu",
        "",
        path,
        "vm1",
    )
    assert rec["owner_uid"] == alice.uid and rec["state"] == "attached"
    assert att["id"] in {d["id"] for d in devices(alice)}
    managed = ok(clients.root.call("GetManagedObjects", "", [], interface=OBJECT_MANAGER_IFACE))
    assert rec["object_path"] in managed  # a vGPU is a Device object too
    state = clients.root.call(
        "Get", "ss", [DEVICE_IFACE, "State"], path=rec["object_path"], interface=PROPERTIES_IFACE
    )
    assert ok(state) == "attached"
    assert alice.m("AttachVGPU", "ssa{sv}", "vm2", "no-such", {}).short == "ProfileNotFound"
    for n in range(4):
        ok(alice.m("AttachVGPU", "ssa{sv}", f"big{n}", "mbochs-large", {}))
    full = alice.m("AttachVGPU", "ssa{sv}", "big9", "mbochs-large", {})
    assert full.short == "NoCapacity" and "on mbochs: none left" in full.text
    refused = alice.m("Attach", "sasa{sv}", "vm1", [att["id"]], {})
    assert refused.short == "InvalidArgument" and "is a vGPU" in refused.text
    ok(detach(alice, "vm1", rec["name"]))
    assert running.manager.host.list_dir(running.manager.host.mdev_devices_dir).count(uuid) == 0
    assert alice.m("GetDevice", "sa{sv}", att["id"], {}).short == "NotFound"


def test_vendor_vgpu_attach_and_recover_of_the_gpu(
    start_vfiod: StartVfiod, clients: Clients, polkit: PolkitMock
) -> None:
    """l40s-vgpu through the bus: AttachVGPU on NVIDIA's vendor-specific VFIO (the VF's address and path,
    QEMU's sysfsdev and the uuid for -uuid), Recover of its physical GPU refused while it is attached, then
    an SR-IOV cycle once it is detached."""
    running = start_vfiod(profile="l40s-vgpu")
    polkit.allow(ACTION_INSPECT, ACTION_ATTACH, ACTION_ADMIN)
    alice = clients.alice
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    att, _ = ok(alice.m("AttachVGPU", "ssa{sv}", "vm1", "NVIDIA L40S-4Q", {"uuid": Variant("s", uuid)}))
    vf = att["pci_address"]
    path = f"/sys/bus/pci/devices/{vf}/"
    assert att["device_config"] == {"path": path, "sysfsdev": path.rstrip("/"), "uuid": uuid}
    (vgpu,) = ok(alice.m("ListVGPUs", "a{sv}", {}))
    assert (vgpu["framework"], vgpu["type_id"], vgpu["parent"], vgpu["uuid"]) == (
        "vendor-vfio",
        "1155",
        vf,
        uuid,
    )
    gpu = vgpu["physical_gpu"]
    refused = alice.m("Recover", "sa{sv}", gpu, {})
    assert refused.short == "InUse" and "vm1" in refused.text
    ok(detach(alice, "vm1"))
    report = ok(alice.m("Recover", "sa{sv}", gpu, {}))
    assert (report["recovered"], report["vfs_cycled"]) == (1, 32)
    assert running.manager.host.attr(PciAddress.parse(gpu), "sriov_numvfs") == "32"
    assert alice.m("Recover", "sa{sv}", "0000:ff:00.0", {}).short == "NotFound"


def test_unbind_of_a_device_bound_to_vfio_at_boot(start_vfiod: StartVfiod, clients: Clients) -> None:
    """The L4 on vfio-pci before vfiod saw it (here by hand, as vfio-pci.ids= would at boot): Unbind answers
    NativeIsVfio, nothing written, still on vfio-pci."""
    vfiod = start_vfiod()
    kernel, sysfs = vfiod.kernel, vfiod.daemon.simulation.host.from_logical  # type: ignore[union-attr]
    gpu = "0000:a2:00.0"
    vfiod.daemon.simulation.units.stop("nvidia-persistenced.service")  # type: ignore[union-attr]
    kernel.write_attribute(sysfs(f"/sys/bus/pci/devices/{gpu}/driver_override"), b"vfio-pci")
    kernel.write_attribute(sysfs("/sys/bus/pci/drivers/nvidia/unbind"), gpu.encode())
    kernel.write_attribute(sysfs("/sys/bus/pci/drivers_probe"), gpu.encode())
    register(clients.root, gpu, "l4")
    text = expect(clients.root, "NativeIsVfio", "Unbind", "sa{sv}", "l4", {})
    assert "has nothing to return it to" in text
    assert device(clients.root, "l4")["driver"] == "vfio-pci"
