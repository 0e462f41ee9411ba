"""The simulated kernel's write rules, exercised through `Host` the way vfiod uses them: each errno of
driver_override, bind, unbind, drivers_probe, remove/rescan, new_id/remove_id and vtconsole bind, the
side effects of binding, group viability and the single-opener rule, module load/unload, hot-plug, node
ownership, the trace and the uevents."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import SimFactory, SimHost
from tests.machines import HDA, IGPU, L4, L4_AUDIO, NIC, NVIDIA, VFIO
from vfiod.host.backend import VFIO_GROUP_FLAGS_VIABLE, NodeOwner
from vfiod.host.errors import SysfsWriteError
from vfiod.host.pciaddr import DriverName, PciAddress
from vfiod.host.pcifunction import read_function
from vfiod_sim import processes

ROOT_PORT = PciAddress.parse("0000:00:01.0")
NVME = PciAddress.parse("0000:01:00.0")
PCIEPORT = DriverName.parse("pcieport")
L4_GROUP = 7


def errname(e: pytest.ExceptionInfo[SysfsWriteError]) -> str:
    return e.value.errname


def write(sh: SimHost, logical: str, data: bytes) -> None:
    sh.kernel.write_attribute(sh.host.from_logical(logical), data)


def to_vfio(sh: SimHost, *addrs: PciAddress) -> None:
    """What vfiod's binder does: override, unbind, drivers_probe."""
    for addr in addrs:
        native = sh.host.driver(addr)
        sh.host.set_driver_override(addr, VFIO)
        if native is not None:
            sh.host.unbind(addr, native)
        sh.host.probe(addr)


# ----- opening the attribute ----------------------------------------------------------------------------


def test_missing_attribute_is_enoent_and_directory_is_eisdir(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(FileNotFoundError):
        write(sh, "/sys/bus/pci/drivers/nouveau/bind", str(L4).encode())  # nouveau is not loaded
    assert not (sh.root / "sys/bus/pci/drivers/nouveau").exists()  # and nothing was created
    with pytest.raises(IsADirectoryError):
        write(sh, f"/sys/bus/pci/devices/{L4}", b"1")
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, DriverName.parse("nouveau"))
    assert errname(e) == "ENOENT"


def test_read_only_attributes_refuse_writes(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(PermissionError):
        write(sh, f"/sys/bus/pci/devices/{L4}/vendor", b"0x1002")
    assert sh.host.attr(L4, "vendor") == "0x10de"


def test_paths_outside_the_tree_are_never_written(sim: SimFactory, tmp_path: Path) -> None:
    sh = sim(idle=True)
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    with pytest.raises(PermissionError):
        sh.kernel.write_attribute(outside, b"x")
    with pytest.raises(PermissionError):
        sh.kernel.write_attribute(Path("/sys/bus/pci/drivers_probe"), str(L4).encode())
    assert outside.read_text() == "untouched"


def test_zero_length_write_is_a_no_op_everywhere(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.host.set_driver_override(L4, VFIO)
    write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"")
    write(sh, "/sys/bus/pci/drivers/nvidia/unbind", b"")
    assert sh.host.driver_override(L4) == "vfio-pci"
    assert sh.host.driver(L4) == "nvidia"


# ----- driver_override ----------------------------------------------------------------------------------


def test_driver_override_set_cut_at_newline_and_cleared(sim: SimFactory) -> None:
    sh = sim(idle=True)
    assert sh.host.attr(L4, "driver_override") == "(null)"
    write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"vfio-pci\ngarbage")
    assert sh.host.attr(L4, "driver_override") == "vfio-pci"
    sh.host.set_driver_override(L4, None)  # "\n" clears
    assert sh.host.attr(L4, "driver_override") == "(null)"
    write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"nvidia\0tail")  # strlen stops at the NUL
    assert sh.host.driver_override(L4) == "nvidia"
    write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"\0")
    assert sh.host.driver_override(L4) is None
    # setting an override neither unbinds nor probes
    assert sh.host.driver(L4) == "nvidia"


def test_driver_override_too_long_is_einval(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(OSError) as e:
        write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"x" * 4095)
    assert e.value.errno == errno.EINVAL
    write(sh, f"/sys/bus/pci/devices/{L4}/driver_override", b"x" * 4094)
    assert sh.host.driver_override(L4) == "x" * 4094


# ----- bind ---------------------------------------------------------------------------------------------


def test_bind_errors(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(PciAddress.parse("0000:99:00.0"), NVIDIA)
    assert errname(e) == "ENODEV"  # no such device
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, NVIDIA)
    assert errname(e) == "EBUSY"  # already bound (to nvidia)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, VFIO)
    assert errname(e) == "ENODEV"  # vfio-pci's table matches nothing without an override
    with pytest.raises(OSError) as oe:
        write(sh, "/sys/bus/pci/drivers/nvidia/bind", b"0000:A2:00.0")  # names compare exactly
    assert oe.value.errno == errno.ENODEV
    sh.host.set_driver_override(L4, VFIO)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, VFIO)
    assert errname(e) == "EBUSY"  # matches now, but nvidia still has it
    sh.host.unbind(L4, NVIDIA)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, HDA)
    assert errname(e) == "ENODEV"  # with an override only the named driver matches
    sh.host.bind(L4, VFIO)
    assert sh.host.driver(L4) == "vfio-pci"


def test_bind_accepts_one_trailing_newline(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.host.unbind(L4, NVIDIA)
    with pytest.raises(OSError):
        write(sh, "/sys/bus/pci/drivers/nvidia/bind", f"{L4}\n\n".encode())
    write(sh, "/sys/bus/pci/drivers/nvidia/bind", f"{L4}\n".encode())
    assert sh.host.driver(L4) == "nvidia"


def test_vfio_pci_refuses_bridges(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.host.set_driver_override(ROOT_PORT, VFIO)
    sh.host.unbind(ROOT_PORT, PCIEPORT)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(ROOT_PORT, VFIO)
    assert errname(e) == "EINVAL"
    sh.host.probe(ROOT_PORT)  # drivers_probe still succeeds, binding nothing
    assert sh.host.driver(ROOT_PORT) is None


def test_vfio_pci_refuses_devices_without_an_iommu_group(sim: SimFactory) -> None:
    sh = sim("no-iommu", idle=True)
    assert sh.host.iommu_group(L4) is None
    sh.host.set_driver_override(L4, VFIO)
    sh.host.unbind(L4, NVIDIA)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4, VFIO)
    assert errname(e) == "EINVAL"
    sh.host.probe(L4)
    assert sh.host.driver(L4) is None
    assert not (sh.root / "dev/vfio" / str(L4_GROUP)).exists()


def test_bind_to_vfio_creates_vfio_dev_and_group_node_and_removes_native_nodes(sim: SimFactory) -> None:
    sh = sim(idle=True)
    assert (sh.root / "dev/nvidia0").exists()
    assert sh.host.list_dir(sh.host.device_dir(L4) / "drm") == ["card1", "renderD129"]
    assert (sh.root / "proc/driver/nvidia/gpus" / L4 / "information").exists()
    to_vfio(sh, L4)
    assert sh.host.driver(L4) == "vfio-pci" and sh.host.driver_module(L4) == "vfio_pci"
    assert sh.host.has_vfio_dev(L4)
    assert sh.host.list_dir(sh.host.device_dir(L4) / "vfio-dev") == ["vfio0"]
    node = sh.root / "dev/vfio" / str(L4_GROUP)
    assert node.is_file() and os.stat(node).st_mode & 0o777 == 0o600
    assert not (sh.root / "dev/nvidia0").exists()
    assert not (sh.root / "dev/dri/card1").exists()
    assert not (sh.root / "proc/driver/nvidia/gpus" / L4).exists()
    assert sh.host.attr(L4, "enable") == "0"  # vfio-pci enables the device only when a user opens it
    # the group node goes when the last vfio member leaves
    sh.host.unbind(L4, VFIO)
    assert not node.exists()


def test_unbind_errors(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.unbind(L4, HDA)
    assert errname(e) == "ENODEV"  # bound, but to another driver
    with pytest.raises(SysfsWriteError) as e:
        sh.host.unbind(PciAddress.parse("0000:99:00.0"), NVIDIA)
    assert errname(e) == "ENODEV"
    sh.host.unbind(L4, NVIDIA)
    assert sh.host.driver(L4) is None
    with pytest.raises(SysfsWriteError) as e:
        sh.host.unbind(L4, NVIDIA)
    assert errname(e) == "ENODEV"  # no longer bound


# ----- drivers_probe ------------------------------------------------------------------------------------


def test_drivers_probe_rules(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(SysfsWriteError) as e:
        sh.host.probe(PciAddress.parse("0000:99:00.0"))
    assert errname(e) == "ENODEV"
    sh.host.probe(L4)  # already bound: success, nothing changes
    assert sh.host.driver(L4) == "nvidia"
    # no override: the first loaded driver whose table matches
    sh.host.unbind(L4, NVIDIA)
    sh.host.probe(L4)
    assert sh.host.driver(L4) == "nvidia"
    # override naming a driver that is not loaded: nothing binds, still success
    sh.host.unbind(L4, NVIDIA)
    sh.host.set_driver_override(L4, DriverName.parse("nouveau"))
    sh.host.probe(L4)
    assert sh.host.driver(L4) is None
    # clearing the override lets the id tables decide again
    sh.host.set_driver_override(L4, None)
    sh.host.probe(L4)
    assert sh.host.driver(L4) == "nvidia"


def test_drivers_probe_binds_nothing_when_no_driver_matches(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    edu = PciAddress.parse("0000:00:07.0")
    assert sh.host.driver(edu) is None
    sh.host.probe(edu)
    assert sh.host.driver(edu) is None


def test_pcie_pci_bridge_is_refused_by_pcieport(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    bridge = PciAddress.parse("0000:01:00.0")
    assert sh.host.driver(bridge) is None
    sh.host.probe(bridge)
    assert sh.host.driver(bridge) is None
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(bridge, PCIEPORT)
    assert errname(e) == "ENODEV"


def test_module_options_prebind_vfio_pci_at_boot(tmp_path: Path) -> None:
    from vfiod.host.host import Host, HostRoots
    from vfiod_sim import build, get_profile

    prof = get_profile("workstation-l4")
    prof = type(prof).from_dict(
        {
            **prof.to_dict(),
            "etc_files": {"modprobe.d/vfio.conf": "options vfio-pci ids=10de:27b8,10de:22bc\n"},
        }
    )
    # vfio_pci loads before nvidia here, as a `softdep nvidia pre: vfio-pci` makes it
    mods = [m for m in prof.modules if m.name in ("vfio", "vfio_pci_core", "vfio_pci")]
    prof = type(prof).from_dict(
        {
            **prof.to_dict(),
            "modules": [m.to_dict() for m in mods + [m for m in prof.modules if m not in mods]],
        }
    )
    kernel = build(tmp_path / "r", prof)
    host = Host(HostRoots.under(tmp_path / "r"), backend=kernel)
    assert host.driver(L4) == "vfio-pci" and host.driver(L4_AUDIO) == "vfio-pci"
    assert host.driver_override(L4) is None
    assert (tmp_path / "r/dev/vfio" / str(L4_GROUP)).exists()
    # and drivers_probe after an unbind goes back to vfio-pci (its dynamic id matches first)
    host.unbind(L4, VFIO)
    host.probe(L4)
    assert host.driver(L4) == "vfio-pci"


def test_new_id_binds_matching_devices_and_remove_id(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    sh.kernel.load_module("vfio_pci")  # not loaded at boot in the e2e guest: `modprobe vfio-pci`
    edu = PciAddress.parse("0000:00:07.0")
    edu2 = PciAddress.parse("0000:02:02.0")
    write(sh, "/sys/bus/pci/drivers/vfio-pci/new_id", b"1234 11e8")
    assert sh.host.driver(edu) == "vfio-pci" and sh.host.driver(edu2) == "vfio-pci"
    with pytest.raises(OSError) as e:
        write(sh, "/sys/bus/pci/drivers/vfio-pci/new_id", b"1234 11e8")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        write(sh, "/sys/bus/pci/drivers/vfio-pci/new_id", b"1234:11e8")
    assert e.value.errno == errno.EINVAL
    write(sh, "/sys/bus/pci/drivers/vfio-pci/remove_id", b"1234 11e8")
    with pytest.raises(OSError) as e:
        write(sh, "/sys/bus/pci/drivers/vfio-pci/remove_id", b"1234 11e8")
    assert e.value.errno == errno.ENODEV
    sh.host.unbind(edu, VFIO)
    sh.host.probe(edu)
    assert sh.host.driver(edu) is None


# ----- remove, rescan, hot-plug -------------------------------------------------------------------------


def test_remove_and_rescan(sim: SimFactory) -> None:
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    with pytest.raises(OSError) as e:
        write(sh, f"/sys/bus/pci/devices/{L4}/remove", b"yes")
    assert e.value.errno == errno.EINVAL
    write(sh, f"/sys/bus/pci/devices/{L4}/remove", b"0")  # zero: nothing
    assert sh.host.device_exists(L4)
    write(sh, f"/sys/bus/pci/devices/{ROOT_PORT}/remove", b"1\n")  # the bridge and all behind it
    for addr in (ROOT_PORT, L4, L4_AUDIO):
        assert not sh.host.device_exists(addr)
        assert not (sh.root / "sys/bus/pci/devices" / addr).is_symlink()
    assert L4_GROUP not in sh.host.iommu_groups()
    assert not (sh.root / "dev/vfio" / str(L4_GROUP)).exists()
    assert not (sh.root / "sys/bus/pci/drivers/vfio-pci" / L4).is_symlink()
    write(sh, "/sys/bus/pci/rescan", b"1")
    # back as fresh devices: no override, probed onto their native drivers
    assert [sh.host.driver(a) for a in (ROOT_PORT, L4, L4_AUDIO)] == ["pcieport", "nvidia", "snd_hda_intel"]
    assert sh.host.driver_override(L4) is None
    assert sh.host.group_members(L4_GROUP) == [L4, L4_AUDIO]


def test_unplug_replug_and_replace_card(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.kernel.unplug(L4)
    assert not sh.host.device_exists(L4) and sh.host.device_exists(L4_AUDIO)
    write(sh, "/sys/bus/pci/rescan", b"1")  # a rescan does not bring back an empty slot
    assert not sh.host.device_exists(L4)
    sh.kernel.replug(L4)
    assert sh.host.driver(L4) == "nvidia"
    sh.kernel.replace_card(L4, vendor="1002", device="744c", class_code="030000")
    assert (read_function(sh.host, L4).vendor, read_function(sh.host, L4).device) == ("1002", "744c")
    assert read_function(sh.host, L4).subsystem_vendor == "1002"
    assert sh.host.driver(L4) is None  # amdgpu is not in this profile's loaded modules
    with open(sh.host.device_dir(L4) / "config", "rb") as f:
        cfg = f.read()
    assert cfg[0:4] == bytes.fromhex("02104c74")


# ----- groups: viability and the single opener ---------------------------------------------------------


def test_group_status_viability_is_judged_by_driver(sim: SimFactory) -> None:
    sh = sim(idle=True)
    node = sh.host.vfio_group_node(L4_GROUP)
    with pytest.raises(FileNotFoundError):
        sh.host.group_status(L4_GROUP)
    to_vfio(sh, L4)
    assert node.exists()
    assert sh.host.group_status(L4_GROUP) == 0  # the audio function is still on snd_hda_intel
    sh.host.unbind(L4_AUDIO, HDA)
    assert sh.host.group_status(L4_GROUP) == VFIO_GROUP_FLAGS_VIABLE  # driverless does not block
    to_vfio(sh, L4_AUDIO)
    assert sh.host.group_status(L4_GROUP) == VFIO_GROUP_FLAGS_VIABLE


def test_group_with_bridge_and_pcieport_is_viable(sim: SimFactory) -> None:
    sh = sim("qemu-q35")
    sh.kernel.load_module("vfio_pci")  # not loaded at boot in the e2e guest: `modprobe vfio-pci`
    e1000 = PciAddress.parse("0000:02:01.0")
    to_vfio(sh, e1000)
    # group 12 also holds the driverless pcie-pci-bridge and edu
    assert sh.host.group_status(12) == VFIO_GROUP_FLAGS_VIABLE


def test_group_node_has_a_single_opener(sim: SimFactory) -> None:
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    pid = processes.add_process(
        sh.root, exe="/usr/bin/qemu-system-x86_64", uid=1000, fds=[f"/dev/vfio/{L4_GROUP}"]
    )
    with pytest.raises(OSError) as e:
        sh.host.group_status(L4_GROUP)
    assert e.value.errno == errno.EBUSY
    processes.remove_process(sh.root, pid)
    assert sh.host.group_status(L4_GROUP) == VFIO_GROUP_FLAGS_VIABLE


def test_dma_owning_driver_cannot_bind_into_a_group_a_vmm_owns(sim: SimFactory) -> None:
    sh = sim(idle=True)
    to_vfio(sh, L4)
    sh.host.unbind(L4_AUDIO, HDA)
    pid = processes.add_process(sh.root, exe="/usr/bin/qemu-system-x86_64", fds=[f"/dev/vfio/{L4_GROUP}"])
    with pytest.raises(SysfsWriteError) as e:
        sh.host.bind(L4_AUDIO, HDA)
    assert errname(e) == "EBUSY"
    with pytest.raises(SysfsWriteError) as e:
        sh.host.probe(L4_AUDIO)
    assert errname(e) == "EINVAL"  # drivers_probe_store reports a core error as EINVAL
    processes.remove_process(sh.root, pid)
    sh.host.bind(L4_AUDIO, HDA)


def test_unbinding_a_vfio_device_in_use_waits_for_the_user(sim: SimFactory) -> None:
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    pid = processes.add_process(sh.root, exe="/usr/bin/qemu-system-x86_64", fds=[f"/dev/vfio/{L4_GROUP}"])
    done = threading.Event()

    def unbind() -> None:
        write(sh, "/sys/bus/pci/drivers/vfio-pci/unbind", str(L4).encode())
        done.set()

    t = threading.Thread(target=unbind, daemon=True)
    t.start()
    assert sh.kernel.wait_blocked(L4, 2.0)
    assert not done.is_set() and sh.host.driver(L4) == "vfio-pci"
    processes.remove_process(sh.root, pid)
    assert done.wait(2.0)
    assert sh.host.driver(L4) is None and sh.kernel.blocked() == []


# ----- modules ------------------------------------------------------------------------------------------


def test_load_and_unload_modules(sim: SimFactory) -> None:
    sh = sim(idle=True)
    with pytest.raises(OSError) as e:
        sh.kernel.unload_module("vfio")
    assert e.value.errno == errno.EBUSY  # vfio_pci_core and vfio_pci use it
    sh.kernel.unload_module("vfio_pci")
    assert not sh.host.driver_loaded(VFIO) and not sh.host.module_loaded("vfio_pci")
    assert "vfio_pci " not in (sh.host.read_text(sh.root / "proc/modules") or "")
    with pytest.raises(FileNotFoundError):
        sh.kernel.load_module("no_such_module")
    # an override set while the driver was absent is honoured when it loads (driver_attach)
    sh.host.set_driver_override(L4_AUDIO, VFIO)
    sh.host.unbind(L4_AUDIO, HDA)
    sh.kernel.load_module("vfio-pci")
    assert sh.host.driver(L4_AUDIO) == "vfio-pci"
    # unloading a PCI driver's module unbinds its devices (pci_unregister_driver)
    sh.kernel.unload_module("e1000e")
    assert sh.host.driver(NIC) is None and not (sh.root / "sys/class/net/eno1").exists()
    sh.kernel.load_module("e1000e")
    assert sh.host.driver(NIC) == "e1000e" and (sh.root / "sys/class/net/eno1").is_symlink()


def test_module_held_open_cannot_be_unloaded(sim: SimFactory) -> None:
    sh = sim(idle=True)
    processes.stop_unit(sh.root, "nvidia-persistenced.service")
    with pytest.raises(OSError) as e:
        sh.kernel.unload_module("nvidia")
    assert e.value.errno == errno.EBUSY  # nvidia_modeset and nvidia_uvm depend on it
    sh.kernel.unload_module("nvidia_uvm")
    assert not (sh.root / "dev/nvidia-uvm").exists()
    sh.kernel.unload_module("nvidia_drm")
    assert not (sh.root / "dev/dri/card1").exists() and (sh.root / "dev/nvidia0").exists()
    sh.kernel.load_module("nvidia_drm")
    assert (sh.root / "dev/dri/card1").exists()


# ----- console ------------------------------------------------------------------------------------------


def test_vtconsole_bind(sim: SimFactory) -> None:
    sh = sim(idle=True)
    vt = sh.root / "sys/class/vtconsole"
    assert sh.host.read_text(vt / "vtcon1/name") == "(M) frame buffer device"
    assert (sh.host.read_text(vt / "vtcon0/bind"), sh.host.read_text(vt / "vtcon1/bind")) == ("0", "1")
    fb0 = (sh.root / "sys/class/graphics/fb0/device").resolve()
    assert fb0.name == IGPU
    write(sh, "/sys/class/vtconsole/vtcon1/bind", b"0\n")
    assert (sh.host.read_text(vt / "vtcon0/bind"), sh.host.read_text(vt / "vtcon1/bind")) == ("1", "0")
    # an admin's unbind sticks across the frame buffer going and coming back
    sh.host.unbind(IGPU, DriverName.parse("i915"))
    sh.host.probe(IGPU)
    assert sh.host.read_text(vt / "vtcon1/bind") == "0"
    write(sh, "/sys/class/vtconsole/vtcon1/bind", b"1")
    assert sh.host.read_text(vt / "vtcon1/bind") == "1"


def test_console_follows_the_frame_buffer(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.host.unbind(IGPU, DriverName.parse("i915"))
    assert sh.host.read_text(sh.root / "sys/class/vtconsole/vtcon1/bind") == "0"
    assert not (sh.root / "dev/fb0").exists()
    sh.host.probe(IGPU)
    assert sh.host.read_text(sh.root / "sys/class/vtconsole/vtcon1/bind") == "1"


# ----- ownership, trace, uevents ------------------------------------------------------------------------


def test_node_owner_as_root_and_reset_when_the_node_is_recreated(sim: SimFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    sh.host.set_node_owner(L4_GROUP, NodeOwner(uid=1000, gid=1000, mode=0o660))
    assert sh.host.node_owner(L4_GROUP) == NodeOwner(1000, 1000, 0o660)
    st = os.stat(sh.host.vfio_group_node(L4_GROUP))
    assert (st.st_uid, st.st_mode & 0o777) == (1000, 0o660)
    for addr in (L4, L4_AUDIO):
        sh.host.unbind(addr, VFIO)
    with pytest.raises(FileNotFoundError):
        sh.host.node_owner(L4_GROUP)
    with pytest.raises(FileNotFoundError):
        sh.host.set_node_owner(L4_GROUP, NodeOwner(1000, 1000, 0o660))
    for addr in (L4, L4_AUDIO):
        sh.host.probe(addr)
    assert sh.host.node_owner(L4_GROUP) == NodeOwner(0, 0, 0o600)


def test_node_owner_is_recorded_when_not_root(sim: SimFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the kernel checks os.geteuid() at each call
    assert sh.host.node_owner(L4_GROUP) == NodeOwner(0, 0, 0o600)
    sh.host.set_node_owner(L4_GROUP, NodeOwner(uid=1000, gid=100, mode=0o600))
    assert sh.host.node_owner(L4_GROUP) == NodeOwner(1000, 100, 0o600)
    assert os.stat(sh.host.vfio_group_node(L4_GROUP)).st_uid == os.getuid()  # the file itself untouched
    sh.host.unbind(L4, VFIO)
    sh.host.unbind(L4_AUDIO, VFIO)
    sh.host.probe(L4)
    assert sh.host.node_owner(L4_GROUP) == NodeOwner(0, 0, 0o600)  # recreated root:root 0600


def test_trace_and_uevents(sim: SimFactory) -> None:
    sh = sim(idle=True)
    sh.host.set_driver_override(L4, VFIO)
    sh.host.unbind(L4, NVIDIA)
    sh.host.probe(L4)
    with pytest.raises(SysfsWriteError):
        sh.host.unbind(L4, NVIDIA)
    trace = [(t["path"], t["value"], t["result"]) for t in sh.kernel.trace()]
    assert trace == [
        (f"/sys/bus/pci/devices/{L4}/driver_override", "vfio-pci", "ok"),
        ("/sys/bus/pci/drivers/nvidia/unbind", str(L4), "ok"),
        ("/sys/bus/pci/drivers_probe", str(L4), "ok"),
        ("/sys/bus/pci/drivers/nvidia/unbind", str(L4), "ENODEV"),
    ]
    assert sh.kernel.trace()[0]["resolved"] == f"/sys/devices/pci0000:00/{ROOT_PORT}/{L4}/driver_override"
    events = sh.kernel.uevents()
    assert [(e["action"], e["subsystem"], e["driver"]) for e in events] == [
        ("unbind", "pci", None),
        ("add", "vfio", None),  # the group's node comes with its first VFIO device, before the bind
        ("bind", "pci", "vfio-pci"),
    ]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[1]["devpath"] == f"/devices/virtual/vfio/{L4_GROUP}"
    assert events[2] | {"ts": 0} == {
        "seq": 3,
        "action": "bind",
        "devpath": f"/devices/pci0000:00/{ROOT_PORT}/{L4}",
        "subsystem": "pci",
        "driver": "vfio-pci",
        "pci_address": str(L4),
        "ts": 0,
    }
    write(sh, f"/sys/bus/pci/devices/{L4}/uevent", b"change")
    assert sh.kernel.uevents()[-1]["action"] == "change"
    with pytest.raises(OSError):
        write(sh, f"/sys/bus/pci/devices/{L4}/uevent", b"explode")


def test_hugepages_and_autoprobe(sim: SimFactory) -> None:
    sh = sim(idle=True)
    write(sh, "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", b"512\n")
    assert sh.host.read_text(sh.root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "512"
    write(sh, "/sys/bus/pci/drivers_autoprobe", b"0")
    write(sh, f"/sys/bus/pci/devices/{NIC}/remove", b"1")
    write(sh, "/sys/bus/pci/rescan", b"1")
    assert sh.host.device_exists(NIC) and sh.host.driver(NIC) is None  # added, not probed
    sh.host.probe(NIC)  # an explicit drivers_probe still probes
    assert sh.host.driver(NIC) == "e1000e"


def test_the_group_nodes_class_device_comes_and_goes_with_the_group(sim: SimFactory) -> None:
    """/devices/virtual/vfio/<n>: `add` with the group's first VFIO device, `remove` with its last (the
    uevents udev applies its /dev/vfio/<n> rules on); the second member binds and the first leaves
    without one."""
    sh = sim(idle=True)
    to_vfio(sh, L4, L4_AUDIO)
    for addr in (L4, L4_AUDIO):
        sh.host.set_driver_override(addr, None)
        sh.host.unbind(addr, VFIO)
    vfio = [(e["action"], e["devpath"]) for e in sh.kernel.uevents() if e["subsystem"] == "vfio"]
    node = f"/devices/virtual/vfio/{L4_GROUP}"
    assert vfio == [("add", node), ("remove", node)]
