"""ListProfiles and ListVGPUs on `mdev-samples`: the sample types as profiles with what can be created now,
framebuffer sizes from descriptions and NVIDIA names, quarantined parents left out of `available`, and
mdevs vfiod did not create listed as unmanaged."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import Env, MakeEnv
from vfiod.core.errors import InvalidArgument
from vfiod.core.placement import framebuffer_mb
from vfiod.core.records import NO_OWNER

U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def create(e: Env, parent: str, type_id: str, uuid: str) -> None:
    """What an admin (or mdevctl) does behind vfiod's back."""
    e.host.create_mdev(parent, type_id, uuid)


def test_profiles_of_the_samples(env: MakeEnv) -> None:
    e = env("mdev-samples")
    got = {p.type_id: p for p in e.manager.list_profiles()}
    assert sorted(got) == ["mbochs-large", "mbochs-medium", "mbochs-small", "mtty-1", "mtty-2"]
    mtty2, large = got["mtty-2"], got["mbochs-large"]
    assert (mtty2.name, mtty2.framework, mtty2.available, mtty2.parents, mtty2.device_api) == (
        "Dual port serial",
        "mdev",
        12,
        ("mtty",),
        "vfio-pci",
    )
    assert (mtty2.description, mtty2.framebuffer_mb) == ("", 0)
    assert (large.framebuffer_mb, large.available) == (64, 4)
    create(e, "mtty", "mtty-2", U1)
    assert {p.type_id: p.available for p in e.manager.list_profiles("mtty")} == {"mtty-1": 22, "mtty-2": 11}
    assert e.manager.list_profiles("no-such-parent") == []
    with pytest.raises(InvalidArgument):
        e.manager.list_profiles("../mtty")


def test_a_quarantined_parent_offers_nothing(env: MakeEnv) -> None:
    e = env("mdev-samples")
    for _ in range(2):
        e.manager.registry.record_parent_failure("mbochs", "create failed: ENOSPC")
    got = {p.type_id: p for p in e.manager.list_profiles()}
    assert got["mbochs-large"].available == 0 and got["mbochs-large"].parents == ("mbochs",)
    assert got["mtty-1"].available == 24


def test_mdevs_vfiod_did_not_create_are_listed_unmanaged(env: MakeEnv) -> None:
    e = env("mdev-samples")
    assert e.manager.list_vgpus() == []
    create(e, "mtty", "mtty-2", U1)
    (v,) = e.manager.list_vgpus()
    group = e.host.link_name(e.host.mdev_devices_dir / U1 / "iommu_group")
    assert (v.uuid, v.managed, v.id, v.parent, v.type_id, v.profile, v.physical_gpu) == (
        U1,
        False,
        "",
        "mtty",
        "mtty-2",
        "Dual port serial",
        "",
    )
    assert (v.owner_uid, v.instance_id, v.sysfs_path) == (NO_OWNER, "", f"/sys/bus/mdev/devices/{U1}/")
    assert v.vfio_group_path == f"/dev/vfio/{group}" and v.state == "vfio"
    assert e.manager.list_vgpus("vm1") == []


@pytest.mark.parametrize(
    ("name", "description", "mb"),
    [
        ("NVIDIA L40S-4Q", "num_heads=4, frl_config=60, framebuffer=4096M, max_resolution=7680x4320", 4096),
        ("NVIDIA A40-8Q", "", 8192),
        ("mbochs-large", "virtual display, 64 MB video memory", 64),
        ("Dual port serial", "", 0),
    ],
)
def test_framebuffer_sizes(name: str, description: str, mb: int) -> None:
    assert framebuffer_mb(name, description) == mb
