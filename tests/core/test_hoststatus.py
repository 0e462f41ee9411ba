"""Tests for vfiod.core.hoststatus: GetHostStatus keys, problems with their fixes, GPU slot accounting
(Go flaw 9) and other tools' claims (driverctl, kernel command line, modprobe.d)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.core.support.fake_sys import FakeSys, workstation
from vfiod.core.hoststatus import IOMMU_FIX, host_status
from vfiod.core.pciids import PciIds

if TYPE_CHECKING:
    from tests.conftest import SimFactory

CONTRACT_KEYS = {
    "iommu_enabled",
    "iommu_groups",
    "vfio_pci_loaded",
    "vfio_cdev",
    "iommufd",
    "interrupt_remapping",
    "hugepages_2m",
    "gpu_mode",
    "gpu_slots_total",
    "gpu_slots_used",
    "problems",
}

NO_IDS = PciIds(Path("/nonexistent"), search_paths=())


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path)


def ready_host(fs: FakeSys) -> None:
    """The workstation plus an L4 (GPU + audio), vfio-pci loaded, IR-capable DMAR, huge pages."""
    workstation(fs)
    fs.pci("0000:00:01.0", cls="0x060400", driver="pcieport", group=12, header=1)
    fs.pci("0000:a2:00.0", parent="0000:00:01.0", vendor="10de", device="27b8", cls="0x030200", group=12)
    fs.pci("0000:a2:00.1", parent="0000:00:01.0", vendor="10de", device="22bc", cls="0x040300", group=12)
    fs.pci("0000:c0:00.0", vendor="10de", device="22a3", cls="0x068000", driver="nvidia", group=13)
    fs.module("vfio_pci")
    (fs.sys / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    (fs.dev / "vfio").mkdir()
    (fs.dev / "vfio/vfio").write_text("")
    ecap = fs.sys / "devices/virtual/iommu/dmar0/intel-iommu/ecap"
    ecap.parent.mkdir(parents=True)
    ecap.write_text("f050da\n")  # bit 3 (IR) set
    (fs.sys / "class/iommu").mkdir(parents=True)
    (fs.sys / "class/iommu/dmar0").symlink_to("../../devices/virtual/iommu/dmar0")
    hp = fs.sys / "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    hp.parent.mkdir(parents=True)
    hp.write_text("512\n")
    (fs.proc / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 intel_iommu=on iommu=pt\n")


def test_ready_host(fs: FakeSys) -> None:
    ready_host(fs)
    st = host_status(fs.host(), NO_IDS)
    record = st.to_record()
    assert set(record) >= CONTRACT_KEYS
    assert record["problems"] == []
    assert st.iommu_enabled and st.iommu_groups == 6  # 0-3 workstation, 12 L4, 13 NVSwitch
    assert st.vfio_pci_loaded and st.vfio_container
    assert not st.vfio_cdev and not st.iommufd
    assert st.interrupt_remapping
    assert st.hugepages_2m == 512
    assert st.gpu_mode == "passthrough"
    assert st.claims == ()


def test_gpu_slots_count_display_functions_only(fs: FakeSys) -> None:
    ready_host(fs)
    st = host_status(fs.host(), NO_IDS)
    # The L4 only: not its audio function, not the NVSwitch, not the iGPU the console needs.
    assert st.gpu_slots_total == 1
    assert st.gpu_slots_used == 0
    assert any(n.startswith("0000:00:02.0 (a780) is not counted as a GPU slot") for n in st.notes)


def test_used_slots_are_attached_ones_not_vfio_bound_ones(fs: FakeSys) -> None:
    ready_host(fs)
    fs.bind("0000:a2:00.0", "vfio-pci")
    assert host_status(fs.host(), NO_IDS).gpu_slots_used == 0
    assert host_status(fs.host(), NO_IDS, attached=["0000:A2:00.0"]).gpu_slots_used == 1
    # An attached non-GPU function is not a slot.
    assert host_status(fs.host(), NO_IDS, attached=["0000:a2:00.1"]).gpu_slots_used == 0


def test_no_gpu_means_mode_none(fs: FakeSys) -> None:
    fs.pci("0000:00:1f.6", cls="0x020000", group=1)
    st = host_status(fs.host(), NO_IDS)
    assert (st.gpu_mode, st.gpu_slots_total) == ("none", 0)


def test_iommu_off(fs: FakeSys) -> None:
    fs.pci("0000:01:00.0", vendor="10de", device="27b8", cls="0x030200")
    st = host_status(fs.host(), NO_IDS)
    assert not st.iommu_enabled and st.iommu_groups == 0
    assert f"the IOMMU is off (no IOMMU groups): {IOMMU_FIX}" in st.problems
    assert "intel_iommu=on" in IOMMU_FIX and "AMD-Vi" in IOMMU_FIX and "amd_iommu" not in IOMMU_FIX
    # No usable slot is no slot: the GPU is listed (with its blocker), but nothing can be passed through.
    assert st.gpu_mode == "none" and st.gpu_slots_total == 0


def test_iommu_asked_for_but_off_points_at_firmware(fs: FakeSys) -> None:
    (fs.proc / "cmdline").write_text("root=/dev/sda1 intel_iommu=on\n")
    (problem,) = [p for p in host_status(fs.host(), NO_IDS).problems if "IOMMU is off" in p]
    assert "firmware" in problem


def test_vfio_not_loaded(fs: FakeSys) -> None:
    st = host_status(fs.host(), NO_IDS)
    assert not st.vfio_pci_loaded
    assert (
        "vfio-pci is not loaded: modprobe vfio-pci (vfiod loads it through modprobe@vfio_pci.service)"
        in st.problems
    )


def test_vfio_loaded_without_any_node(fs: FakeSys) -> None:
    ready_host(fs)
    (fs.dev / "vfio/vfio").unlink()
    assert any("/dev/vfio/vfio" in p for p in host_status(fs.host(), NO_IDS).problems)


def test_cdev_and_iommufd(fs: FakeSys) -> None:
    ready_host(fs)
    (fs.dev / "vfio/devices").mkdir()
    (fs.dev / "iommu").write_text("")
    st = host_status(fs.host(), NO_IDS)
    assert st.vfio_cdev and st.iommufd


def test_interrupt_remapping_rules(fs: FakeSys) -> None:
    ready_host(fs)
    ecap = fs.sys / "devices/virtual/iommu/dmar0/intel-iommu/ecap"
    ecap.write_text("f050d2\n")  # bit 3 clear
    st = host_status(fs.host(), NO_IDS)
    assert not st.interrupt_remapping
    assert any(p.startswith("interrupt remapping is not available") for p in st.problems)
    (fs.sys / "class/iommu/ivhd0").mkdir()
    assert host_status(fs.host(), NO_IDS).interrupt_remapping
    (fs.proc / "cmdline").write_text("intremap=off\n")
    assert not host_status(fs.host(), NO_IDS).interrupt_remapping


def test_no_hugepages_is_a_note_not_a_problem(fs: FakeSys) -> None:
    ready_host(fs)
    (fs.sys / "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").write_text("0\n")
    st = host_status(fs.host(), NO_IDS)
    assert st.hugepages_2m == 0
    assert st.problems == ()
    assert any("huge pages" in n for n in st.notes)


def test_claims(fs: FakeSys) -> None:
    ready_host(fs)
    fs.pci("0000:b3:00.0", vendor="10de", device="27b8", cls="0x030200", group=20, driver="vfio-pci")
    (fs.etc / "driverctl.d").mkdir()
    (fs.etc / "driverctl.d/pci-0000:b3:00.0").write_text("vfio-pci\n")
    (fs.etc / "driverctl.d/pci-0000:ee:00.0").write_text("nvidia\n")  # not present
    (fs.etc / "driverctl.d/README").write_text("ignored\n")
    (fs.proc / "cmdline").write_text("root=/dev/nvme0n1p2 intel_iommu=on vfio-pci.ids=10de:27b8,10de:22bc\n")
    md = fs.etc / "modprobe.d"
    md.mkdir()
    (md / "vfio.conf").write_text(
        "# GPUs for VMs\n"
        "options vfio_pci ids=10de:27b8 \\\n"
        "  disable_vga=1\n"
        "softdep nvidia pre: vfio-pci\n"
        "options vfio-pci disable_idle_d3=1\n"
    )
    (md / "blacklist.conf").write_text(
        "blacklist nouveau\nblacklist pcspkr\noptions snd_hda_intel power_save=1\n"
    )
    (md / "no-vfio.conf").write_text("install vfio_pci /bin/false\n")
    (md / "ignored.bak").write_text("blacklist vfio_pci\n")
    st = host_status(fs.host(), NO_IDS)
    got = {(c.kind, c.source): c for c in st.claims}
    assert list(got) == [
        ("driverctl", "/etc/driverctl.d/pci-0000:b3:00.0"),
        ("driverctl", "/etc/driverctl.d/pci-0000:ee:00.0"),
        ("cmdline-ids", "/proc/cmdline"),
        ("blacklist", "/etc/modprobe.d/blacklist.conf:1"),
        ("install", "/etc/modprobe.d/no-vfio.conf:1"),
        ("modprobe-ids", "/etc/modprobe.d/vfio.conf:2"),
        ("softdep", "/etc/modprobe.d/vfio.conf:4"),
    ]
    assert got["driverctl", "/etc/driverctl.d/pci-0000:b3:00.0"].devices == ("0000:b3:00.0",)
    assert got["driverctl", "/etc/driverctl.d/pci-0000:ee:00.0"].devices == ()
    assert got["cmdline-ids", "/proc/cmdline"].devices == ("0000:a2:00.0", "0000:a2:00.1", "0000:b3:00.0")
    modprobe_ids = got["modprobe-ids", "/etc/modprobe.d/vfio.conf:2"]
    assert modprobe_ids.devices == ("0000:a2:00.0", "0000:b3:00.0")
    assert modprobe_ids.text == "options vfio_pci ids=10de:27b8    disable_vga=1"
    # nouveau is bound to nothing (it is blacklisted) but concerns every NVIDIA display function.
    assert got["blacklist", "/etc/modprobe.d/blacklist.conf:1"].devices == ("0000:a2:00.0", "0000:b3:00.0")
    assert got["softdep", "/etc/modprobe.d/vfio.conf:4"].devices == (
        "0000:a2:00.0",
        "0000:b3:00.0",
        "0000:c0:00.0",
    )
    install = got["install", "/etc/modprobe.d/no-vfio.conf:1"]
    assert install.note in st.problems
    record = st.to_record()
    claims = record["claims"]
    assert isinstance(claims, list) and len(claims) == 7
    assert set(claims[0]) == {"kind", "source", "text", "driver", "devices", "note"}
    for c in st.claims:
        if c is not install:
            assert c.note in st.notes


def test_subsystem_ids_and_any_id_in_ids(fs: FakeSys) -> None:
    fs.pci("0000:01:00.0", vendor="10de", device="27b8", subsystem=("10de", "16ca"), cls="0x030200", group=1)
    fs.pci("0000:02:00.0", vendor="10de", device="27b8", subsystem=("17aa", "0001"), cls="0x030200", group=2)
    (fs.proc / "cmdline").write_text("vfio_pci.ids=10de:27b8:10de:16ca,ffffffff:zzzz,10de\n")
    (claim,) = host_status(fs.host(), NO_IDS).claims
    assert claim.devices == ("0000:01:00.0",)
    (fs.proc / "cmdline").write_text("vfio_pci.ids=10de:27b8:ffffffff:0001\n")
    (claim,) = host_status(fs.host(), NO_IDS).claims
    assert claim.devices == ("0000:02:00.0",)


def test_garbage_config_never_raises(fs: FakeSys) -> None:
    md = fs.etc / "modprobe.d"
    md.mkdir()
    (md / "x.conf").write_bytes(b"\xff\xfe\x00softdep\nblacklist\ninstall\noptions vfio-pci\n\\\n")
    (fs.etc / "driverctl.d").mkdir()
    (fs.etc / "driverctl.d/pci-0000:01:00.0").write_text("")
    (fs.proc / "cmdline").write_text('vfio-pci.ids= "quoted=1 modprobe.blacklist=,,\n')
    host_status(fs.host(), NO_IDS)


# ----- on the simulator --------------------------------------------------------------------------------


def test_simulated_workstation(sim: SimFactory) -> None:
    st = host_status(sim("workstation-l4").host, NO_IDS)
    assert st.iommu_enabled and st.gpu_mode == "passthrough"
    assert st.gpu_slots_total >= 1


def test_simulated_no_iommu(sim: SimFactory) -> None:
    st = host_status(sim("no-iommu").host, NO_IDS)
    assert not st.iommu_enabled
    assert any(IOMMU_FIX in p for p in st.problems)


def test_simulated_dgx_counts_gpus_not_nvswitches(sim: SimFactory) -> None:
    sh = sim("dgx-h100")
    st = host_status(sh.host, NO_IDS)
    from vfiod.core.discovery import discover

    every = discover(sh.host, NO_IDS, all_devices=True)
    gpus = [d for d in every if d.type == "gpu" and not d.host_critical]
    assert st.gpu_slots_total == len(gpus)
    assert all(not d.class_.startswith("03") for d in every if d.class_.startswith("068"))


@pytest.mark.parametrize(
    ("vendor", "fix"),
    [
        ("GenuineIntel", "add intel_iommu=on to the kernel command line, enable VT-d"),
        ("AuthenticAMD", "enable the IOMMU (AMD-Vi) in the firmware setup and reboot"),
        ("", IOMMU_FIX),
    ],
)
def test_iommu_off_fix_follows_the_cpu_vendor(fs: FakeSys, vendor: str, fix: str) -> None:
    """Before, an AMD host was told to add intel_iommu=on; amd_iommu=on is no kernel option at all."""
    fs.pci("0000:01:00.0", vendor="10de", device="27b8", cls="0x030200")
    if vendor:
        (fs.proc / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n")
    (problem,) = [p for p in host_status(fs.host(), NO_IDS).problems if p.startswith("the IOMMU is off")]
    assert fix in problem
    assert ("intel_iommu" in problem) == (vendor != "AuthenticAMD")
