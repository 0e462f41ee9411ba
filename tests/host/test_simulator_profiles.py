"""Profiles, the built tree, processes, reboot, crash recovery, other processes sharing one simulated
kernel, and the `python -m vfiod_sim` tool."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from tests.conftest import SimFactory, SimHost
from tests.machines import IGPU, L4, L4_AUDIO, NVIDIA, VFIO
from vfiod.core.hostcritical import host_critical
from vfiod.host import procfs
from vfiod.host.errors import ProcUnreadable
from vfiod.host.host import Host, HostRoots
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod_sim import SimulatedKernel, build, get_profile, processes, render, state, tree
from vfiod_sim.__main__ import main as tool
from vfiod_sim.model import DeviceSpec, Profile
from vfiod_sim.simulation import Simulation

L4_GROUP = 7

PROFILES = ["workstation-l4", "dgx-h100", "no-iommu", "qemu-q35", "synthetic:5"]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_builds_as_declared(sim: SimFactory, name: str) -> None:
    sh = sim(name)
    prof = sh.kernel.profile
    booted = [d for d in prof.devices if d.physfn is None]  # SR-IOV VFs wait for sriov_numvfs
    assert sh.host.pci_addresses() == sorted(PciAddress.parse(d.address) for d in booted)
    for d in booted:
        addr = PciAddress.parse(d.address)
        assert sh.host.driver(addr) == d.driver, addr  # the boot probe agrees with the profile
        assert sh.host.iommu_group(addr) == (d.iommu_group if prof.iommu else None)
        assert read_function(sh.host, addr).vendor == f"{d.vendor:04x}"
        with open(sh.host.device_dir(addr) / "config", "rb") as f:
            assert (f.read(0x10)[0x0E] & 0x7F) == d.header_type
    groups = {
        g: members
        for g, members in prof.groups().items()
        if any(m in {d.address for d in booted} for m in members)
    }
    assert {g: [str(a) for a in sh.host.group_members(g)] for g in sh.host.iommu_groups()} == groups
    assert procfs.cmdline(sh.host) == prof.cmdline
    assert len(sh.host.boot_id()) == 36
    # every link in the tree is relative and resolves inside it (or is a /proc logical path)
    for dirpath, dirnames, filenames in os.walk(sh.root):
        for name_ in dirnames + filenames:
            path = Path(dirpath) / name_
            if path.is_symlink() and "/proc/" not in str(path):
                target = os.readlink(path)
                assert not target.startswith("/"), path
                assert path.resolve().is_relative_to(sh.root.resolve()), path


def test_profiles_round_trip_through_json() -> None:
    for name in [*PROFILES, "mdev-samples", "a40-mdev", "l40s-vgpu"]:
        prof = get_profile(name)
        assert Profile.from_json(prof.to_json()) == prof
    with pytest.raises(KeyError):
        get_profile("no-such-profile")
    with pytest.raises(KeyError):
        get_profile("synthetic:0")


def test_a_profile_file_names_what_is_wrong_with_it() -> None:
    data = json.loads(get_profile("workstation-l4").to_json())
    # the layout: hex strings for ids and classes, "*" for PCI_ANY_ID, etc files as an object
    gpu = next(d for d in data["devices"] if d["address"] == L4)
    assert (gpu["vendor"], gpu["class"], gpu["revision"]) == ("10de", "030200", "a1")
    vfio = next(d for d in data["drivers"] if d["name"] == "vfio-pci")
    assert vfio["id_table"] == [
        {
            "vendor": "*",
            "device": "*",
            "subvendor": "*",
            "subdevice": "*",
            "class": "000000",
            "class_mask": "000000",
            "override_only": True,
        }
    ]
    bad_key = {**data, "devices": [{**gpu, "iommu_gruop": 7}]}
    with pytest.raises(ValueError, match=r"devices\.0\.iommu_gruop"):
        Profile.from_dict(bad_key)
    bad_id = {**data, "devices": [{**gpu, "vendor": "nvidia"}]}
    with pytest.raises(ValueError, match=r"devices\.0\.vendor"):
        Profile.from_dict(bad_id)
    with pytest.raises(ValueError, match="a profile is a JSON object"):
        Profile.from_json("[]")


def test_built_from_json_data(tmp_path: Path) -> None:
    text = get_profile("qemu-q35").to_json()
    kernel = build(tmp_path / "r", Profile.from_json(text))
    assert kernel.profile.name == "qemu-q35"
    with pytest.raises(FileExistsError):
        build(tmp_path / "r", "qemu-q35")  # never over an existing tree


def test_workstation_details(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    h, root = sh.host, sh.root
    assert h.attr(L4, "reset_method") == "flr bus" and h.attr(L4, "numa_node") == "0"
    assert h.attr(IGPU, "boot_vga") == "1" and h.attr(L4, "boot_vga") is None  # 0302 is no VGA
    assert h.driver_module(PciAddress.parse("0000:00:01.0")) is None  # pcieport is built in
    assert h.driver_module(L4) == "nvidia"
    info = h.read_text(root / "proc/driver/nvidia/gpus" / L4 / "information") or ""
    assert "Device Minor: \t 0" in info and f"Bus Location: \t {L4}" in info and "Model:" in info
    assert h.list_dir(h.device_dir(IGPU) / "drm") == ["card0", "renderD128"]
    assert os.readlink(root / f"dev/dri/by-path/pci-{IGPU}-card") == "../card0"
    assert (root / "sys/class/net/eno1").resolve().parent.parent.name == "0000:00:1f.6"
    assert h.read_text(root / "sys/class/block/nvme0n1p2/dev") == "259:2"
    assert (root / "sys/dev/block/259:2").resolve() == (root / "sys/class/block/nvme0n1p2").resolve()
    assert "259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2" in (
        h.read_text(root / "proc/self/mountinfo") or ""
    )
    route = (h.read_text(root / "proc/net/route") or "").splitlines()
    assert route[0].startswith("Iface\tDestination") and route[1].split()[:2] == ["eno1", "00000000"]
    assert int(h.read_text(root / "sys/class/iommu/dmar0/intel-iommu/ecap") or "0", 16) & 0x8
    assert h.read_text(root / f"sys/kernel/iommu_groups/{L4_GROUP}/type") == "identity"  # iommu=pt
    assert h.read_text(root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0"
    assert (root / "dev/vfio/vfio").exists() and (root / "dev/nvidiactl").exists()
    assert not (root / "dev/vfio/devices").exists() and not (root / "dev/iommu").exists()
    # the boot processes
    persistenced = procfs.process_info(h, 900)
    assert persistenced.comm == "nvidia-persiste" and persistenced.exe == "/usr/bin/nvidia-persistenced"
    assert persistenced.cgroup == "0::/system.slice/nvidia-persistenced.service"
    assert sorted(procfs.fd_targets(h, 900)) == ["/dev/null"] * 3 + ["/dev/nvidia0", "/dev/nvidiactl"]
    assert [(i.pid, p) for i, p in procfs.iter_holders(h, {"/dev/dri/card0"})] == [(1500, "/dev/dri/card0")]


def test_dgx_details(sim: SimFactory) -> None:
    sh = sim("dgx-h100")
    h = sh.host
    gpus = [a for a in h.pci_addresses() if read_function(h, a).device == "2330"]
    switches = [a for a in h.pci_addresses() if read_function(h, a).device == "22a3"]
    assert len(gpus) == 8 and len(switches) == 4
    assert len({h.iommu_group(a) for a in gpus + switches}) == 12
    assert [h.attr(a, "numa_node") for a in gpus] == ["0"] * 4 + ["1"] * 4
    assert sorted(h.list_dir(sh.root / "proc/driver/nvidia/gpus")) == [str(a) for a in gpus]
    assert all(h.driver(a) == "nvidia" for a in switches)
    assert sorted(n for n in h.list_dir(sh.root / "dev") if n.startswith("nvidia-nvswitch")) == [
        f"nvidia-nvswitch{i}" for i in range(4)
    ]
    held = sorted(t for t in procfs.fd_targets(h, 900) if t.startswith("/dev/nvidia") and t[11:].isdigit())
    assert held == sorted(f"/dev/nvidia{i}" for i in range(8))
    vga = PciAddress.parse("0000:03:00.0")
    assert h.group_members(h.iommu_group(vga) or -1) == [PciAddress.parse("0000:02:00.0"), vga]
    assert h.read_text(sh.root / "sys/devices/system/node/online") == "0-1"
    nets = h.list_dir(sh.root / "sys/class/net")
    assert len(nets) == 8 and "ens6f0np0" in nets


def test_no_iommu_and_qemu_details(sim: SimFactory) -> None:
    sh = sim("no-iommu")
    assert sh.host.iommu_groups() == [] and not (sh.root / "sys/class/iommu/dmar0").exists()
    assert "intel_iommu" not in procfs.cmdline(sh.host)
    q = sim("qemu-q35")
    assert q.host.group_members(12) == [
        PciAddress.parse(a) for a in ("0000:01:00.0", "0000:02:01.0", "0000:02:02.0")
    ]
    assert q.host.group_members(1) == [PciAddress.parse("0000:00:02.0"), PciAddress.parse("0000:00:02.1")]
    tags = {
        q.host.read_text(q.root / "sys/bus/virtio/devices" / v / "mount_tag")
        for v in q.host.list_dir(q.root / "sys/bus/virtio/devices")
    }
    assert tags == {"hostroot\x00", "out\x00", None}
    assert q.host.attr(PciAddress.parse("0000:00:03.0"), "class") == "0x038000"


# What the real-kernel suite's guest (tests/e2e, Debian's 6.1 kernel) shows: every function's group.
Q35_GROUPS = {
    "0000:00:00.0": 0,
    "0000:00:02.0": 1,
    "0000:00:02.1": 1,
    "0000:00:03.0": 2,
    "0000:00:04.0": 3,
    "0000:00:05.0": 4,
    "0000:00:06.0": 5,
    "0000:00:07.0": 6,
    "0000:00:08.0": 7,
    "0000:00:09.0": 8,  # the SR-IOV NVMe; its VFs get 13 and 14 when enabled
    "0000:00:10.0": 9,
    "0000:00:11.0": 10,
    "0000:00:1f.0": 11,
    "0000:00:1f.2": 11,
    "0000:00:1f.3": 11,
    "0000:01:00.0": 12,
    "0000:02:01.0": 12,
    "0000:02:02.0": 12,
}


def test_qemu_q35_is_the_e2e_guest(sim: SimFactory) -> None:
    q = sim("qemu-q35")
    h, root = q.host, q.root
    assert {str(a): h.iommu_group(a) for a in h.pci_addresses()} == Q35_GROUPS
    # the NVMe disk: ext4 on the whole namespace (no partition), mounted on /mnt/data
    nvme = PciAddress.parse("0000:00:08.0")
    assert h.driver(nvme) == "nvme" and h.driver_module(nvme) == "nvme"
    assert read_function(h, nvme).class_code == "010802" and read_function(h, nvme).device == "0010"
    assert h.list_dir(root / "sys/class/block") == ["nvme0n1"]
    mountinfo = h.read_text(root / "proc/self/mountinfo") or ""
    assert f"{h.read_text(root / 'sys/class/block/nvme0n1/dev')} / /mnt/data rw,relatime" in mountinfo
    assert " - 9p hostroot " in mountinfo
    crit = host_critical(h)
    assert crit[nvme] == "backs /mnt/data (ext4 on /dev/nvme0n1)"
    assert crit[PciAddress.parse("0000:00:10.0")] == 'backs /mnt/hostroot (9p share "hostroot")'
    # vfio-pci is not loaded at boot: no /dev/vfio/vfio until it is
    assert not h.module_loaded("vfio_pci") and not h.module_loaded("vfio")
    assert h.list_dir(root / "dev/vfio") == []
    q.kernel.load_module("vfio_pci")
    assert h.module_loaded("vfio_pci") and (root / "dev/vfio/vfio").exists()


def _vtconsoles(sh: SimHost) -> dict[str, tuple[str | None, str | None]]:
    vt = sh.root / "sys/class/vtconsole"
    return {
        n: (sh.host.read_text(vt / n / "name"), sh.host.read_text(vt / n / "bind"))
        for n in sh.host.list_dir(vt)
    }


def test_qemu_q35_vtconsoles_after_vgacon(sim: SimFactory) -> None:
    """vgacon was the boot console: dummycon ("(M)") replaced it, fbcon took its slot, vtcon0. Neither
    is a system driver, so a bind does nothing and an unbind hands the consoles to the other."""
    q = sim("qemu-q35")
    fb, dummy = "(M) frame buffer device", "(M) dummy device"
    assert _vtconsoles(q) == {"vtcon0": (fb, "1"), "vtcon1": (dummy, "0")}
    write = q.kernel.write_attribute
    vt = q.root / "sys/class/vtconsole"
    write(vt / "vtcon0/bind", b"0\n")
    assert _vtconsoles(q) == {"vtcon0": (fb, "0"), "vtcon1": (dummy, "1")}
    write(vt / "vtcon0/bind", b"1\n")  # vt_bind: no "(S)" driver to take the consoles from
    assert _vtconsoles(q) == {"vtcon0": (fb, "0"), "vtcon1": (dummy, "1")}
    write(vt / "vtcon1/bind", b"0\n")  # the dummy driver hands them back to fbcon
    assert _vtconsoles(q) == {"vtcon0": (fb, "1"), "vtcon1": (dummy, "0")}
    write(vt / "vtcon1/bind", b"1\n")
    assert _vtconsoles(q) == {"vtcon0": (fb, "1"), "vtcon1": (dummy, "0")}


def test_uefi_vtconsoles_keep_the_system_dummy_driver(sim: SimFactory) -> None:
    sh = sim("workstation-l4", idle=True)
    fb, dummy = "(M) frame buffer device", "(S) dummy device"
    assert _vtconsoles(sh) == {"vtcon0": (dummy, "0"), "vtcon1": (fb, "1")}
    vt = sh.root / "sys/class/vtconsole"
    sh.kernel.write_attribute(vt / "vtcon0/bind", b"1\n")  # a system driver cannot be (un)bound
    sh.kernel.write_attribute(vt / "vtcon0/bind", b"0\n")
    assert _vtconsoles(sh) == {"vtcon0": (dummy, "0"), "vtcon1": (fb, "1")}
    sh.kernel.write_attribute(vt / "vtcon1/bind", b"0\n")
    assert _vtconsoles(sh) == {"vtcon0": (dummy, "1"), "vtcon1": (fb, "0")}
    sh.kernel.write_attribute(vt / "vtcon1/bind", b"1\n")
    assert _vtconsoles(sh) == {"vtcon0": (dummy, "0"), "vtcon1": (fb, "1")}


def test_vtconsoles_must_be_fbcon_and_dummy() -> None:
    prof = get_profile("qemu-q35")
    assert Profile.from_json(prof.to_json()).vtconsoles == ("(M) frame buffer device", "(M) dummy device")
    data = prof.to_dict()
    del data["vtconsoles"]  # a profile written before the field: the UEFI layout
    assert Profile.from_dict(data).vtconsoles == ("(S) dummy device", "(M) frame buffer device")
    for bad in (
        ["(M) frame buffer device"],
        ["(M) frame buffer device", "(M) frame buffer device"],
        ["(S) frame buffer device", "(M) dummy device"],
        ["(S) VGA+", "(M) frame buffer device"],
    ):
        with pytest.raises(ValueError):
            Profile.from_dict({**data, "vtconsoles": bad}).validate()


def test_synthetic_shape() -> None:
    prof = get_profile("synthetic:7")
    assert len(prof.devices) == 7 and len(prof.groups()) == 4
    assert [d.driver for d in prof.devices if d.iommu_group == 0] == ["nvidia", "snd_hda_intel"]


# ----- processes ----------------------------------------------------------------------------------------


def test_processes(sim: SimFactory) -> None:
    sh = sim()
    pid = processes.add_process(
        sh.root,
        exe="/usr/bin/qemu-system-x86_64",
        uid=1000,
        fds=["/dev/vfio/7", "/dev/dri/renderD128"],
        cgroup_unit="vm-1.scope",
        memlock=(1 << 30, None),
        args=["qemu-system-x86_64", "-m", "4G"],
    )
    h = sh.host
    info = procfs.process_info(h, pid)
    assert (info.uid, info.comm, info.exe) == (1000, "qemu-system-x86", "/usr/bin/qemu-system-x86_64")
    assert info.cgroup == "0::/user.slice/user-1000.slice/vm-1.scope"
    assert (sh.root / f"proc/{pid}/cmdline").read_bytes() == b"qemu-system-x86_64\0-m\0004G\0"
    assert procfs.memlock_limit(h, pid) == (1 << 30, None)
    assert procfs.memlock_limit(h, 900) == (8388608, 8388608)
    limits = (sh.root / "proc/900/limits").read_text().splitlines()
    assert limits[0].split() == ["Limit", "Soft", "Limit", "Hard", "Limit", "Units"]
    assert "/dev/vfio/7" in procfs.fd_targets(h, pid)
    processes.set_fd_unreadable(sh.root, pid)
    with pytest.raises(ProcUnreadable):
        procfs.fd_targets(h, pid)
    # the kernel still knows what it holds
    assert processes.holders(sh.root, ["/dev/vfio/7"]) == [(pid, "/dev/vfio/7")]
    processes.remove_process(sh.root, pid)
    assert pid not in procfs.pids(h) and processes.holders(sh.root, ["/dev/vfio/7"]) == []
    # units: stop and start the persistence daemon as systemd would
    assert processes.stop_unit(sh.root, "nvidia-persistenced.service") == [900]
    assert not processes.unit_active(sh.root, "nvidia-persistenced.service")
    assert processes.start_unit(sh.root, "nvidia-persistenced.service") == [900]
    assert "/dev/nvidia0" in procfs.fd_targets(h, 900)


def test_nvidia_unbind_can_wait_for_users(tmp_path: Path) -> None:
    prof = Profile.from_dict(
        {**get_profile("workstation-l4").to_dict(), "nvidia_remove_waits_for_users": True}
    )
    kernel = build(tmp_path / "r", prof)
    host = Host(HostRoots.under(tmp_path / "r"), backend=kernel)
    stopped: list[int] = []

    import threading

    t = threading.Thread(target=lambda: host.unbind(L4, NVIDIA), daemon=True)
    t.start()
    assert kernel.wait_blocked(L4, 2.0)  # nvidia-persistenced holds /dev/nvidia0
    stopped += processes.stop_unit(tmp_path / "r", "nvidia-persistenced.service")
    t.join(2.0)
    assert stopped == [900] and host.driver(L4) is None


# ----- reboot, recovery, other processes ----------------------------------------------------------------


def test_reboot_resets_to_the_boot_state(sim: SimFactory) -> None:
    sh = sim(idle=True)
    h = sh.host
    boot_id = h.boot_id()
    for addr in (L4, L4_AUDIO):
        h.set_driver_override(addr, VFIO)
        h.unbind(addr, h.driver(addr) or NVIDIA)
        h.probe(addr)
    pid = processes.add_process(sh.root, exe="/usr/bin/qemu", fds=[f"/dev/vfio/{L4_GROUP}"])
    nic = PciAddress.parse("0000:00:1f.6")
    sh.kernel.write_attribute(h.device_dir(nic) / "remove", b"1")
    sh.kernel.unload_module("snd_hda_intel")
    sh.kernel.replace_card(IGPU, vendor="8086", device="56a0")  # physical: survives the reboot
    sh.kernel.reboot()
    assert h.boot_id() != boot_id and len(h.boot_id()) == 36
    assert h.driver(L4) == "nvidia" and h.driver(L4_AUDIO) == "snd_hda_intel"
    assert h.driver_override(L4) is None
    assert not h.vfio_group_node(L4_GROUP).exists()
    assert pid not in procfs.pids(h) and 900 in procfs.pids(h) and "/dev/nvidia0" in procfs.fd_targets(h, 900)
    assert h.driver(nic) == "e1000e"
    assert read_function(h, IGPU).device == "56a0"


def test_interrupted_update_is_repaired_by_the_next_locker(
    sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sh = sim(idle=True)
    sh.host.set_driver_override(L4, VFIO)
    real_remove = tree._remove_path
    calls = 0

    def dies_on_the_fourth_removal(path: str, kind: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # the process dies with the tree half updated
        real_remove(path, kind)

    monkeypatch.setattr(tree, "_remove_path", dies_on_the_fourth_removal)
    with pytest.raises(KeyboardInterrupt):
        sh.kernel.write_attribute(sh.host.pci_drivers_dir / "nvidia/unbind", str(L4).encode())
    monkeypatch.setattr(tree, "_remove_path", real_remove)
    assert sh.host.driver(L4) == "nvidia"  # the driver link was not reached yet
    fresh = SimulatedKernel(sh.root)  # another process opening the same root
    st = fresh.state()  # taking the lock finishes the update
    assert st.devices[L4].driver is None and sh.host.driver(L4) is None
    assert not (sh.root / "dev/nvidia0").exists()
    # the tree is exactly what the state says
    keys = sorted(state.all_keys(fresh.topology))
    rendered = render.Renderer(fresh.topology, st).render(keys)
    for rel, entry in rendered.items():
        assert tree._matches_disk(str(sh.root / rel), entry), rel


def _child_binds(root: str) -> None:
    kernel = SimulatedKernel(Path(root))
    host = Host(HostRoots.under(Path(root)), backend=kernel)
    host.set_driver_override(L4_AUDIO, VFIO)
    host.unbind(L4_AUDIO, DriverName.parse("snd_hda_intel"))
    host.probe(L4_AUDIO)


def test_another_process_sees_the_same_kernel(sim: SimFactory) -> None:
    sh = sim(idle=True)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_binds, args=(str(sh.root),))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    assert sh.host.driver(L4_AUDIO) == "vfio-pci"
    assert sh.kernel.state().devices[L4_AUDIO].driver == "vfio-pci"
    assert {t["pid"] for t in sh.kernel.trace()} == {child.pid}
    assert [e["action"] for e in sh.kernel.uevents() if e["subsystem"] == "pci"] == ["unbind", "bind"]


# ----- the tool -----------------------------------------------------------------------------------------


def test_tool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sim"
    assert tool(["build", "workstation-l4", str(root)]) == 0
    # nvidia's remove waits for every user of /dev/nvidia0, as on a real host: stop the persistence daemon
    processes.stop_unit(root, "nvidia-persistenced.service")
    assert tool(["bind", str(root), str(L4), "nvidia"]) == 1  # EBUSY: already bound
    assert "EBUSY" in capsys.readouterr().err
    assert tool(["unbind", str(root), str(L4), "nvidia"]) == 0
    assert tool(["write", str(root), f"/sys/bus/pci/devices/{L4}/driver_override", "vfio-pci"]) == 0
    assert tool(["bind", str(root), str(L4), "vfio-pci"]) == 0
    assert SimulatedKernel(root).driver_of(L4) == "vfio-pci"
    capsys.readouterr()
    assert (
        tool(["process", "add", str(root), "--exe", "/usr/bin/qemu", "--uid", "1000", "--fd", "/dev/vfio/7"])
        == 0
    )
    pid = int(capsys.readouterr().out)
    assert processes.holders(root, ["/dev/vfio/7"]) == [(pid, "/dev/vfio/7")]
    assert tool(["fault", "inject", str(root), "f", "--kind", "errno", "--path", "/sys/bus/pci/rescan"]) == 0
    assert tool(["write", str(root), "/sys/bus/pci/rescan", "1"]) == 1
    assert tool(["fault", "clear", str(root), "f"]) == 0
    assert tool(["write", str(root), "/sys/bus/pci/rescan", "1"]) == 0
    assert tool(["build", "nope", str(tmp_path / "other")]) == 2
    assert tool(["reboot", str(root)]) == 0
    assert SimulatedKernel(root).driver_of(L4) == "nvidia"


def test_a_device_in_a_domain_above_ffff(tmp_path: Path) -> None:
    """Intel VMD's domain 10000 as the kernel names it: the device, its group and its bus directory."""
    base = get_profile("qemu-q35")
    vmd_nvme = DeviceSpec(
        "10000:e1:00.0", 0x144D, 0xA80A, 0x144D, 0xA801, 0x010802, driver="nvme", iommu_group=20
    )
    profile = dataclasses.replace(base, name="q35-vmd", devices=(*base.devices, vmd_nvme))
    sim_root = tmp_path / "sim"
    sim = Simulation.open(sim_root, profile)
    addr = PciAddress.parse("10000:e1:00.0")
    assert addr in sim.host.pci_addresses() and sim.host.group_members(20) == [addr]
    assert sim.host.driver(addr) == "nvme"
    assert (sim_root / "sys/devices/pci10000:e1/10000:e1:00.0").is_dir()
