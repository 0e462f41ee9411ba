"""Functions that carry other devices: an SR-IOV physical function with VFs enabled and an mdev parent
with mediated devices are never unbound (SriovEnabled, InUse; nothing written), a VF is never a
same-slot companion, and ListAvailable shows what hangs off what."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.core.support.fake_sys import FakeSys, link, write
from tests.core.support.worlds import ADMIN, HM, Env, MakeEnv
from vfiod.core import discovery, guard
from vfiod.core.errors import InUse, IOMMUGroupConflict, SriovEnabled
from vfiod.host.pciaddr import PciAddress

PF = PciAddress.parse("0000:1c:00.0")  # dgx-h100's first ConnectX-7: an SR-IOV PF with 4 VFs
VF1, VF2 = PciAddress.parse("0000:1c:00.1"), PciAddress.parse("0000:1c:00.2")
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def enable_vfs(e: Env, count: int) -> None:
    """What an admin does: VFs driverless (autoprobe off), then `count` of them."""
    for attr, value in (("sriov_drivers_autoprobe", b"0"), ("sriov_numvfs", str(count).encode())):
        e.kernel.write_attribute(e.host.from_logical(f"/sys/bus/pci/devices/{PF}/{attr}"), value)


def test_a_pf_with_vfs_enabled_is_never_unbound(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    m.register(ADMIN, str(PF), "cx7-pf")
    enable_vfs(e, 2)
    before = len(e.writes)
    with pytest.raises(SriovEnabled) as err:
        m.attach(ADMIN, "vm1", ["cx7-pf"])
    assert f"{VF1} on no driver (not held)" in err.value.message and str(VF2) in err.value.message
    assert "sriov_numvfs" in err.value.message  # says how to disable them
    with pytest.raises(SriovEnabled):
        m.bind(ADMIN, "cx7-pf")
    assert e.writes[before:] == []  # nothing written
    assert e.host.driver(PF) == "mlx5_core" and e.host.device_exists(VF1)
    assert m.get_device("cx7-pf").state == "host"


def test_a_vf_passes_through_on_its_own(env: MakeEnv) -> None:
    e = env("dgx-h100")
    m = e.manager
    enable_vfs(e, 2)
    m.register(ADMIN, str(VF1), "vf1")
    atts, _ = m.attach(ADMIN, "vm1", ["vf1"], include_group=True, owner_uid=HM.uid)
    assert [a.pci_address for a in atts] == [str(VF1)]  # neither the PF nor VF2 came along
    assert e.host.driver(VF1) == "vfio-pci" and e.host.driver(PF) == "mlx5_core"
    # The PF's VFs are in use now: its driver stays, and the refusal names the holder-to-be's VF.
    listed = {d.pci_address: d for d in m.list_available(all_devices=True)}
    pf, vf = listed[str(PF)], listed[str(VF1)]
    assert (pf.sriov_totalvfs, pf.sriov_numvfs, pf.virtfns, pf.physfn) == (4, 2, (str(VF1), str(VF2)), "")
    assert (vf.physfn, vf.sriov_totalvfs, vf.virtfns) == (str(PF), 0, ())
    assert not pf.passthrough_ready and any("SR-IOV physical function" in b for b in pf.blockers)
    record = pf.to_record()
    assert (record["sriov_numvfs"], record["virtfns"], record["mdev_types"]) == (2, [str(VF1), str(VF2)], [])


def _pf_and_vf_in_one_group(tmp_path: Path) -> FakeSys:
    """A PF and its VF in one IOMMU group (no ACS), sharing the slot prefix as with ARI."""
    fs = FakeSys(tmp_path)
    pf = fs.pci("0000:05:00.0", vendor="8086", device="1572", driver="i40e", group=3)
    vf = fs.pci("0000:05:00.1", vendor="8086", device="154c", driver="iavf", group=3)
    write(pf / "sriov_totalvfs", "8\n")
    write(pf / "sriov_numvfs", "1\n")
    link(pf / "virtfn0", vf)
    link(vf / "physfn", pf)
    return fs


def test_a_vf_is_never_a_same_slot_companion(tmp_path: Path) -> None:
    host = _pf_and_vf_in_one_group(tmp_path).host()
    with pytest.raises(IOMMUGroupConflict, match=r"0000:05:00\.1, bound to iavf"):
        guard.plan_groups(host, [PciAddress.parse("0000:05:00.0")], include_group=True)


def test_an_mdev_parent_with_children_is_in_use(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    gpu = fs.pci("0000:41:00.0", vendor="10de", device="26b9", cls="0x030200", driver="nvidia", group=9)
    (gpu / "mdev_supported_types/nvidia-1155").mkdir(parents=True)
    host = fs.host()
    addr = PciAddress.parse("0000:41:00.0")
    guard.require_no_dependents(host, [addr])  # types alone are no children
    (gpu / UUID).mkdir()
    os.symlink("../mdev_supported_types/nvidia-1155", gpu / UUID / "mdev_type")
    with pytest.raises(InUse, match=UUID):
        guard.require_no_dependents(host, [addr])
    (listed,) = discovery.discover(host)
    assert listed.mdev_types == ("nvidia-1155",)
    assert any(UUID in b for b in listed.blockers) and not listed.passthrough_ready


def test_devices_behind_intel_vmd_are_listed_grouped_and_guarded(tmp_path: Path) -> None:
    """Intel VMD puts the NVMe behind it in PCI domain 10000 and in the VMD endpoint's IOMMU group: those
    functions are listed, count as group members, and keep the host's root disk host-critical."""
    fs = FakeSys(tmp_path)
    fs.pci("0000:00:0e.0", vendor="8086", device="467f", cls="0x010400", driver="vmd", group=4)
    nvme = fs.pci(
        "10000:e1:00.0",
        parent="0000:00:0e.0",
        vendor="144d",
        device="a80a",
        cls="0x010802",
        driver="nvme",
        group=4,
    )
    fs.disk("nvme0n1", "259:0", nvme / "nvme/nvme0", {"nvme0n1p2": "259:2"})
    fs.mount("259:2", "/", "ext4", "/dev/nvme0n1p2")
    host = fs.host()
    vmd, disk = PciAddress.parse("0000:00:0e.0"), PciAddress.parse("10000:e1:00.0")
    assert host.pci_addresses() == [vmd, disk]
    assert host.group_members(4) == [vmd, disk]
    listed = {d.pci_address: d for d in discovery.discover(host, all_devices=True)}
    assert listed["0000:00:0e.0"].iommu_group_members == ("0000:00:0e.0", "10000:e1:00.0")
    assert "backs /" in listed["10000:e1:00.0"].host_critical
    with pytest.raises(IOMMUGroupConflict, match=r"10000:e1:00\.0, bound to nvme"):
        guard.plan_groups(host, [vmd], include_group=False)


@pytest.mark.parametrize(
    ("bridge_driver", "conflict"), [("shpchp", True), ("pcieport", False), (None, False)]
)
def test_a_bridge_in_the_group_is_judged_by_its_driver(
    tmp_path: Path, bridge_driver: str | None, conflict: bool
) -> None:
    """The kernel judges a group's viability by each member's driver, bridges included: shpchp owns DMA,
    pcieport and no driver do not. Attach plans and ListAvailable blockers use that one rule."""
    fs = FakeSys(tmp_path)
    fs.pci(
        "0000:00:1e.0", vendor="8086", device="244e", cls="0x060400", driver=bridge_driver, group=6, header=1
    )
    fs.pci("0000:05:00.0", parent="0000:00:1e.0", vendor="1234", device="11e8", cls="0x00ff00", group=6)
    host = fs.host()
    edu = PciAddress.parse("0000:05:00.0")
    (listed,) = [d for d in discovery.discover(host, all_devices=True) if d.pci_address == str(edu)]
    if conflict:
        with pytest.raises(IOMMUGroupConflict, match=r"0000:00:1e\.0, bound to shpchp"):
            guard.plan_groups(host, [edu], include_group=False)
        assert any("0000:00:1e.0 (shpchp)" in b for b in listed.blockers)
    else:
        (plan,) = guard.plan_groups(host, [edu], include_group=False)
        assert plan.to_bind == [edu] and listed.passthrough_ready
