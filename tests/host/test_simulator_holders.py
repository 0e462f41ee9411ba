"""The simulated kernel's holders beyond open nodes: a VFIO device file keeps its group's file open (the
group node answers EBUSY and an unbind of the device waits, drivers/vfio/group.c vfio_group_fops_open and
vfio_unregister_group_dev), and an open sound card file makes snd_hda_intel's unbind wait (snd_card_free)."""

from __future__ import annotations

import errno
import threading

import pytest

from tests.conftest import SimFactory, SimHost
from tests.machines import L4, L4_AUDIO
from vfiod.host.pciaddr import DriverName
from vfiod.host.pcifunction import read_function
from vfiod_sim import processes

L4_GROUP = 7
VFIO = DriverName.parse("vfio-pci")


def unbind_waits_for(sh: SimHost, driver: str, addr: object, pid: int) -> None:
    """An unbind of `addr` from `driver` blocks until process `pid` exits, then completes."""
    done = threading.Event()

    def unbind() -> None:
        sh.kernel.write_attribute(
            sh.host.from_logical(f"/sys/bus/pci/drivers/{driver}/unbind"), str(addr).encode()
        )
        done.set()

    threading.Thread(target=unbind, daemon=True).start()
    assert sh.kernel.wait_blocked(str(addr), 2.0)
    assert not done.is_set()
    processes.remove_process(sh.root, pid)
    assert done.wait(2.0)
    assert sh.host.driver(addr) is None  # type: ignore[arg-type]


def test_a_device_file_keeps_the_group_open(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.kernel.load_module("vfio_pci")
    for addr in (L4, L4_AUDIO):
        native = sh.host.driver(addr)
        sh.host.set_driver_override(addr, VFIO)
        if native is not None:
            sh.host.unbind(addr, DriverName.parse(native))
        sh.host.probe(addr)
    pid = processes.add_process(sh.root, exe="/usr/bin/qemu-system-x86_64")
    processes.open_vfio_device(sh.root, pid, str(L4))
    assert "anon_inode:[vfio-device]" in processes.open_files(sh.root)[pid]
    with pytest.raises(OSError) as e:
        sh.host.group_status(L4_GROUP)
    assert e.value.errno == errno.EBUSY
    unbind_waits_for(sh, "vfio-pci", L4, pid)
    sh.host.group_status(L4_GROUP)  # closed with the process: the group opens again


def test_an_open_sound_card_makes_the_audio_unbind_wait(sim: SimFactory) -> None:
    sh = sim(idle=True)
    (card,) = [c for c in sh.host.list_dir(sh.host.device_dir(L4_AUDIO) / "sound") if c.startswith("card")]
    n = card[4:]
    assert sh.host.list_dir(sh.host.device_dir(L4_AUDIO) / "sound" / card).count(f"controlC{n}") == 1
    assert read_function(sh.host, L4_AUDIO).driver == "snd_hda_intel"
    pid = processes.add_process(sh.root, exe="/usr/bin/pipewire", fds=[f"/dev/snd/controlC{n}"])
    unbind_waits_for(sh, "snd_hda_intel", L4_AUDIO, pid)
