"""Placement and capacity on `a40-mdev` (two A40s, 32 VFs each, one vGPU per VF, 48 GiB per GPU, one size per
GPU): ListProfiles counts what the GPUs' framebuffer still holds, AttachVGPU takes the GPU with the most free
framebuffer, concurrent AttachVGPUs never over-commit a GPU, and a pinned physical GPU is honoured."""

from __future__ import annotations

from collections import Counter
from typing import cast

import pytest

from tests.core.support.vgpus import attach_vgpus_concurrently
from tests.core.support.worlds import HM, MakeEnv
from vfiod.core.errors import NoCapacity

PF_A, PF_B = "0000:a2:00.0", "0000:b3:00.0"
Q4, Q8 = "NVIDIA A40-4Q", "NVIDIA A40-8Q"


def gpu_of_vgpu(parent: str) -> str:
    return PF_A if parent.startswith("0000:a2:") else PF_B


def test_profiles_count_what_the_framebuffer_holds(env: MakeEnv) -> None:
    e = env("a40-mdev")
    m = e.manager
    got = {p.name: p for p in m.list_profiles()}
    assert (got[Q4].available, got[Q4].framebuffer_mb, len(got[Q4].parents)) == (24, 4096, 64)  # 12 per GPU
    assert got["NVIDIA A40-48Q"].available == 2
    m.attach_vgpu(HM, "vm1", Q4)
    got = {p.name: p for p in m.list_profiles()}
    assert (got[Q4].available, got[Q8].available) == (23, 6)  # homogeneous: the used GPU takes only 4Q now


def test_least_loaded_gpu_first_and_pins(env: MakeEnv) -> None:
    e = env("a40-mdev")
    m = e.manager
    m.attach_vgpu(HM, "vm1", Q4)
    m.attach_vgpu(HM, "vm2", Q4)
    parents = {v.instance_id: v.parent for v in m.list_vgpus()}
    assert {gpu_of_vgpu(parents["vm1"]), gpu_of_vgpu(parents["vm2"])} == {PF_A, PF_B}  # spread
    m.detach(HM, "vm2")
    other = PF_B if gpu_of_vgpu(parents["vm1"]) == PF_A else PF_A
    m.attach_vgpu(HM, "vm3", Q8)  # only the other GPU can take an 8Q (one size per GPU)
    assert gpu_of_vgpu({v.instance_id: v.parent for v in m.list_vgpus()}["vm3"]) == other
    with pytest.raises(NoCapacity, match=other):  # pinned to the 8Q GPU, a 4Q does not fit
        m.attach_vgpu(HM, "vm4", Q4, parent=other)
    m.attach_vgpu(HM, "vm4", Q4, parent=gpu_of_vgpu(parents["vm1"]))


def test_concurrent_attaches_never_over_commit(env: MakeEnv) -> None:
    e = env("a40-mdev")
    m = e.manager
    assert attach_vgpus_concurrently(m, Q4, 30) == {"ok": 24, "NoCapacity": 6}
    per_gpu = Counter(gpu_of_vgpu(v.parent) for v in m.list_vgpus())
    assert per_gpu == {PF_A: 12, PF_B: 12}
    assert len({v.parent for v in m.list_vgpus()}) == 24  # one per VF
    assert m.registry.open_intents() == []


def test_a_vgpu_parent_vf_is_not_a_passthrough_candidate(env: MakeEnv) -> None:
    e = env("a40-mdev")
    listed = {d.pci_address: d for d in e.manager.list_available()}
    vf = listed["0000:a2:00.4"]
    assert not vf.passthrough_ready and any("vGPU parent" in b for b in vf.blockers)
    assert len(vf.mdev_types) == 7


def test_a_gpu_with_a_quarantined_vf_comes_last(env: MakeEnv) -> None:
    e = env("a40-mdev")
    m = e.manager
    for _ in range(2):
        m.registry.record_parent_failure("0000:a2:00.4", "create failed: EIO")
    m.attach_vgpu(HM, "vm1", Q4)
    m.attach_vgpu(HM, "vm2", Q4)  # the other GPU has less free framebuffer now, and is still first
    assert {gpu_of_vgpu(v.parent) for v in m.list_vgpus()} == {PF_B}
    assert {p.name: p.available for p in m.list_profiles()}[
        Q4
    ] == 12 + 10  # A: 31 usable VFs, 12 fit; B: 10 more


def test_host_status_counts_vgpu_slots(env: MakeEnv) -> None:
    e = env("a40-mdev")
    m = e.manager
    status = m.host_status()
    assert (status["gpu_mode"], status["vgpu_parents"], status["vgpu_slots_total"]) == ("vgpu", 64, 64)
    assert status["gpu_slots_total"] == 0  # the A40s have VFs enabled (not passable); the VFs are vGPU slots
    assert (status["vgpu_slots_used"], status["vgpu_slots_allocatable"], status["quarantined"]) == (0, 64, [])
    m.attach_vgpu(HM, "vm1", Q4)
    for _ in range(2):
        m.registry.record_parent_failure("0000:b3:00.4", "create failed: EIO")
    status = m.host_status()
    # the 4Q GPU takes 11 more 4Q; the other 31 more 1Q on its VFs that are not quarantined
    assert (status["vgpu_slots_used"], status["vgpu_slots_allocatable"]) == (1, 11 + 31)
    (quarantined,) = cast(list[str], status["quarantined"])
    assert (
        quarantined.startswith("0000:b3:00.4: 2 failures in a row since ")
        and "create failed: EIO" in quarantined
    )
