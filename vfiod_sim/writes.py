"""The writable attributes: which operation a write to a path performs (and which device lock it
takes), and the operations themselves, each run on one transaction of the driver core.
"""

from __future__ import annotations

import errno
import posixpath
import re

from vfiod_sim import mdev, sriov, vendor_vgpu
from vfiod_sim.driver_core import Core, Op
from vfiod_sim.model import FBCON, PCI_ANY_ID, CardIdentity, MatchEntry
from vfiod_sim.parsing import kstrtoul, scan_hex, simple_strtoul, streq_form
from vfiod_sim.state import Topology
from vfiod_sim.tree import oserror

PAGE_SIZE = 4096
_DRIVER_ATTR_RE = re.compile(r"sys/bus/pci/drivers/([^/]+)/(bind|unbind|new_id|remove_id|uevent)")
_VTCON_RE = re.compile(r"sys/devices/virtual/vtconsole/vtcon(\d+)/bind")
_HUGEPAGES_RE = re.compile(r"sys/kernel/mm/hugepages/hugepages-(\d+kB)/nr_hugepages")
_SYNTH_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")


def _require_present(c: Core, addr: str) -> None:
    if not c.st.devices[addr].present:
        # the attribute belonged to a device removed since the file was opened: a dead kernfs node
        raise oserror(errno.ENODEV, addr)


def _op_driver_override(c: Core, addr: str, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c driver_override_store -> drivers/base/driver.c driver_set_override."""
    _require_present(c, addr)
    if len(data) >= PAGE_SIZE - 1:
        raise oserror(errno.EINVAL, "driver_override longer than PAGE_SIZE - 2")
    s = data.split(b"\0", 1)[0]  # strlen: Python's b"...\0" stops here
    cut = s.find(b"\n")
    value = s if cut < 0 else s[:cut]
    c.st.devices[addr].override = value.decode("utf-8", "surrogateescape") if value else None


def _op_remove(c: Core, addr: str, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c remove_store: kstrtoul; non-zero removes the device and all below it."""
    _require_present(c, addr)
    value = kstrtoul(data)
    if value is None:
        raise oserror(errno.EINVAL)
    if value:
        c.remove_device(addr)


def _op_device_uevent(c: Core, addr: str, data: bytes) -> None:
    """drivers/base/core.c uevent_store -> kobject_synth_uevent: emit the named action, change nothing."""
    _require_present(c, addr)
    words = data.split(b"\0", 1)[0].split()
    action = words[0].decode("ascii", "replace") if words else ""
    if action not in _SYNTH_ACTIONS:
        raise oserror(errno.EINVAL, f"unknown uevent action {action!r}")
    c.uevent(action, addr, c.st.devices[addr].driver)


def _require_driver(c: Core, driver: str) -> None:
    if driver not in c.st.drivers:
        raise oserror(errno.ENODEV, f"driver {driver} was unregistered")


def _op_bind(c: Core, driver: str, data: bytes) -> None:
    """drivers/base/bus.c bind_store -> device_driver_attach."""
    _require_driver(c, driver)
    addr = c.find_device(data)
    if addr is None or not c.match(driver, addr):
        raise oserror(errno.ENODEV)
    r = c.probe(driver, addr)  # -EBUSY if it already has a driver
    if r and not c.profile.kernel_at_least(5, 13):
        # Before 5.13 ("driver core: Flow the return code from ->probe() through to sysfs bind") a bound
        # device and every failed probe read as ENODEV (measured on 5.10).
        raise oserror(errno.ENODEV)
    if r:
        raise oserror(abs(r))


def _op_unbind(c: Core, driver: str, data: bytes) -> None:
    """drivers/base/bus.c unbind_store: only the driver the device is bound to can unbind it."""
    _require_driver(c, driver)
    addr = c.find_device(data)
    if addr is None or c.st.devices[addr].driver != driver:
        raise oserror(errno.ENODEV)
    c.detach(addr)


def _op_drivers_probe(c: Core, data: bytes) -> None:
    """drivers/base/bus.c drivers_probe_store -> bus_rescan_devices_helper -> device_attach."""
    addr = c.find_device(data)
    if addr is None:
        raise oserror(errno.ENODEV)
    if c.device_attach(addr) < 0:
        raise oserror(errno.EINVAL)  # drivers_probe_store's initial err: a core error reads as EINVAL


def _op_autoprobe(c: Core, data: bytes) -> None:
    """drivers/base/bus.c drivers_autoprobe_store: '0' turns it off, anything else on."""
    c.st.autoprobe = not data.startswith(b"0")


def _op_rescan(c: Core, data: bytes) -> None:
    """drivers/pci/pci-sysfs.c rescan_store: non-zero re-adds removed functions and probes them."""
    value = kstrtoul(data)
    if value is None:
        raise oserror(errno.EINVAL)
    if value:
        c.rescan()


def _entry_from_fields(fields: list[int]) -> MatchEntry:
    return MatchEntry(
        fields[0],
        fields[1],
        fields[2] if len(fields) > 2 else PCI_ANY_ID,
        fields[3] if len(fields) > 3 else PCI_ANY_ID,
        fields[4] if len(fields) > 4 else 0,
        fields[5] if len(fields) > 5 else 0,
    )


def _op_new_id(c: Core, driver: str, data: bytes) -> None:
    """drivers/pci/pci-driver.c new_id_store: EEXIST if the driver already matches those ids, else
    pci_add_dynid, which probes every unbound device the new id matches (driver_attach)."""
    _require_driver(c, driver)
    fields = scan_hex(data, 7)
    if len(fields) < 2:
        raise oserror(errno.EINVAL)
    entry = _entry_from_fields(fields)
    if len(fields) != 7:
        dummy = CardIdentity(entry.vendor, entry.device, entry.subvendor, entry.subdevice, entry.class_code)
        known = [
            *c.st.dynids.get(driver, []),
            *c.topo.drivers[driver].id_table,
            *c.st.extra_ids.get(driver, []),
        ]
        if any(e.matches(dummy) and not e.override_only for e in known):
            raise oserror(errno.EEXIST)
    c.st.dynids.setdefault(driver, []).append(entry)
    c.driver_attach(driver)


def _op_remove_id(c: Core, driver: str, data: bytes) -> None:
    """drivers/pci/pci-driver.c remove_id_store: drop the first dynamic id that matches; ENODEV if none."""
    _require_driver(c, driver)
    fields = scan_hex(data, 6)
    if len(fields) < 2:
        raise oserror(errno.EINVAL)
    want = _entry_from_fields(fields)
    ids_ = c.st.dynids.get(driver, [])
    for i, e in enumerate(ids_):
        if (
            e.vendor == want.vendor
            and e.device == want.device
            and want.subvendor in (PCI_ANY_ID, e.subvendor)
            and want.subdevice in (PCI_ANY_ID, e.subdevice)
            and not ((e.class_code ^ want.class_code) & want.class_mask)
        ):
            del ids_[i]
            return
    raise oserror(errno.ENODEV)


def _op_driver_uevent(c: Core, driver: str, data: bytes) -> None:
    _require_driver(c, driver)
    words = data.split(b"\0", 1)[0].split()
    if not words or words[0].decode("ascii", "replace") not in _SYNTH_ACTIONS:
        raise oserror(errno.EINVAL)


def _op_vtcon_bind(c: Core, index: int, data: bytes) -> None:
    """drivers/tty/vt/vt.c store_bind, with the profile's two vtconsoles (fbcon and the dummy driver).
    vt_bind and vt_unbind act only on a driver registered as a module ("(M)"). vt_bind takes the consoles
    from the system driver ("(S)"): with none (both "(M)") it does nothing. vt_unbind of the bound driver
    hands the consoles to the other registered one (do_unbind_con_driver's backup)."""
    bind = simple_strtoul(data) != 0
    has_fb = any("fb" in d.minors for d in c.st.devices.values())
    kind, module = c.profile.vtconsole(index)
    if not module:
        return
    is_fbcon = kind == FBCON
    bound = is_fbcon == c.st.fbcon_bound
    if bind:
        system = any(not c.profile.vtconsole(i)[1] for i in range(len(c.profile.vtconsoles)))
        if is_fbcon and not bound and system and has_fb:  # fbcon takes the consoles from "(S) dummy"
            c.st.fbcon_bound = True
            c.st.console_unbound_by_admin = False
    elif bound:
        if is_fbcon:
            c.st.fbcon_bound = False
            c.st.console_unbound_by_admin = True
        elif has_fb:  # the dummy driver hands the consoles (back) to fbcon
            c.st.fbcon_bound = True
            c.st.console_unbound_by_admin = False


def _op_hugepages(c: Core, size: str, data: bytes) -> None:
    value = kstrtoul(data)
    if value is None:
        raise oserror(errno.EINVAL)
    c.st.hugepages[size] = value


def _classify_mdev(topo: Topology, parent: str, name: str, data: bytes) -> Op | None:
    """`<parent dir>/mdev_supported_types/<type>/create` and `<parent dir>/<uuid>/remove`."""
    holder, leaf = posixpath.split(parent)
    if name == "create" and posixpath.basename(holder) == "mdev_supported_types":
        owner = topo.mdev_dir_to_parent.get(posixpath.dirname(holder))
        if owner is not None and leaf in {t.id for t in topo.mdev_parents[owner].types}:
            return lambda c: mdev.store_create(c, owner, leaf, data)
    if name == "remove" and holder in topo.mdev_dir_to_parent:
        return lambda c: mdev.store_remove(c, leaf, data)
    return None


def classify(topo: Topology, rel: str, data: bytes) -> tuple[Op, str | None]:
    """The operation a write to `rel` performs, and the device whose lock it takes (if any)."""
    parent, name = posixpath.split(rel)
    named = streq_form(data).decode("utf-8", "surrogateescape")
    named_addr = named if named in topo.devices else None
    if parent in topo.dir_to_addr:
        addr = topo.dir_to_addr[parent]
        if name == "driver_override":
            return (lambda c: _op_driver_override(c, addr, data)), addr
        if name == "remove":
            return (lambda c: _op_remove(c, addr, data)), addr
        if name == "uevent":
            return (lambda c: _op_device_uevent(c, addr, data)), addr
        if name == "sriov_numvfs" and topo.devices[addr].sriov_totalvfs:
            return (lambda c: sriov.store_numvfs(c, addr, data)), addr
        if name == "sriov_drivers_autoprobe" and topo.devices[addr].sriov_totalvfs:
            return (lambda c: sriov.store_autoprobe(c, addr, data)), addr
        raise oserror(errno.EACCES, f"/{rel} is read-only")
    holder = posixpath.dirname(parent)
    if name == "current_vgpu_type" and posixpath.basename(parent) == "nvidia" and holder in topo.dir_to_addr:
        vf = topo.dir_to_addr[holder]
        return (lambda c: vendor_vgpu.store_current_type(c, vf, data)), vf
    mdev_op = _classify_mdev(topo, parent, name, data)
    if mdev_op is not None:
        return mdev_op, None
    m = _DRIVER_ATTR_RE.fullmatch(rel)
    if m is not None:
        driver, attr = m[1], m[2]
        if attr == "bind":
            return (lambda c: _op_bind(c, driver, data)), named_addr
        if attr == "unbind":
            return (lambda c: _op_unbind(c, driver, data)), named_addr
        if attr == "new_id":
            return (lambda c: _op_new_id(c, driver, data)), None
        if attr == "remove_id":
            return (lambda c: _op_remove_id(c, driver, data)), None
        return (lambda c: _op_driver_uevent(c, driver, data)), None
    if rel == "sys/bus/pci/drivers_probe":
        return (lambda c: _op_drivers_probe(c, data)), named_addr
    if rel == "sys/bus/pci/drivers_autoprobe":
        return (lambda c: _op_autoprobe(c, data)), None
    if rel == "sys/bus/pci/rescan":
        return (lambda c: _op_rescan(c, data)), None
    m = _VTCON_RE.fullmatch(rel)
    if m is not None:
        index = int(m[1])
        return (lambda c: _op_vtcon_bind(c, index, data)), None
    m = _HUGEPAGES_RE.fullmatch(rel)
    if m is not None:
        size = m[1]
        return (lambda c: _op_hugepages(c, size, data)), None
    raise oserror(errno.EACCES, f"/{rel} is not a writable attribute of the simulator")
