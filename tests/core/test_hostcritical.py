"""Tests for vfiod.core.hostcritical on hand-built sysfs trees laid out like Linux's.

`FakeSys` builds such trees (PCI functions under bridges, bus links, drivers, IOMMU groups, block and net
devices, consoles, /proc files); the discovery and host-status tests reuse it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vfiod.core import hostcritical
from vfiod.core.hostcritical import deepest_pci_function, host_critical
from vfiod.host.host import Host, HostRoots
from vfiod.host.pciaddr import PciAddress

if TYPE_CHECKING:
    from tests.conftest import SimFactory


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class FakeSys:
    """A small Linux-shaped tree under `root`: sys/, dev/, proc/, etc/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.proc = root / "proc"
        self.dev = root / "dev"
        self.etc = root / "etc"
        for d in (self.sys / "bus/pci/devices", self.proc, self.dev, self.etc):
            d.mkdir(parents=True, exist_ok=True)
        self.real: dict[str, Path] = {}
        self._mountinfo: list[str] = []
        self._mount_id = 20

    def host(self) -> Host:
        return Host(HostRoots.under(self.root))

    # ----- PCI ---------------------------------------------------------------------------------------

    def pci(
        self,
        addr: str,
        *,
        parent: str | None = None,
        vendor: str = "8086",
        device: str = "1234",
        cls: str = "0x020000",
        subsystem: tuple[str, str] = ("0000", "0000"),
        driver: str | None = None,
        group: int | None = None,
        boot_vga: bool | None = None,
        numa: int | None = -1,
        reset: str | None = None,
        header: int | None = None,
        vfio_dev: bool = False,
    ) -> Path:
        base = self.real[parent] if parent else self.sys / "devices" / f"pci{addr[:4]}:{addr[5:7]}"
        real = base / addr
        real.mkdir(parents=True)
        self.real[addr] = real
        _link(self.sys / "bus/pci/devices" / addr, real)
        _write(real / "vendor", f"0x{vendor}\n")
        _write(real / "device", f"0x{device}\n")
        _write(real / "subsystem_vendor", f"0x{subsystem[0]}\n")
        _write(real / "subsystem_device", f"0x{subsystem[1]}\n")
        _write(real / "class", f"{cls}\n")
        if numa is not None:
            _write(real / "numa_node", f"{numa}\n")
        if boot_vga is not None:
            _write(real / "boot_vga", "1\n" if boot_vga else "0\n")
        if reset is not None:
            _write(real / "reset_method", reset + "\n")
        if header is not None:
            (real / "config").write_bytes(bytes(14) + bytes([header]) + bytes(49))
        if driver is not None:
            self.bind(addr, driver)
        if group is not None:
            gdir = self.sys / "kernel/iommu_groups" / str(group)
            _link(gdir / "devices" / addr, real)
            _link(real / "iommu_group", gdir)
        if vfio_dev:
            (real / "vfio-dev/vfio0").mkdir(parents=True)
        return real

    def bind(self, addr: str, driver: str) -> None:
        ddir = self.sys / "bus/pci/drivers" / driver
        ddir.mkdir(parents=True, exist_ok=True)
        _link(self.real[addr] / "driver", ddir)

    def module(self, name: str) -> None:
        (self.sys / "module" / name).mkdir(parents=True, exist_ok=True)

    # ----- block -------------------------------------------------------------------------------------

    def disk(self, name: str, majmin: str, under: Path, partitions: dict[str, str] | None = None) -> Path:
        real = under / "block" / name
        real.mkdir(parents=True)
        self._block(name, majmin, real)
        for part, part_majmin in (partitions or {}).items():
            preal = real / part
            preal.mkdir()
            _write(preal / "partition", "1\n")
            self._block(part, part_majmin, preal)
        return real

    def virtual_block(self, name: str, majmin: str, slaves: list[str], dm_name: str | None = None) -> Path:
        real = self.sys / "devices/virtual/block" / name
        real.mkdir(parents=True)
        self._block(name, majmin, real)
        for s in slaves:
            _link(real / "slaves" / s, (self.sys / "class/block" / s).resolve())
        if dm_name is not None:
            _write(real / "dm/name", dm_name + "\n")
        return real

    def _block(self, name: str, majmin: str, real: Path) -> None:
        _link(self.sys / "dev/block" / majmin, real)
        _link(self.sys / "class/block" / name, real)

    def mount(self, majmin: str, mountpoint: str, fstype: str, source: str) -> None:
        self._mount_id += 1
        mp = mountpoint.replace(" ", "\\040")
        self._mountinfo.append(
            f"{self._mount_id} 1 {majmin} / {mp} rw,relatime shared:1 - {fstype} {source} rw"
        )
        _write(self.proc / "self/mountinfo", "\n".join(self._mountinfo) + "\n")

    def swaps(self, *lines: str) -> None:
        _write(
            self.proc / "swaps",
            "Filename\tType\tSize\tUsed\tPriority\n" + "".join(line + "\n" for line in lines),
        )

    # ----- net ---------------------------------------------------------------------------------------

    def net(self, name: str, under: Path | None = None, lowers: tuple[str, ...] = ()) -> Path:
        real = (under / "net" / name) if under is not None else self.sys / "devices/virtual/net" / name
        real.mkdir(parents=True)
        _link(self.sys / "class/net" / name, real)
        for lower in lowers:
            _link(real / f"lower_{lower}", (self.sys / "class/net" / lower).resolve())
        return real

    def bridge(self, name: str, ports: tuple[str, ...]) -> Path:
        real = self.net(name)
        for port in ports:
            preal = (self.sys / "class/net" / port).resolve()
            (preal / "brport").mkdir(exist_ok=True)
            _link(real / "brif" / port, preal / "brport")
        return real

    def route4(self, *ifaces: str) -> None:
        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        lines.append("lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0")
        for ifc in ifaces:
            lines.append(f"{ifc}\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0")
            lines.append(f"{ifc}\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0")
        _write(self.proc / "net/route", "\n".join(lines) + "\n")

    def route6(self, *ifaces: str) -> None:
        zero = "0" * 32
        lines = [f"{zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200       lo"]
        for ifc in ifaces:
            lines.append(
                f"{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 "
                f"00000003 {ifc}"
            )
        _write(self.proc / "net/ipv6_route", "\n".join(lines) + "\n")

    # ----- console -----------------------------------------------------------------------------------

    def vtconsole(self, index: int, name: str, bound: bool) -> None:
        d = self.sys / "devices/virtual/vtconsole" / f"vtcon{index}"
        _write(d / "name", name + "\n")
        _write(d / "bind", "1\n" if bound else "0\n")
        _link(self.sys / "class/vtconsole" / f"vtcon{index}", d)

    def framebuffer(self, index: int, device: Path) -> None:
        d = device / "graphics" / f"fb{index}"
        d.mkdir(parents=True)
        _link(d / "device", device)
        _link(self.sys / "class/graphics" / f"fb{index}", d)


def workstation(fs: FakeSys) -> None:
    """An iGPU with console, an NVMe root disk behind a root port, a NIC with the default route."""
    fs.pci("0000:00:00.0", vendor="8086", device="a700", cls="0x060000", group=0)
    fs.pci(
        "0000:00:02.0", vendor="8086", device="a780", cls="0x030000", driver="i915", group=1, boot_vga=True
    )
    fs.pci("0000:00:1d.0", vendor="8086", device="7a30", cls="0x060400", driver="pcieport", group=2, header=1)
    nvme = fs.pci(
        "0000:03:00.0",
        parent="0000:00:1d.0",
        vendor="144d",
        device="a80a",
        cls="0x010802",
        driver="nvme",
        group=2,
    )
    nic = fs.pci("0000:00:1f.6", vendor="8086", device="1a1c", cls="0x020000", driver="e1000e", group=3)
    fs.disk(
        "nvme0n1",
        "259:0",
        nvme / "nvme/nvme0",
        {"nvme0n1p1": "259:1", "nvme0n1p2": "259:2", "nvme0n1p3": "259:3"},
    )
    fs.mount("259:2", "/", "ext4", "/dev/nvme0n1p2")
    fs.mount("259:1", "/boot/efi", "vfat", "/dev/nvme0n1p1")
    fs.mount("0:22", "/proc", "proc", "proc")
    fs.mount("0:23", "/tmp", "tmpfs", "tmpfs")
    fs.swaps("/dev/nvme0n1p3                          partition\t8388604\t0\t-2")
    fs.net("lo")
    fs.net("eno1", under=nic)
    fs.route4("eno1")
    fs.route6("eno1")
    fs.vtconsole(0, "(S) dummy device", False)
    fs.vtconsole(1, "(M) frame buffer device", True)
    fs.framebuffer(0, fs.real["0000:00:02.0"])


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
    _link(fs.sys / "dev/block/259:9", md / "md1p1")
    fs.mount("259:9", "/srv", "ext4", "/dev/md1p1")
    assert set(host_critical(fs.host())) == {"0000:05:00.0"}


def test_btrfs_anonymous_device_uses_source_and_siblings(fs: FakeSys) -> None:
    a = fs.pci("0000:06:00.0", cls="0x010802", driver="nvme", group=7)
    b = fs.pci("0000:07:00.0", cls="0x010802", driver="nvme", group=8)
    fs.disk("nvme2n1", "259:16", a / "nvme/nvme2")
    fs.disk("nvme3n1", "259:24", b / "nvme/nvme3")
    for name in ("nvme2n1", "nvme3n1"):
        _link(fs.sys / "fs/btrfs/0f1e/devices" / name, (fs.sys / "class/block" / name).resolve())
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
    _link(subsys / "nvme4", ctrl)
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
        _link(fs.sys / "bus/virtio/devices" / f"virtio{n}", v)
    fs.mount("0:25", "/", "9p", "hostroot")
    crit = host_critical(fs.host())
    assert crit == {"0000:00:10.0": 'backs / (9p share "hostroot")'}


def test_virtiofs_share(fs: FakeSys) -> None:
    dev = fs.pci("0000:00:12.0", vendor="1af4", device="105a", cls="0x018000", driver="virtio-pci", group=11)
    v = dev / "virtio3"
    v.mkdir()
    _link(fs.sys / "fs/virtiofs/0/device", v)
    _write(fs.sys / "fs/virtiofs/0/tag", "myfs\n")
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
    _write(bond / "bonding/slaves", "eth0\n")
    fs.route6("bond0")
    assert set(host_critical(fs.host())) == {"0000:02:00.0"}


def test_non_default_and_rejected_routes_are_ignored(fs: FakeSys) -> None:
    a = fs.pci("0000:02:00.0", cls="0x020000", driver="igb", group=20)
    fs.net("eth0", under=a)
    _write(
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
    _write(fs.proc / "self/mountinfo", "garbage\n1 2 3\n\x00\x01 - -\n12 1 x:y / / rw - ext4 /dev/x rw\n")
    _write(fs.proc / "net/route", "Iface\n\x00\nbad line\n")
    _write(fs.proc / "net/ipv6_route", "zz\n")
    _write(fs.proc / "swaps", "header\n/dev/../../etc partition\n")
    (fs.sys / "class/vtconsole/vtcon0").mkdir(parents=True)
    _write(fs.sys / "class/vtconsole/vtcon0/bind", "1")
    assert host_critical(fs.host()) == {}


def test_route_interface_names_cannot_walk_out(fs: FakeSys) -> None:
    _write(
        fs.proc / "net/route",
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "..\t00000000\t00000000\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    assert host_critical(fs.host()) == {}


def test_dangling_and_looping_links(fs: FakeSys) -> None:
    fs.pci("0000:09:00.0", cls="0x010802", driver="nvme", group=30)
    _link(fs.sys / "dev/block/259:99", fs.sys / "nowhere")
    a = fs.virtual_block("dm-5", "253:5", [])
    b = fs.virtual_block("dm-6", "253:6", ["dm-5"])
    _link(a / "slaves/dm-6", b)
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
