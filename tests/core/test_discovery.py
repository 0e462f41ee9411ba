"""Tests for vfiod.core.discovery: the AvailableDevice record, candidates, blockers, and the Go flaws fixed
(uppercase addresses, 0380 displays, vendor-10de non-GPU functions, driverless group members, order)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.core.support.fake_sys import FakeSys, workstation
from vfiod.core.discovery import (
    BRIDGE_BLOCKER,
    NO_IOMMU_BLOCKER,
    AvailableDevice,
    describe,
    discover,
)
from vfiod.core.errors import DeviceNotFound, InvalidPCIAddress
from vfiod.core.hostcritical import host_critical
from vfiod.core.pciids import PciIds
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress

if TYPE_CHECKING:
    from tests.conftest import SimFactory

CONTRACT_KEYS = {
    "pci_address",
    "vendor_id",
    "device_id",
    "subsystem_vendor_id",
    "subsystem_device_id",
    "class",
    "vendor_name",
    "device_name",
    "type",
    "iommu_group",
    "iommu_group_members",
    "current_driver",
    "numa_node",
    "boot_vga",
    "reset_methods",
    "registered_as",
    "host_critical",
    "passthrough_ready",
    "blockers",
    # version 2 of the contract
    "sriov_totalvfs",
    "sriov_numvfs",
    "physfn",
    "virtfns",
    "mdev_types",
    "variant_driver",
}

PCI_IDS = """\
# test database
10de  NVIDIA Corporation
\t27b8  AD104GL [L4]
\t22bc  AD104 High Definition Audio Controller
1002  Advanced Micro Devices, Inc. [AMD/ATI]
8086  Intel Corporation
\ta780  Raptor Lake-S GT1 [UHD Graphics 770]
C 03  Display controller
\t00  VGA compatible controller
"""


@pytest.fixture
def fs(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path / "root")


@pytest.fixture
def ids(tmp_path: Path) -> PciIds:
    path = tmp_path / "pci.ids"
    path.write_text(PCI_IDS)
    return PciIds(path, search_paths=())


def no_ids() -> PciIds:
    return PciIds(Path("/nonexistent/pci.ids"), search_paths=())


def l4(fs: FakeSys, *, group: int | None = 12, driver: str | None = "nvidia") -> None:
    fs.pci("0000:00:01.0", cls="0x060400", driver="pcieport", group=group, header=1)
    fs.pci(
        "0000:a2:00.0",
        parent="0000:00:01.0",
        vendor="10de",
        device="27b8",
        subsystem=("10de", "16ca"),
        cls="0x030200",
        driver=driver,
        group=group,
        numa=1,
        reset="flr bus",
        boot_vga=False,
    )
    fs.pci(
        "0000:a2:00.1",
        parent="0000:00:01.0",
        vendor="10de",
        device="22bc",
        cls="0x040300",
        driver="snd_hda_intel",
        group=group,
    )


def by_addr(devices: list[AvailableDevice]) -> dict[str, AvailableDevice]:
    return {d.pci_address: d for d in devices}


def test_record_has_exactly_the_contract_keys(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    (dev,) = discover(fs.host(), ids)
    record = dev.to_record()
    assert set(record) == CONTRACT_KEYS
    assert {f.name for f in dataclasses.fields(AvailableDevice)} == (CONTRACT_KEYS - {"class"}) | {"class_"}
    assert record == {
        "pci_address": "0000:a2:00.0",
        "vendor_id": "10de",
        "device_id": "27b8",
        "subsystem_vendor_id": "10de",
        "subsystem_device_id": "16ca",
        "class": "030200",
        "vendor_name": "NVIDIA Corporation",
        "device_name": "AD104GL [L4]",
        "type": "gpu",
        "iommu_group": 12,
        "iommu_group_members": ["0000:00:01.0", "0000:a2:00.0", "0000:a2:00.1"],
        "current_driver": "nvidia",
        "numa_node": 1,
        "boot_vga": False,
        "reset_methods": ["flr", "bus"],
        "registered_as": "",
        "host_critical": "",
        "passthrough_ready": True,
        "blockers": [],
        "sriov_totalvfs": 0,
        "sriov_numvfs": 0,
        "physfn": "",
        "virtfns": [],
        "mdev_types": [],
        "variant_driver": "",
    }


def test_vendor_10de_non_display_functions_are_not_candidates(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    fs.pci("0000:a2:00.2", parent="0000:00:01.0", vendor="10de", device="1ad8", cls="0x0c0330", group=12)
    fs.pci("0000:c0:00.0", vendor="10de", device="22a3", cls="0x068000", driver="nvidia", group=40)
    assert [d.pci_address for d in discover(fs.host(), ids)] == ["0000:a2:00.0"]
    everything = by_addr(discover(fs.host(), ids, all_devices=True))
    assert set(everything) == {"0000:00:01.0", "0000:a2:00.0", "0000:a2:00.1", "0000:a2:00.2", "0000:c0:00.0"}
    assert everything["0000:a2:00.1"].type == "pci"
    assert everything["0000:a2:00.1"].device_name == "AD104 High Definition Audio Controller"


def test_every_display_subclass_is_a_candidate_whatever_the_vendor(fs: FakeSys, ids: PciIds) -> None:
    fs.pci("0000:00:02.0", vendor="8086", device="a780", cls="0x030000", group=1)
    fs.pci("0000:00:03.0", vendor="1234", device="1111", cls="0x038000", group=2)  # bochs-display
    fs.pci("0000:05:00.0", vendor="1002", device="744c", cls="0x030000", group=3)
    fs.pci("0000:06:00.0", vendor="10de", device="27b8", cls="0x030200", group=4)
    fs.pci("0000:07:00.0", vendor="1a03", device="2000", cls="0x030000", group=5)  # ASPEED BMC VGA
    got = by_addr(discover(fs.host(), ids))
    assert set(got) == {"0000:00:02.0", "0000:00:03.0", "0000:05:00.0", "0000:06:00.0", "0000:07:00.0"}
    assert all(d.type == "gpu" for d in got.values())
    assert got["0000:00:03.0"].class_ == "038000"


def test_order_is_by_address_not_directory_order(tmp_path: Path, ids: PciIds) -> None:
    addrs = [f"0000:{bus:02x}:00.0" for bus in range(1, 40)]
    # Created out of order, so the directory's own order is not already sorted.
    shuffled = addrs[1::2][::-1] + addrs[::2]
    fs = FakeSys(tmp_path / "r")
    for n, addr in enumerate(shuffled):
        fs.pci(addr, cls="0x030000", group=n)
    first = discover(fs.host(), ids)
    assert [d.pci_address for d in first] == addrs
    assert discover(fs.host(), ids) == first


def test_uppercase_address_is_normalised(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    dev = describe(fs.host(), "0000:A2:00.0", ids)
    assert dev.pci_address == "0000:a2:00.0"
    assert dev.device_name == "AD104GL [L4]"


@pytest.mark.parametrize("bad", ["a2:00.0", "0000:a2:00.8", "0000:a2:00.0\n", "../../etc", ""])
def test_malformed_address_is_invalid(fs: FakeSys, ids: PciIds, bad: str) -> None:
    with pytest.raises(InvalidPCIAddress):
        describe(fs.host(), bad, ids)


def test_missing_device_is_device_not_found(fs: FakeSys, ids: PciIds) -> None:
    with pytest.raises(DeviceNotFound, match=re.escape("0000:a2:00.0")):
        describe(fs.host(), "0000:A2:00.0", ids)


def test_describe_works_for_non_candidates(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    audio = describe(fs.host(), "0000:a2:00.1", ids)
    assert audio.type == "pci"
    assert audio.current_driver == "snd_hda_intel"
    assert audio.passthrough_ready


def test_names_fall_back_to_ids(fs: FakeSys) -> None:
    l4(fs)
    (dev,) = discover(fs.host(), no_ids())
    assert (dev.vendor_name, dev.device_name) == ("10de", "27b8")


def test_known_vendor_unknown_device_falls_back_per_field(fs: FakeSys, ids: PciIds) -> None:
    fs.pci("0000:05:00.0", vendor="1002", device="beef", cls="0x030000", group=3)
    (dev,) = discover(fs.host(), ids)
    assert (dev.vendor_name, dev.device_name) == ("Advanced Micro Devices, Inc. [AMD/ATI]", "beef")


def test_no_iommu_group_is_reported_not_dropped(fs: FakeSys, ids: PciIds) -> None:
    l4(fs, group=None)
    (dev,) = discover(fs.host(), ids)
    assert dev.iommu_group == -1
    assert dev.iommu_group_members == ()
    assert dev.blockers == (NO_IOMMU_BLOCKER,)
    assert "intel_iommu=on" in NO_IOMMU_BLOCKER and "amd_iommu" not in NO_IOMMU_BLOCKER
    assert not dev.passthrough_ready


def test_driverless_group_members_are_not_blockers(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    fs.pci("0000:00:01.1", cls="0x088000", group=12)  # no driver
    fs.pci("0000:00:01.2", cls="0x088000", group=12, driver="pci-stub")
    fs.pci("0000:00:01.3", cls="0x020000", group=12, driver="vfio-pci")
    fs.pci("0000:00:01.4", cls="0x020000", group=12, driver="mlx5_vfio_pci", vfio_dev=True)
    (dev,) = discover(fs.host(), ids)
    assert dev.blockers == ()
    assert dev.passthrough_ready


def test_same_slot_function_on_a_host_driver_is_not_a_blocker(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)  # 0000:a2:00.1 is on snd_hda_intel: include_group takes it along
    (dev,) = discover(fs.host(), ids)
    assert dev.passthrough_ready


def test_other_member_on_a_host_driver_is_a_blocker(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    fs.pci("0000:00:1f.6", cls="0x020000", group=12, driver="e1000e")
    (dev,) = discover(fs.host(), ids)
    assert dev.blockers == (
        "IOMMU group 12 also holds 0000:00:1f.6 (e1000e), which the host is using; it must be passed "
        "through with it or unbound",
    )
    assert not dev.passthrough_ready


def test_bridges_are_blocked(fs: FakeSys, ids: PciIds) -> None:
    fs.pci("0000:00:00.0", cls="0x060000", group=0)  # host bridge, header type 0
    fs.pci("0000:00:01.0", cls="0x060400", driver="pcieport", group=1)  # no config: class decides
    fs.pci("0000:00:1c.0", cls="0x068000", group=2, header=0x81)  # multifunction type-1 header
    fs.pci("0000:c0:00.0", vendor="10de", device="22a3", cls="0x068000", group=3, header=0)  # NVSwitch
    got = by_addr(discover(fs.host(), ids, all_devices=True))
    for addr in ("0000:00:00.0", "0000:00:01.0", "0000:00:1c.0"):
        assert BRIDGE_BLOCKER in got[addr].blockers, addr
        assert "bridges are never passed through" in BRIDGE_BLOCKER
    assert got["0000:c0:00.0"].blockers == ()


def test_host_critical_is_reported_and_blocks(fs: FakeSys, ids: PciIds) -> None:
    workstation(fs)
    got = by_addr(discover(fs.host(), ids, all_devices=True))
    igpu = got["0000:00:02.0"]
    assert igpu.boot_vga
    assert igpu.host_critical.startswith("is the boot VGA with the console bound to it")
    assert any(b.startswith("the host needs it: it is the boot VGA") for b in igpu.blockers)
    assert got["0000:03:00.0"].host_critical.startswith("backs / (ext4 on /dev/nvme0n1p2)")
    assert got["0000:00:1f.6"].host_critical.startswith("carries the IPv4 and IPv6 default route")
    assert got["0000:00:1d.0"].host_critical == ""


def test_registered_as(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    (dev,) = discover(fs.host(), ids, registered={"0000:A2:00.0": "k2h8x0tq4m1n7c3v5b9z6a0d"})
    assert dev.registered_as == "k2h8x0tq4m1n7c3v5b9z6a0d"


def test_missing_and_garbage_attributes(fs: FakeSys, ids: PciIds) -> None:
    real = fs.pci("0000:01:00.0", cls="0x030000", group=1, numa=None)
    (real / "vendor").unlink()
    (real / "reset_method").write_text("\n")
    dev = describe(fs.host(), "0000:01:00.0", ids)
    assert dev.vendor_id == "" and dev.vendor_name == ""
    assert dev.numa_node == -1
    assert dev.reset_methods == ()
    assert dev.current_driver == ""
    (real / "numa_node").write_text("zero\n")
    assert describe(fs.host(), "0000:01:00.0", ids).numa_node == -1


def test_host_critical_computed_once_per_call(
    fs: FakeSys, ids: PciIds, monkeypatch: pytest.MonkeyPatch
) -> None:
    workstation(fs)
    calls: list[int] = []

    def counting(host: Host) -> dict[PciAddress, str]:
        calls.append(1)
        return host_critical(host)

    monkeypatch.setattr("vfiod.core.discovery.scan_host_critical", counting)
    discover(fs.host(), ids, all_devices=True)
    assert len(calls) == 1


# ----- on the simulator --------------------------------------------------------------------------------


def test_simulated_workstation(sim: SimFactory) -> None:
    sh = sim("workstation-l4")
    got = by_addr(discover(sh.host, PciIds()))
    gpu = got["0000:a2:00.0"]
    assert (gpu.vendor_name, gpu.device_name, gpu.type) == ("NVIDIA Corporation", "AD104GL [L4]", "gpu")
    assert "0000:a2:00.1" in gpu.iommu_group_members
    assert got["0000:00:02.0"].host_critical


def test_simulated_no_iommu_reports_devices(sim: SimFactory) -> None:
    sh = sim("no-iommu")
    devices = discover(sh.host, no_ids())
    assert devices
    assert all(d.iommu_group == -1 and NO_IOMMU_BLOCKER in d.blockers for d in devices)


@pytest.mark.parametrize(
    "profile", ["workstation-l4", "dgx-h100", "no-iommu", "qemu-q35", "qemu-q35-iommufd", "synthetic:50"]
)
def test_every_profile_lists_sorted_and_sane(sim: SimFactory, profile: str) -> None:
    sh = sim(profile)
    everything = discover(sh.host, no_ids(), all_devices=True)
    addrs = [d.pci_address for d in everything]
    assert addrs == sorted(addrs) and addrs
    for d in everything:
        assert set(d.to_record()) == CONTRACT_KEYS
        assert d.passthrough_ready == (not d.blockers)
        assert d.type == ("gpu" if d.class_.startswith("03") else "pci")


@pytest.mark.slow
def test_synthetic_2000_is_fast(sim: SimFactory) -> None:
    sh = sim("synthetic:2000")
    ids = no_ids()
    discover(sh.host, ids, all_devices=True)  # warm the page cache
    started = time.perf_counter()
    devices = discover(sh.host, ids, all_devices=True)
    elapsed = time.perf_counter() - started
    assert len(devices) >= 2000
    assert elapsed < 1.0, f"discovery of {len(devices)} functions took {elapsed:.2f} s"


def test_bridge_gets_only_the_bridge_blocker(fs: FakeSys, ids: PciIds) -> None:
    l4(fs)
    (bridge,) = [d for d in discover(fs.host(), ids, all_devices=True) if d.pci_address == "0000:00:01.0"]
    assert bridge.blockers == (BRIDGE_BLOCKER,)
