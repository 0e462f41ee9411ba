"""Host readiness for VFIO passthrough (GetHostStatus, `vfiod check`), and other tools' claims on devices.

Owns the host-level answers of the contract (IOMMU, vfio-pci, container/cdev/iommufd, interrupt
remapping, 2 MiB huge pages, GPU slots), the `problems` list (each a sentence with its fix) and the
`claims` list: boot-time and modprobe configuration through which other tools decide drivers
(driverctl overrides, `vfio-pci.ids=` on the kernel command line, `options vfio-pci ids=`, `softdep`,
`blacklist` and `install` lines in /etc/modprobe.d). vfiod respects those claims rather than fighting
them, so each is reported with the devices it covers and what it means for vfiod.

Rules worth knowing:
- `iommu_enabled` means the kernel created IOMMU groups; that is what VFIO needs, whatever the cmdline says;
- `interrupt_remapping` is true when an Intel DMAR unit advertises IR (bit 3 of its `ecap`) or an AMD IOMMU
  (`ivhd*`) is present, and the command line does not turn it off (`intremap=off`, `nointremap`). The
  kernel only logs whether it actually enabled IR, so this is the capability, not a measurement;
- a GPU slot is a display-class function (never its audio/USB functions, never an NVSwitch) the host does
  not need, with the IOMMU on; a used slot is one attached to a VM through vfiod, not merely on vfio-pci.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from vfiod.core import handoff, kernel_support
from vfiod.core.discovery import AvailableDevice, discover
from vfiod.core.pciids import PciIds
from vfiod.host import procfs, vendor_vgpu
from vfiod.host.host import Host
from vfiod.host.pciaddr import PCI_ADDRESS_PATTERN, PciAddress
from vfiod.host.pcifunction import PciFunction, PciSnapshot, module_name

IOMMU_FIX = kernel_support.IOMMU_FIX

_ECAP_IR = 1 << 3
_VFIO_PCI = "vfio_pci"
# Native drivers of display functions, by vendor: a blacklist of one of these concerns that vendor's GPUs
# even though, being blacklisted, the driver is bound to none of them.
_GPU_DRIVER_VENDORS: dict[str, str] = {
    "nouveau": "10de",
    "nvidia": "10de",
    "nvidia_drm": "10de",
    "nvidia_modeset": "10de",
    "nvidiafb": "10de",
    "amdgpu": "1002",
    "radeon": "1002",
    "i915": "8086",
    "xe": "8086",
}
_ID_FIELD_RE = re.compile(r"[0-9a-fA-F]{1,8}")
_ANY_ID = "ffffffff"
_DRIVERCTL_RE = re.compile(rf"pci-({PCI_ADDRESS_PATTERN})")


def _is_vfio_module(name: str) -> bool:
    return "vfio" in module_name(name)


@dataclass(frozen=True)
class Claim:
    """One piece of configuration through which another tool decides which driver gets a device."""

    kind: str  # driverctl | cmdline-ids | cmdline-blacklist | modprobe-ids | softdep | blacklist | install
    source: str  # where it is: "/etc/driverctl.d/pci-0000:01:00.0", "/etc/modprobe.d/vfio.conf:3"
    text: str  # the line (or file content) as written
    driver: str  # the driver or module it concerns
    devices: tuple[str, ...]  # present PCI functions it covers
    note: str  # what it means for vfiod, as a sentence

    def to_record(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "source": self.source,
            "text": self.text,
            "driver": self.driver,
            "devices": list(self.devices),
            "note": self.note,
        }


@dataclass(frozen=True)
class HostStatus:
    """GetHostStatus. `to_record` gives the contract's keys plus `vfio_container`, `notes` and `claims`."""

    iommu_enabled: bool
    iommu_groups: int
    vfio_pci_loaded: bool
    vfio_container: bool
    vfio_cdev: bool
    iommufd: bool
    interrupt_remapping: bool
    hugepages_2m: int
    gpu_mode: str
    gpu_slots_total: int
    gpu_slots_used: int
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    claims: tuple[Claim, ...] = field(default=())

    def to_record(self) -> dict[str, object]:
        return {
            "iommu_enabled": self.iommu_enabled,
            "iommu_groups": self.iommu_groups,
            "vfio_pci_loaded": self.vfio_pci_loaded,
            "vfio_container": self.vfio_container,
            "vfio_cdev": self.vfio_cdev,
            "iommufd": self.iommufd,
            "interrupt_remapping": self.interrupt_remapping,
            "hugepages_2m": self.hugepages_2m,
            "gpu_mode": self.gpu_mode,
            "gpu_slots_total": self.gpu_slots_total,
            "gpu_slots_used": self.gpu_slots_used,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "claims": [c.to_record() for c in self.claims],
        }


def host_status(
    host: Host,
    pci_ids: PciIds | None = None,
    *,
    attached: Collection[str] = (),
    devices: Sequence[AvailableDevice] | None = None,
) -> HostStatus:
    """Read the host's VFIO readiness. `attached` holds the PCI addresses vfiod has attached to VMs;
    `devices` is a default-candidate `discover()` result the caller already has (computed if None)."""
    cmdline = procfs.cmdline(host)
    params = _cmdline_params(cmdline)
    groups = len(host.iommu_groups())
    iommu_enabled = groups > 0
    vfio_pci_loaded = host.module_loaded(_VFIO_PCI) or (host.pci_drivers_dir / "vfio-pci").is_dir()
    vfio_container = (host.roots.dev / "vfio/vfio").exists()
    # /sys/class/vfio-dev exists whenever vfio is loaded (6.1 too): handoff tells the cdev by what proves it.
    vfio_cdev = handoff.has_cdevs(host) is True
    iommufd = handoff.iommufd_missing(host) is None
    ir = _interrupt_remapping(host, params)
    hugepages = _int(host.read_text(host.roots.sys / "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"))

    if devices is None:
        devices = discover(host, pci_ids)
    gpus = [d for d in devices if d.type == "gpu"]
    unsupported = kernel_support.problem(host)
    # No usable slot is no slot: not without an IOMMU or on a kernel vfiod refuses (both are problems). A VF
    # with vGPU types is a vGPU slot, a PF with VFs enabled none (vfio-pci refuses it; its VFs are slots).
    usable = iommu_enabled and not unsupported
    slots = [
        d
        for d in gpus
        if usable
        and d.iommu_group >= 0
        and not d.host_critical
        and not d.sriov_numvfs
        and not (
            d.physfn and (d.mdev_types or vendor_vgpu.is_vendor_vf(host, PciAddress.parse(d.pci_address)))
        )
    ]
    used = {a.lower() for a in attached}

    problems: list[str] = []
    notes: list[str] = []
    if unsupported:
        problems.append(unsupported)
    if not iommu_enabled:
        asked = [p for p in ("intel_iommu", "amd_iommu") if params.get(p, "").startswith("on")]
        if asked:
            problems.append(
                f"the IOMMU is off although the kernel command line has {asked[0]}=on: enable VT-d (Intel) "
                "or AMD-Vi/IOMMU (AMD) in the firmware setup and reboot"
            )
        else:
            problems.append(f"the IOMMU is off (no IOMMU groups): {kernel_support.iommu_fix(host)}")
    if not vfio_pci_loaded:
        problems.append(
            "vfio-pci is not loaded: modprobe vfio-pci (vfiod loads it through modprobe@vfio_pci.service)"
        )
    elif not vfio_container and not vfio_cdev:
        problems.append(
            "vfio-pci is loaded but neither /dev/vfio/vfio nor /dev/vfio/devices exists: check that devtmpfs "
            "is mounted on /dev and that the kernel has CONFIG_VFIO_CONTAINER or CONFIG_VFIO_DEVICE_CDEV"
        )
    if iommu_enabled and not ir:
        problems.append(
            "interrupt remapping is not available, so VFIO refuses device interrupts unless "
            "vfio_iommu_type1 allow_unsafe_interrupts=1 is set (unsafe): enable interrupt remapping in the "
            "firmware (VT-d / AMD-Vi with x2APIC) and remove intremap=off from the kernel command line"
        )
    if hugepages == 0:
        notes.append(
            "no 2 MiB huge pages are reserved: guests that want hugepage-backed memory need them "
            "(sysctl vm.nr_hugepages=N, or hugepages=N on the kernel command line)"
        )
    for d in gpus:
        if d.host_critical:
            notes.append(
                f"{d.pci_address} ({d.device_name}) is not counted as a GPU slot: it {d.host_critical}"
            )

    claims = find_claims(host, params)
    for c in claims:
        if c.kind == "install" and _is_vfio_module(c.driver) and _install_disables(c.text):
            problems.append(c.note)
        else:
            notes.append(c.note)

    return HostStatus(
        iommu_enabled=iommu_enabled,
        iommu_groups=groups,
        vfio_pci_loaded=vfio_pci_loaded,
        vfio_container=vfio_container,
        vfio_cdev=vfio_cdev,
        iommufd=iommufd,
        interrupt_remapping=ir,
        hugepages_2m=hugepages,
        gpu_mode="passthrough" if slots else "none",
        gpu_slots_total=len(slots),
        gpu_slots_used=sum(1 for d in slots if d.pci_address in used),
        problems=tuple(problems),
        notes=tuple(notes),
        claims=tuple(claims),
    )


def _int(raw: str | None) -> int:
    try:
        return max(0, int(raw or "0"))
    except ValueError:
        return 0


def _cmdline_params(cmdline: str) -> dict[str, str]:
    """key -> value of the kernel command line; module parameters keyed as `module_name.param`.
    A later occurrence wins, as in the kernel."""
    out: dict[str, str] = {}
    for token in cmdline.split():
        key, _, value = token.partition("=")
        mod, dot, param = key.partition(".")
        if dot:
            key = f"{module_name(mod)}.{param}"
        out[key] = value.strip('"')
    return out


def _interrupt_remapping(host: Host, params: dict[str, str]) -> bool:
    if params.get("intremap") == "off" or "nointremap" in params:
        return False
    iommu_class = host.roots.sys / "class/iommu"
    for unit in host.list_dir(iommu_class):
        if unit.startswith("ivhd"):
            return True
        if unit.startswith("dmar"):
            raw = host.read_text(iommu_class / unit / "intel-iommu/ecap")
            try:
                ecap = int(raw or "", 16)
            except ValueError:
                continue
            if ecap & _ECAP_IR:
                return True
    return False


# ----- claims -----------------------------------------------------------------------------------------


class _Inventory:
    """The present functions, read lazily: most hosts have no claims and never pay for this."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._items: list[PciFunction] | None = None

    def items(self) -> list[PciFunction]:
        if self._items is None:
            self._items = PciSnapshot(self.host).functions()
        return self._items

    def by_ids(self, spec: str) -> tuple[str, ...]:
        """Functions matching a vfio-pci/pci-stub `ids` entry: vendor:device[:subvendor:subdevice[...]]."""
        fields = spec.split(":")
        if len(fields) < 2 or not all(_ID_FIELD_RE.fullmatch(f) for f in fields[:4]):
            return ()
        want = [f.lower().rjust(4, "0") for f in fields[:4]]
        out = []
        for p in self.items():
            have = [p.vendor, p.device, p.subsystem_vendor, p.subsystem_device]
            if all(w in (_ANY_ID, h) for w, h in zip(want, have, strict=False)):
                out.append(str(p.address))
        return tuple(out)

    def by_driver(self, module: str) -> tuple[str, ...]:
        """Functions the module drives now, or (for a known GPU driver) display functions of its vendor."""
        mod = module_name(module)
        vendor = _GPU_DRIVER_VENDORS.get(mod)
        out = []
        for p in self.items():
            if mod in _modules(p) or (
                vendor is not None and p.vendor == vendor and p.class_code.startswith("03")
            ):
                out.append(str(p.address))
        return tuple(out)

    def native_modules(self) -> set[str]:
        return {m for p in self.items() for m in _modules(p) if m} | set(_GPU_DRIVER_VENDORS)


def _modules(fn: PciFunction) -> tuple[str, str]:
    """The bound driver and its module, module-style ("" for none), as modprobe.d names them."""
    return module_name(fn.driver or ""), module_name(fn.module or "")


def _covers(devices: Sequence[str]) -> str:
    if not devices:
        return "it matches no device on this host"
    return "it covers " + ", ".join(devices)


def native_vfio_reason(host: Host, name: str, addr: PciAddress) -> str:
    """NativeIsVfio's message: what binds the device to vfio-pci at boot (the claims naming it) and how
    to change that, or that vfiod found it on vfio-pci and nothing on this host says why."""
    mine = [c for c in find_claims(host) if str(addr) in c.devices and _is_vfio_module(c.driver)]
    head = (
        f"device {name!r} ({addr}) has vfio-pci as its own driver: it was on vfio-pci before vfiod touched "
        "it, so Unbind has nothing to return it to and changes nothing"
    )
    if not mine:
        return (
            head + "; no driverctl override, vfio-pci.ids= or modprobe.d option on this host names it (an "
            "initramfs option or a script may bind it): find what binds it at boot, change that and reboot"
        )
    return (
        head
        + "; bound at boot by "
        + "; ".join(f"{c.source}: {c.text!r}" for c in mine)
        + ": change that (driverctl unset-override for a driverctl override; the kernel command line or the "
        "modprobe.d file otherwise, then update the initramfs) and reboot, or Unregister it"
    )


def find_claims(host: Host, params: dict[str, str] | None = None) -> list[Claim]:
    """Every driverctl override, command-line and modprobe.d claim concerning vfio or a present
    device's native driver, in a stable order (driverctl, command line, modprobe.d by file and line)."""
    if params is None:
        params = _cmdline_params(procfs.cmdline(host))
    inv = _Inventory(host)
    claims: list[Claim] = []
    claims.extend(_driverctl_claims(host))
    claims.extend(_cmdline_claims(params, inv))
    claims.extend(_modprobe_claims(host, inv))
    return claims


def _driverctl_claims(host: Host) -> Iterable[Claim]:
    base = host.roots.etc / "driverctl.d"
    for name in host.list_dir(base):
        m = _DRIVERCTL_RE.fullmatch(name)
        if m is None:
            continue
        addr = PciAddress.parse(m[1])
        driver = (host.read_text(base / name) or "").strip()
        if not driver:
            continue
        source = f"/etc/driverctl.d/{name}"
        present = host.device_exists(addr)
        devices = (str(addr),) if present else ()
        where = "" if present else " (no such device is present now)"
        if _is_vfio_module(driver):
            note = (
                f"driverctl gives {addr} to {driver} at every boot ({source}){where}; vfiod leaves it on "
                f"{driver} when it is released (driverctl unset-override {addr} hands it back to its "
                "own driver)"
            )
        else:
            note = (
                f"driverctl pins {addr} to {driver} ({source}){where}; driverctl re-applies that at boot, "
                f"so a vfiod binding does not survive a reboot (driverctl unset-override {addr} lets vfiod "
                "manage it)"
            )
        yield Claim("driverctl", source, driver, driver, devices, note)


def _cmdline_claims(params: dict[str, str], inv: _Inventory) -> Iterable[Claim]:
    for key in ("vfio_pci.ids", "pci_stub.ids"):
        value = params.get(key)
        if not value:
            continue
        driver = key.split(".")[0].replace("_", "-")
        devices = _ids_devices(value, inv)
        text = f"{key.replace('_', '-', 1)}={value}"
        note = (
            f"the kernel command line ({text}) gives matching devices to {driver} at boot: "
            f"{_covers(devices)}; vfiod treats them as pre-bound and leaves them on {driver} when released"
        )
        yield Claim("cmdline-ids", "/proc/cmdline", text, driver, devices, note)
    for key in ("modprobe.blacklist", "module_blacklist"):
        for listed in (params.get(key) or "").split(","):
            mod = module_name(listed)
            if not mod or not (_is_vfio_module(mod) or mod in inv.native_modules()):
                continue
            devices = () if _is_vfio_module(mod) else inv.by_driver(mod)
            text = f"{key}={params[key]}"
            if key == "module_blacklist":
                effect = "cannot be loaded at all"
            else:
                effect = "is not loaded on its own (vfiod loads it explicitly when needed)"
            note = f"the kernel command line ({text}) blacklists {mod}: it {effect}; {_covers(devices)}"
            yield Claim("cmdline-blacklist", "/proc/cmdline", text, mod, devices, note)


def _ids_devices(value: str, inv: _Inventory) -> tuple[str, ...]:
    found: list[str] = []
    for spec in value.split(","):
        for addr in inv.by_ids(spec.strip()):
            if addr not in found:
                found.append(addr)
    return tuple(sorted(found))


def _modprobe_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, logical line) with backslash continuations joined and comments dropped."""
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full and not full.startswith("#"):
            yield start, full
    if pending.strip() and not pending.strip().startswith("#"):
        yield start, pending.strip()


def _modprobe_claims(host: Host, inv: _Inventory) -> Iterable[Claim]:
    for conf in procfs.modprobe_files(host):
        for number, line in _modprobe_lines(conf.text):
            claim = _modprobe_claim(f"{conf.path}:{number}", line, inv)
            if claim is not None:
                yield claim


def _modprobe_claim(source: str, line: str, inv: _Inventory) -> Claim | None:
    words = line.split()
    if len(words) < 2:
        return None
    verb, mod = words[0], module_name(words[1])
    if verb == "options" and mod == _VFIO_PCI:
        ids = next((w.partition("=")[2] for w in words[2:] if w.startswith("ids=")), None)
        if ids is None:
            return None
        devices = _ids_devices(ids, inv)
        note = (
            f"{source} ({line}) gives matching devices to vfio-pci whenever it loads: {_covers(devices)}; "
            "vfiod treats them as pre-bound and leaves them on vfio-pci when released"
        )
        return Claim("modprobe-ids", source, line, "vfio-pci", devices, note)
    if verb == "softdep":
        mentioned = {module_name(w) for w in words[2:] if not w.endswith(":")}
        if not (
            _is_vfio_module(mod) or any(_is_vfio_module(m) for m in mentioned) or mod in inv.native_modules()
        ):
            return None
        devices = () if _is_vfio_module(mod) else inv.by_driver(mod)
        if any(_is_vfio_module(m) for m in mentioned) and not _is_vfio_module(mod):
            effect = f"loads vfio before {mod} so that vfio-pci can claim devices first"
        else:
            effect = f"changes what loads with {mod}"
        note = f"{source} ({line}) {effect}; {_covers(devices)}"
        return Claim("softdep", source, line, mod, devices, note)
    if verb == "blacklist":
        if not (_is_vfio_module(mod) or mod in inv.native_modules()):
            return None
        devices = () if _is_vfio_module(mod) else inv.by_driver(mod)
        note = (
            f"{source} ({line}): {mod} does not load on its own, only when asked by name; vfiod loads it "
            f"explicitly when it needs it; {_covers(devices)}"
        )
        return Claim("blacklist", source, line, mod, devices, note)
    if verb == "install":
        if not (_is_vfio_module(mod) or mod in inv.native_modules()):
            return None
        devices = () if _is_vfio_module(mod) else inv.by_driver(mod)
        if _install_disables(line):
            note = (
                f"{source} ({line}) makes loading {mod} do nothing, so it cannot be loaded: remove that line "
                f"if vfiod is to use it; {_covers(devices)}"
            )
        else:
            note = f"{source} ({line}) runs a command instead of loading {mod}; {_covers(devices)}"
        return Claim("install", source, line, mod, devices, note)
    return None


def _install_disables(line: str) -> bool:
    """`install <mod> /bin/false` (or true): the usual way to make a module impossible to load."""
    words = line.split()
    return len(words) >= 3 and words[2] in ("/bin/false", "/bin/true", "/usr/bin/false", "/usr/bin/true")
