"""Which VFIO driver a function goes to (host/vfio_variants.py): the device's modalias with `vfio_` in
front, matched against the `vfio_pci:` aliases of the running kernel's modules.alias, fewest wildcards
winning; vfio-pci's own alias and no match both mean plain vfio-pci.

The aliases below are lines of real kernels' modules.alias: Debian's 6.1 (`vfio_pci` only, as a module)
and a 6.12 built with the mlx5, virtio, pds and qat variants. When `VFIOD_E2E_KERNEL_TARBALL` names such
a kernel (a tarball of boot/ and lib/modules/), its own modules.alias is read too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from vfiod.host.host import Host, HostRoots
from vfiod.host.pciaddr import PciAddress, is_vfio_driver
from vfiod.host.vfio_variants import (
    VfioAlias,
    alias_copy,
    alias_file,
    best_match,
    intended_driver,
    kernel_aliases,
    pick,
    read_aliases,
)

REAL_612 = """\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v00001DD8d00001003sv*sd*bc*sc*i* pds_vfio_pci
alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci
alias vfio_pci:v00008086d00004945sv*sd*bc*sc*i* qat_vfio_pci
alias vfio_pci:v00008086d00004943sv*sd*bc*sc*i* qat_vfio_pci
alias vfio_pci:v00008086d00004941sv*sd*bc*sc*i* qat_vfio_pci
"""
DEBIAN_61 = "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\nalias pci:v000010DEd*sv*sd*bc03sc*i* nouveau\n"

# Real modaliases (drivers/pci/pci-sysfs.c modalias_show) of each variant's device and of plain ones.
CX7_VF = "pci:v000015B3d0000101Esv000015B3sd00000025bc02sc00i00"
VIRTIO_NET_MODERN = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
VIRTIO_NET_LEGACY = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
PDS_VF = "pci:v00001DD8d00001003sv00001DD8sd00005201bc02sc00i00"
QAT_4XXX_VF = "pci:v00008086d00004941sv00008086sd00000000bc0Bsc40i00"
L4 = "pci:v000010DEd000027B8sv000010DEsd000016CAbc03sc02i00"
GH200 = "pci:v000010DEd00002342sv000010DEsd000016EBbc03sc02i00"
NVGRACE = "alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n"


def aliases(tmp_path: Path, text: str) -> tuple[VfioAlias, ...]:
    path = tmp_path / "modules.alias"
    path.write_text(text)
    return read_aliases(path)


@pytest.mark.parametrize(
    ("modalias", "module"),
    [
        (CX7_VF, "mlx5_vfio_pci"),
        (VIRTIO_NET_MODERN, "virtio_vfio_pci"),
        (PDS_VF, "pds_vfio_pci"),
        (QAT_4XXX_VF, "qat_vfio_pci"),
        (VIRTIO_NET_LEGACY, None),  # transitional virtio-net: not in virtio_vfio_pci's table
        (L4, None),  # a plain GPU: vfio-pci
    ],
)
def test_each_variant_is_picked_by_its_real_alias(tmp_path: Path, modalias: str, module: str | None) -> None:
    found = aliases(tmp_path, REAL_612 + DEBIAN_61)
    assert [a.module for a in found].count("qat_vfio_pci") == 3 and len(found) == 7  # only vfio_pci: lines
    assert pick(modalias, found) == module


def test_vfio_pci_own_alias_means_plain_vfio_pci(tmp_path: Path) -> None:
    found = aliases(tmp_path, DEBIAN_61)
    assert best_match(L4, found) == "vfio_pci"  # every field a wildcard: it matches anything...
    assert pick(L4, found) is None  # ...and stands for vfio-pci itself


def test_fewest_wildcards_wins(tmp_path: Path) -> None:
    broad = "alias vfio_pci:v000010DEd*sv*sd*bc*sc*i* broad_vfio_pci\n"  # 6 wildcards, GH200's 5
    found = aliases(tmp_path, DEBIAN_61 + broad + NVGRACE)
    assert pick(GH200, found) == "nvgrace_gpu_vfio_pci"
    assert pick(L4, found) == "broad_vfio_pci"
    assert pick("", found) is None


def test_vfio_driver_names() -> None:
    assert all(is_vfio_driver(n) for n in ("vfio-pci", "mlx5_vfio_pci", "nvgrace_gpu_vfio_pci"))
    assert not any(is_vfio_driver(n) for n in ("virtio-pci", "nvidia", "pci-stub", None, "vfio_pci_core"))


def test_the_running_kernels_aliases_are_read_once_and_again_when_changed(tmp_path: Path) -> None:
    root = tmp_path / "host"
    dev = root / "sys/bus/pci/devices/0000:00:0a.0"
    dev.mkdir(parents=True)
    for name, value in (
        ("vendor", "0x1af4"),
        ("device", "0x1041"),
        ("subsystem_vendor", "0x1af4"),
        ("subsystem_device", "0x1100"),
        ("class", "0x020000"),
    ):
        (dev / name).write_text(value + "\n")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text("6.12.117\n")
    host = Host(HostRoots.under(root))
    addr = PciAddress.parse("0000:00:0a.0")
    assert intended_driver(host, addr) == "vfio-pci"  # no modules.alias: plain vfio-pci
    alias_file = root / "lib/modules/6.12.117/modules.alias"
    alias_file.parent.mkdir(parents=True)
    alias_file.write_text(DEBIAN_61)
    assert intended_driver(host, addr) == "vfio-pci"
    alias_file.write_text(DEBIAN_61 + REAL_612)  # a new size: read again
    assert intended_driver(host, addr) == "virtio_vfio_pci"


def test_the_units_copy_serves_when_the_module_tree_is_hidden(tmp_path: Path) -> None:
    """Under ProtectKernelModules= /lib/modules is inaccessible: the unit's copy of the running kernel's
    vfio_pci: lines in /run/vfiod is read instead, and only if it was made for the running kernel."""
    root = tmp_path / "host"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text("6.12.117\n")
    host = Host(HostRoots.under(root))
    copy = alias_copy(host)
    copy.parent.mkdir(parents=True)
    copy.write_text("# release 6.12.117\n" + REAL_612)
    assert {a.module for a in kernel_aliases(host)} == {
        "mlx5_vfio_pci",
        "pds_vfio_pci",
        "virtio_vfio_pci",
        "qat_vfio_pci",
    }
    copy.write_text("# release 6.12.116\n" + REAL_612 + "\n")  # made before a reboot into another kernel
    assert kernel_aliases(host) == ()
    real = alias_file(host)
    real.parent.mkdir(parents=True)
    real.write_text(DEBIAN_61)  # readable: the module tree wins
    assert [a.module for a in kernel_aliases(host)] == ["vfio_pci"]


def prebuilt_kernel() -> Path | None:
    raw = os.environ.get("VFIOD_E2E_KERNEL_TARBALL", "")
    return Path(raw) if raw and Path(raw).is_file() else None


@pytest.fixture(scope="module")
def prebuilt_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prebuilt kernel's lib/modules/<version>/modules.* (no .ko), read in one pass of the tarball."""
    tarball = prebuilt_kernel()
    if tarball is None:
        pytest.skip("VFIOD_E2E_KERNEL_TARBALL names no kernel tarball")
    root = tmp_path_factory.mktemp("prebuilt")
    with tarfile.open(tarball, "r|*") as tar:
        for member in tar:
            if (
                member.isfile()
                and "/modules/" in member.name
                and Path(member.name).name.startswith("modules.")
            ):
                data = tar.extractfile(member)
                assert data is not None
                dest = root / "lib/modules" / Path(member.name).parent.name / Path(member.name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data.read())
    found = list((root / "lib/modules").glob("*/modules.alias")) + list(
        root.glob("./lib/modules/*/modules.alias")
    )
    assert found, f"{tarball} holds no lib/modules/<version>/modules.alias"
    return found[0].parent


def test_the_prebuilt_kernels_own_modules_alias(prebuilt_modules: Path) -> None:
    found = read_aliases(prebuilt_modules / "modules.alias")
    assert {a.module for a in found} >= {"mlx5_vfio_pci", "virtio_vfio_pci", "pds_vfio_pci", "qat_vfio_pci"}
    assert pick(CX7_VF, found) == "mlx5_vfio_pci"
    assert pick(VIRTIO_NET_MODERN, found) == "virtio_vfio_pci"
    assert pick(PDS_VF, found) == "pds_vfio_pci"
    assert pick(QAT_4XXX_VF, found) == "qat_vfio_pci"
    assert pick(L4, found) is None and pick(VIRTIO_NET_LEGACY, found) is None


@pytest.mark.skipif(shutil.which("modprobe") is None, reason="no modprobe (kmod) here")
def test_modprobe_resolves_the_prefixed_modalias_the_same_way(prebuilt_modules: Path) -> None:
    """kmod's own resolution of `vfio_<modalias>` against the same kernel agrees with ours."""
    base = prebuilt_modules.parent.parent.parent
    for modalias, module in ((VIRTIO_NET_MODERN, "virtio_vfio_pci"), (CX7_VF, "mlx5_vfio_pci")):
        out = subprocess.run(
            ["modprobe", "-d", str(base), "-S", prebuilt_modules.name, "-R", "vfio_" + modalias],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.stdout.split() == [module], out.stderr
