"""`FakeSys`: hand-built sysfs trees laid out like Linux's (PCI functions under bridges, bus links, drivers,
IOMMU groups, block and net devices, consoles, /proc files), for the host-critical, discovery and
host-status tests and `vfiod check --sysfs-root`; `workstation` is the usual one."""

from __future__ import annotations

import os
from pathlib import Path

from vfiod.host.host import Host, HostRoots


def link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def write(path: Path, text: str) -> None:
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
        link(self.sys / "bus/pci/devices" / addr, real)
        write(real / "vendor", f"0x{vendor}\n")
        write(real / "device", f"0x{device}\n")
        write(real / "subsystem_vendor", f"0x{subsystem[0]}\n")
        write(real / "subsystem_device", f"0x{subsystem[1]}\n")
        write(real / "class", f"{cls}\n")
        if numa is not None:
            write(real / "numa_node", f"{numa}\n")
        if boot_vga is not None:
            write(real / "boot_vga", "1\n" if boot_vga else "0\n")
        if reset is not None:
            write(real / "reset_method", reset + "\n")
        if header is not None:
            (real / "config").write_bytes(bytes(14) + bytes([header]) + bytes(49))
        if driver is not None:
            self.bind(addr, driver)
        if group is not None:
            gdir = self.sys / "kernel/iommu_groups" / str(group)
            link(gdir / "devices" / addr, real)
            link(real / "iommu_group", gdir)
        if vfio_dev:
            (real / "vfio-dev/vfio0").mkdir(parents=True)
        return real

    def bind(self, addr: str, driver: str) -> None:
        ddir = self.sys / "bus/pci/drivers" / driver
        ddir.mkdir(parents=True, exist_ok=True)
        link(self.real[addr] / "driver", ddir)

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
            write(preal / "partition", "1\n")
            self._block(part, part_majmin, preal)
        return real

    def virtual_block(self, name: str, majmin: str, slaves: list[str], dm_name: str | None = None) -> Path:
        real = self.sys / "devices/virtual/block" / name
        real.mkdir(parents=True)
        self._block(name, majmin, real)
        for s in slaves:
            link(real / "slaves" / s, (self.sys / "class/block" / s).resolve())
        if dm_name is not None:
            write(real / "dm/name", dm_name + "\n")
        return real

    def _block(self, name: str, majmin: str, real: Path) -> None:
        link(self.sys / "dev/block" / majmin, real)
        link(self.sys / "class/block" / name, real)

    def mount(self, majmin: str, mountpoint: str, fstype: str, source: str) -> None:
        self._mount_id += 1
        mp = mountpoint.replace(" ", "\\040")
        self._mountinfo.append(
            f"{self._mount_id} 1 {majmin} / {mp} rw,relatime shared:1 - {fstype} {source} rw"
        )
        write(self.proc / "self/mountinfo", "\n".join(self._mountinfo) + "\n")

    def swaps(self, *lines: str) -> None:
        write(
            self.proc / "swaps",
            "Filename\tType\tSize\tUsed\tPriority\n" + "".join(line + "\n" for line in lines),
        )

    # ----- net ---------------------------------------------------------------------------------------

    def net(self, name: str, under: Path | None = None, lowers: tuple[str, ...] = ()) -> Path:
        real = (under / "net" / name) if under is not None else self.sys / "devices/virtual/net" / name
        real.mkdir(parents=True)
        link(self.sys / "class/net" / name, real)
        for lower in lowers:
            link(real / f"lower_{lower}", (self.sys / "class/net" / lower).resolve())
        return real

    def bridge(self, name: str, ports: tuple[str, ...]) -> Path:
        real = self.net(name)
        for port in ports:
            preal = (self.sys / "class/net" / port).resolve()
            (preal / "brport").mkdir(exist_ok=True)
            link(real / "brif" / port, preal / "brport")
        return real

    def route4(self, *ifaces: str) -> None:
        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        lines.append("lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0")
        for ifc in ifaces:
            lines.append(f"{ifc}\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0")
            lines.append(f"{ifc}\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0")
        write(self.proc / "net/route", "\n".join(lines) + "\n")

    def route6(self, *ifaces: str) -> None:
        zero = "0" * 32
        lines = [f"{zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200       lo"]
        for ifc in ifaces:
            lines.append(
                f"{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 "
                f"00000003 {ifc}"
            )
        write(self.proc / "net/ipv6_route", "\n".join(lines) + "\n")

    # ----- console -----------------------------------------------------------------------------------

    def vtconsole(self, index: int, name: str, bound: bool) -> None:
        d = self.sys / "devices/virtual/vtconsole" / f"vtcon{index}"
        write(d / "name", name + "\n")
        write(d / "bind", "1\n" if bound else "0\n")
        link(self.sys / "class/vtconsole" / f"vtcon{index}", d)

    def framebuffer(self, index: int, device: Path) -> None:
        d = device / "graphics" / f"fb{index}"
        d.mkdir(parents=True)
        link(d / "device", device)
        link(self.sys / "class/graphics" / f"fb{index}", d)


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
