"""Records become a{sv} with the contract's types: the fast path of `variants.record` must type every
value exactly as the general rules (`_typed`) do, including the cases it hands over to them."""

from __future__ import annotations

from pathlib import Path

from dbus_fast import Variant

from vfiod.bus import variants
from vfiod.core.discovery import discover
from vfiod_sim.simulation import Simulation


def _by_rules(rec: dict[str, object]) -> dict[str, Variant]:
    return {key: variants._variant(key, value) for key, value in rec.items()}


EDGE_CASES: dict[str, object] = {
    "pci_address": "0000:01:00.0",
    "object_path": "/org/hypeman/Devices1/devices/gpu_2d0",
    "passthrough_ready": True,
    "iommu_group": 7,
    "numa_node": -1,
    "sriov_totalvfs": 0,
    "x_nv_gpudirect_clique": 3,
    "odd_negative": -5,  # an unsigned key that is negative goes to the rules (sent as i, with a warning)
    "virtfns": ["0000:01:00.1", "0000:01:00.2"],
    "mdev_types": [],
    "claims": [],
    "iommu_group_members": ("0000:01:00.0",),  # a tuple goes to the rules
    "tags": {"team": "ml"},
    "vgpu": {"type_id": 5, "name": "GRID A100-1-5C"},
    "nothing": None,
    "ratio": 0.5,
}


def test_the_fast_path_types_edge_cases_as_the_rules_do() -> None:
    fast = variants.record(EDGE_CASES)
    slow = _by_rules(EDGE_CASES)
    assert {k: v.signature for k, v in fast.items()} == {k: v.signature for k, v in slow.items()}
    assert fast == slow
    assert fast["object_path"].signature == "o"
    assert fast["numa_node"].signature == "i" and fast["sriov_totalvfs"].signature == "u"
    assert fast["claims"].signature == "aa{sv}" and fast["mdev_types"].signature == "as"


def test_every_listed_function_is_typed_as_the_rules_do(tmp_path: Path) -> None:
    sim = Simulation.open(tmp_path / "host", "dgx-h100")
    recs = [d.to_record() for d in discover(sim.host, all_devices=True)]
    assert len(recs) > 50
    for rec in recs:
        assert variants.record(rec) == _by_rules(rec)
