"""Holders the /proc scan alone misses or misnames: a VMM that closed its group fd and kept only a VFIO
device file (the kernel still has the group open: DeviceBusy, nothing written, no `stuck`), and a sound
server holding the GPU's HDMI audio card (snd_card_free would wait: DeviceBusy naming it)."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import HM, MakeEnv, drivers
from tests.machines import L4, L4_AUDIO
from vfiod.core.errors import DeviceBusy
from vfiod_sim import processes


def test_a_kept_device_file_makes_detach_refuse_without_writing(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    group = e.host.iommu_group(L4) or 0
    # cloud-hypervisor got the device file, then closed the group fd: /proc shows only the anon inode
    pid = processes.add_process(e.root, exe="/usr/bin/cloud-hypervisor", uid=1000)
    processes.open_vfio_device(e.root, pid, str(L4))
    assert f"/dev/vfio/{group}" not in processes.open_files(e.root)[pid]
    before = len(e.writes)
    with pytest.raises(DeviceBusy) as err:
        m.detach(HM, "vm1")
    assert f"/dev/vfio/{group} is held open in the kernel" in err.value.message
    assert (pid, "/usr/bin/cloud-hypervisor") in err.value.holders
    assert len(e.writes) == before  # nothing written: no unbind left to time out into `stuck`
    assert m.get_device("l4-gpu").state == "attached" and drivers(e, L4) == ["vfio-pci"]
    processes.remove_process(e.root, pid)
    m.detach(HM, "vm1")
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]


def test_a_held_sound_card_makes_attach_refuse_naming_the_holder(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4-gpu")
    (card,) = [c for c in e.host.list_dir(e.host.device_dir(L4_AUDIO) / "sound") if c.startswith("card")]
    node = f"/dev/snd/controlC{card[4:]}"
    pid = processes.add_process(e.root, exe="/usr/bin/pipewire", uid=1000, fds=[node])
    before = len(e.writes)
    with pytest.raises(DeviceBusy) as err:
        m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert node in err.value.message and (pid, "/usr/bin/pipewire") in err.value.holders
    assert len(e.writes) == before
    assert drivers(e, L4, L4_AUDIO) == ["nvidia", "snd_hda_intel"]
    processes.remove_process(e.root, pid)
    m.attach(HM, "vm1", ["l4-gpu"], include_group=True)
    assert drivers(e, L4, L4_AUDIO) == ["vfio-pci", "vfio-pci"]
