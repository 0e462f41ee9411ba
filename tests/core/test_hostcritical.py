"""Tests for vfiod.core.hostcritical on hand-built sysfs trees laid out like Linux's (`FakeSys`, in
tests/core/support/fake_sys.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.core.support.fake_sys import FakeSys, link, workstation, write
from vfiod.core import hostcritical
from vfiod.core.hostcritical import deepest_pci_function, host_critical
from vfiod.host.pciaddr import PciAddress

if TYPE_CHECKING:
    from tests.conftest import SimFactory


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path)


def test_workstation_storage_route_console(fs: FakeSys) -> None:
    workstation(fs)
    crit = host_critical(fs.host())
    assert set(crit) == {"0000:03:00.0", "0000:00:1f.6", "0000:00:02.0"}
    assert crit[PciAddress.parse("0000:03:00.0")] == (
        "backs / (ext4 on /dev/nvme0n1p2), /boot/efi (vfat on /dev/nvme0n1p1) and swap (/dev/nvme0n1p3)"
    )
    assert crit[PciAddress.parse("0000:00:1f.6")] == "carries the IPv4 and IPv6 default route via eno1"
    assert crit[PciAddress.parse("0000:00:02.0")] == (
        "is the boot VGA with the console bound to it (unbind it: echo 0 > /sys/class/vtconsole/vtcon1/bind)"
    )


def test_bridge_above_disk_is_not_listed(fs: FakeSys) -> None:
    workstation(fs)
    crit = host_critical(fs.host())
    assert "0000:00:1d.0" not in crit
    real = (fs.sys / "class/block/nvme0n1p2").resolve()
    assert deepest_pci_function(fs.host(), real) == "0000:03:00.0"


def test_console_unbound_is_not_critical(fs: FakeSys) -> None:
    workstation(fs)
    (fs.sys / "devices/virtual/vtconsole/vtcon1/bind").write_text("0\n")
    assert "0000:00:02.0" not in host_critical(fs.host())


def test_console_on_non_boot_vga_is_not_critical(fs: FakeSys) -> None:
    workstation(fs)
    (fs.real["0000:00:02.0"] / "boot_vga").write_text("0\n")
    assert "0000:00:02.0" not in host_critical(fs.host())


def test_firmware_framebuffer_console_means_boot_vga(fs: FakeSys) -> None:
    fs.pci("0000:01:00.0", vendor="10de", device="27b8", cls="0x030200", group=1, boot_vga=True)
    efifb = fs.sys / "devices/platform/efi-framebuffer.0"
    efifb.mkdir(parents=True)
    fs.framebuffer(0, efifb)
    fs.vtconsole(1, "(M) frame buffer device", True)
    assert "vtcon1" in host_critical(fs.host())[PciAddress.parse("0000:01:00.0")]


def test_vgacon_text_console_means_boot_vga(fs: FakeSys) -> None:
    fs.pci("0000:00:02.0", cls="0x030000", group=1, boot_vga=True)
    fs.vtconsole(0, "(S) VGA+", True)
    assert "vtcon0" in host_critical(fs.host())[PciAddress.parse("0000:00:02.0")]


def test_lvm_on_luks_on_md_raid(fs: FakeSys) -> None:
    fs.pci("0000:00:17.0", cls="0x010601", driver="ahci", group=4)
    fs.pci("0000:00:1d.0", cls="0x060400", driver="pcieport", group=5, header=1)
    nvme = fs.pci("0000:04:00.0", parent="0000:00:1d.0", cls="0x010802", driver="nvme", group=5)
    ahci = fs.real["0000:00:17.0"]
    fs.disk("sda", "8:0", ahci / "ata1/host0/target0:0:0/0:0:0:0", {"sda1": "8:1"})
    fs.disk("nvme0n1", "259:0", nvme / "nvme/nvme0", {"nvme0n1p1": "259:1"})
    fs.virtual_block("md0", "9:0", ["sda1", "nvme0n1p1"])
    fs.virtual_block("dm-0", "253:0", ["md0"], dm_name="luks-root")
    fs.virtual_block("dm-1", "253:1", ["dm-0"], dm_name="vg-root")
    fs.mount("253:1", "/", "xfs", "/dev/mapper/vg-root")
    crit = host_critical(fs.host())
    assert set(crit) == {"0000:00:17.0", "0000:04:00.0"}
    assert crit[PciAddress.parse("0000:04:00.0")] == "backs / (xfs on /dev/mapper/vg-root)"


def test_partition_of_md_device_walks_to_parent(fs: FakeSys) -> None:
    nvme = fs.pci("0000:05:00.0", cls="0x010802", driver="nvme", group=6)
    fs.disk("nvme1n1", "259:8", nvme / "nvme/nvme1")
    md = fs.virtual_block("md1", "9:1", ["nvme1n1"])
    (md / "md1p1").mkdir()
    (md / "md1p1/partition").write_text("1\n")
    link(fs.sys / "dev/block/259:9", md / "md1p1")
    fs.mount("259:9", "/srv", "ext4", "/dev/md1p1")
    assert set(host_critical(fs.host())) == {"0000:05:00.0"}


def test_btrfs_anonymous_device_uses_source_and_siblings(fs: FakeSys) -> None:
    a = fs.pci("0000:06:00.0", cls="0x010802", driver="nvme", group=7)
    b = fs.pci("0000:07:00.0", cls="0x010802", driver="nvme", group=8)
    fs.disk("nvme2n1", "259:16", a / "nvme/nvme2")
    fs.disk("nvme3n1", "259:24", b / "nvme/nvme3")
    for name in ("nvme2n1", "nvme3n1"):
        link(fs.sys / "fs/btrfs/0f1e/devices" / name, (fs.sys / "class/block" / name).resolve())
    (fs.dev).mkdir(exist_ok=True)
    fs.mount("0:31", "/data", "btrfs", "/dev/nvme2n1")
    crit = host_critical(fs.host())
    assert set(crit) == {"0000:06:00.0", "0000:07:00.0"}
    assert crit[PciAddress.parse("0000:07:00.0")] == "backs /data (btrfs on /dev/nvme2n1)"


def test_nvme_native_multipath(fs: FakeSys) -> None:
    a = fs.pci("0000:08:00.0", cls="0x010802", driver="nvme", group=9)
    ctrl = a / "nvme/nvme4"
    ctrl.mkdir(parents=True)
    subsys = fs.sys / "devices/virtual/nvme-subsystem/nvme-subsys4"
    subsys.mkdir(parents=True)
    link(subsys / "nvme4", ctrl)
    fs.disk("nvme4n1", "259:32", subsys)
    fs.mount("259:32", "/var", "ext4", "/dev/nvme4n1")
    assert set(host_critical(fs.host())) == {"0000:08:00.0"}


def test_bind_mounts_of_one_disk_listed_once_with_shortest_mountpoint(fs: FakeSys) -> None:
    workstation(fs)
    fs.mount("259:2", "/etc/hosts", "ext4", "/dev/nvme0n1p2")
    fs.mount("259:2", "/var/lib/with space", "ext4", "/dev/nvme0n1p2")
    text = host_critical(fs.host())[PciAddress.parse("0000:03:00.0")]
    assert text.count("nvme0n1p2") == 1
    assert "/etc/hosts" not in text


def test_many_mounts_are_summarised(fs: FakeSys) -> None:
    nvme = fs.pci("0000:03:00.0", cls="0x010802", driver="nvme", group=2)
    parts = {f"nvme0n1p{i}": f"259:{i}" for i in range(1, 7)}
    fs.disk("nvme0n1", "259:0", nvme / "nvme/nvme0", parts)
    for i in range(1, 7):
        fs.mount(f"259:{i}", f"/m{i}", "ext4", f"/dev/nvme0n1p{i}")
    text = host_critical(fs.host())[PciAddress.parse("0000:03:00.0")]
    assert text.endswith("and 3 more")


def test_9p_root_share(fs: FakeSys) -> None:
    share = fs.pci("0000:00:10.0", vendor="1af4", device="1009", cls="0x000200", driver="virtio-pci", group=7)
    other = fs.pci(
        "0000:00:11.0", vendor="1af4", device="1009", cls="0x000200", driver="virtio-pci", group=10
    )
    for n, (dev, tag) in enumerate(((share, "hostroot"), (other, "out"))):
        v = dev / f"virtio{n}"
        v.mkdir()
        (v / "mount_tag").write_bytes(tag.encode() + b"\x00")
        link(fs.sys / "bus/virtio/devices" / f"virtio{n}", v)
    fs.mount("0:25", "/", "9p", "hostroot")
    crit = host_critical(fs.host())
    assert crit == {"0000:00:10.0": 'backs / (9p share "hostroot")'}


def test_virtiofs_share(fs: FakeSys) -> None:
    dev = fs.pci("0000:00:12.0", vendor="1af4", device="105a", cls="0x018000", driver="virtio-pci", group=11)
    v = dev / "virtio3"
    v.mkdir()
    link(fs.sys / "fs/virtiofs/0/device", v)
    write(fs.sys / "fs/virtiofs/0/tag", "myfs\n")
    fs.mount("0:40", "/shared", "virtiofs", "myfs")
    assert set(host_critical(fs.host())) == {"0000:00:12.0"}


def test_nfs_is_left_to_the_route_rule(fs: FakeSys, caplog: pytest.LogCaptureFixture) -> None:
    fs.mount("0:50", "/home", "nfs4", "server:/home")
    with caplog.at_level(logging.WARNING):
        assert host_critical(fs.host()) == {}
    assert not caplog.records


def test_unmappable_mounts_are_warned_about(
    fs: FakeSys, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs.mount("8:16", "/mnt/missing", "ext4", "/dev/sdb")  # no sys/dev/block entry
    fs.mount("0:60", "/tank", "zfs", "tank")
    fs.mount("0:61", "/share", "9p", "nosuchtag")
    fs.swaps("/dev/sdz2 partition 100 0 -2")
    monkeypatch.setattr(hostcritical, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vfiod.hostcritical"):
        assert host_critical(fs.host()) == {}
    text = caplog.text
    assert "/mnt/missing" in text and "/tank" in text and "/share" in text and "/dev/sdz2" in text
    assert len(caplog.records) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vfiod.hostcritical"):
        host_critical(fs.host())
    assert not caplog.records, "each unmapped mount is a warning once per process, then debug"


def test_loop_and_zram_are_not_warned_about(fs: FakeSys, caplog: pytest.LogCaptureFixture) -> None:
    fs.virtual_block("loop0", "7:0", [])
    fs.virtual_block("zram0", "252:0", [])
    fs.mount("7:0", "/snap/core", "squashfs", "/dev/loop0")
    fs.swaps("/dev/zram0 partition 4194300 0 100", "/swapfile file 1048572 0 -3")
    with caplog.at_level(logging.WARNING):
        assert host_critical(fs.host()) == {}
    assert not caplog.records


def test_default_route_through_bridge_on_bond_on_vlan(fs: FakeSys) -> None:
    a = fs.pci("0000:02:00.0", vendor="15b3", device="1017", cls="0x020000", driver="mlx5_core", group=20)
    b = fs.pci("0000:02:00.1", vendor="15b3", device="1017", cls="0x020000", driver="mlx5_core", group=21)
    fs.pci("0000:02:00.2", vendor="15b3", device="1017", cls="0x020000", driver="mlx5_core", group=22)
    fs.net("enp2s0f0", under=a)
    fs.net("enp2s0f1", under=b)
    fs.net("bond0", lowers=("enp2s0f0", "enp2s0f1"))
    fs.net("bond0.100", lowers=("bond0",))
    fs.bridge("br0", ports=("bond0.100",))
    fs.route4("br0")
    crit = host_critical(fs.host())
    assert set(crit) == {"0000:02:00.0", "0000:02:00.1"}
    assert (
        crit[PciAddress.parse("0000:02:00.1")] == "carries the IPv4 default route via br0 (through enp2s0f1)"
    )


def test_bond_slaves_file_without_lower_links(fs: FakeSys) -> None:
    a = fs.pci("0000:02:00.0", cls="0x020000", driver="igb", group=20)
    fs.net("eth0", under=a)
    bond = fs.net("bond0")
    write(bond / "bonding/slaves", "eth0\n")
    fs.route6("bond0")
    assert set(host_critical(fs.host())) == {"0000:02:00.0"}


def test_non_default_and_rejected_routes_are_ignored(fs: FakeSys) -> None:
    a = fs.pci("0000:02:00.0", cls="0x020000", driver="igb", group=20)
    fs.net("eth0", under=a)
    write(
        fs.proc / "net/route",
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    fs.route6()
    assert host_critical(fs.host()) == {}


def test_usb_disk_marks_the_xhci_controller(fs: FakeSys) -> None:
    xhci = fs.pci("0000:00:14.0", cls="0x0c0330", driver="xhci_hcd", group=12)
    fs.disk("sda", "8:0", xhci / "usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0", {"sda1": "8:1"})
    fs.mount("8:1", "/media/usb", "exfat", "/dev/sda1")
    assert set(host_critical(fs.host())) == {"0000:00:14.0"}


def test_one_function_with_several_reasons(fs: FakeSys) -> None:
    dev = fs.pci("0000:00:05.0", vendor="1af4", device="1000", cls="0x020000", driver="virtio-pci", group=4)
    fs.net("eth0", under=dev / "virtio1")
    fs.disk("vda", "254:0", dev / "virtio1")
    fs.mount("254:0", "/", "ext4", "/dev/vda")
    fs.route4("eth0")
    text = host_critical(fs.host())[PciAddress.parse("0000:00:05.0")]
    assert text == "backs / (ext4 on /dev/vda); it also carries the IPv4 default route via eth0"


def test_empty_and_garbage_never_raise(fs: FakeSys) -> None:
    assert host_critical(fs.host()) == {}
    write(fs.proc / "self/mountinfo", "garbage\n1 2 3\n\x00\x01 - -\n12 1 x:y / / rw - ext4 /dev/x rw\n")
    write(fs.proc / "net/route", "Iface\n\x00\nbad line\n")
    write(fs.proc / "net/ipv6_route", "zz\n")
    write(fs.proc / "swaps", "header\n/dev/../../etc partition\n")
    (fs.sys / "class/vtconsole/vtcon0").mkdir(parents=True)
    write(fs.sys / "class/vtconsole/vtcon0/bind", "1")
    assert host_critical(fs.host()) == {}


def test_route_interface_names_cannot_walk_out(fs: FakeSys) -> None:
    write(
        fs.proc / "net/route",
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "..\t00000000\t00000000\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    assert host_critical(fs.host()) == {}


def test_dangling_and_looping_links(fs: FakeSys) -> None:
    fs.pci("0000:09:00.0", cls="0x010802", driver="nvme", group=30)
    link(fs.sys / "dev/block/259:99", fs.sys / "nowhere")
    a = fs.virtual_block("dm-5", "253:5", [])
    b = fs.virtual_block("dm-6", "253:6", ["dm-5"])
    link(a / "slaves/dm-6", b)
    fs.mount("259:99", "/x", "ext4", "/dev/nvme9n1")
    fs.mount("253:6", "/y", "ext4", "/dev/dm-6")
    assert host_critical(fs.host()) == {}


# ----- on the simulator --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["workstation-l4", "no-iommu"])
def test_simulated_workstation(sim: SimFactory, profile: str) -> None:
    crit = host_critical(sim(profile).host)
    assert set(crit) == {"0000:00:02.0", "0000:00:1f.6", "0000:01:00.0"}
    assert crit[PciAddress.parse("0000:00:02.0")].startswith("is the boot VGA with the console bound to it")
    assert crit[PciAddress.parse("0000:00:1f.6")] == "carries the IPv4 and IPv6 default route via eno1"
    assert crit[PciAddress.parse("0000:01:00.0")].startswith("backs / (ext4 on /dev/nvme0n1p2)")


def test_simulated_dgx_marks_the_bmc_vga_not_the_bridge_above_it(sim: SimFactory) -> None:
    crit = host_critical(sim("dgx-h100").host)
    assert "0000:03:00.0" in crit and "0000:02:00.0" not in crit
    assert len(crit) == 3  # BMC VGA, NVMe, uplink NIC: no GPU, no NVSwitch


def test_simulated_q35_9p_share(sim: SimFactory) -> None:
    crit = host_critical(sim("qemu-q35").host)
    assert crit[PciAddress.parse("0000:00:11.0")] == 'backs /out (9p share "out")'
