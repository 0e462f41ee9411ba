"""Which VFIO driver the kernel intends for a PCI function: plain vfio-pci or one of its variant drivers.

The vfio variant drivers (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`, `pds_vfio_pci`, `virtio_vfio_pci`,
`nvgrace_gpu_vfio_pci`, `qat_vfio_pci`) add what their device needs for a VM (live migration, GH200's
device memory, a legacy virtio interface) on top of vfio-pci-core. Their id tables are override-only
(`PCI_DRIVER_OVERRIDE_DEVICE_VFIO` in include/linux/pci.h): the PCI core never binds them on its own, only
when `driver_override` names them. modpost writes such ids to `modules.alias` with a `vfio_` prefix
(scripts/mod/file2alias.c, `do_pci_entry`), so the device's `modalias` with `vfio_` in front, matched
against those aliases, names the driver the kernel's authors meant; the match with the fewest wildcards
wins (libvirt picks the same way), and vfio-pci's own alias (every field a wildcard) loses to any variant.
No match, no `modules.alias`, or a kernel before the aliases existed (5.18): plain vfio-pci.

A variant driver registers under its module's name (`.name = KBUILD_MODNAME` in each of them), which ends
in `_vfio_pci` (`pciaddr.is_vfio_driver`).

The aliases of one kernel are read once and kept while the file's size and mtime stay the same. Under
systemd, `ProtectKernelModules=yes` hides /lib/modules from the daemon, so the unit's `ExecStartPre=+`
copies the running kernel's `vfio_pci:` lines to `/run/vfiod/vfio_pci.alias` first (headed `# release R`),
which is read when the module tree cannot be, and only if R is still the running kernel.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from vfiod.host.host import Host
from vfiod.host.pciaddr import VFIO_PCI, DriverName, InvalidDriverName, PciAddress
from vfiod.host.pcifunction import read_function

ALIAS_PREFIX = "vfio_pci:"
MODALIAS_PREFIX = "vfio_"


@dataclass(frozen=True)
class VfioAlias:
    pattern: str  # `vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i*`
    module: str  # `mlx5_vfio_pci`

    @property
    def wildcards(self) -> int:
        return self.pattern.count("*") + self.pattern.count("?")


_cache: dict[tuple[Path, str | None], tuple[tuple[int, int], tuple[VfioAlias, ...]]] = {}
_cache_lock = threading.Lock()


def alias_file(host: Host) -> Path:
    """`/lib/modules/$(uname -r)/modules.alias` under the host's roots."""
    return host.roots.lib / "modules" / host.kernel_release() / "modules.alias"


def alias_copy(host: Host) -> Path:
    """The unit's copy of the running kernel's `vfio_pci:` aliases (see the module docstring)."""
    return host.roots.run / "vfiod" / "vfio_pci.alias"


def kernel_aliases(host: Host) -> tuple[VfioAlias, ...]:
    """The running kernel's `vfio_pci:` aliases: from its modules.alias, else from the unit's copy."""
    primary = alias_file(host)
    if os.access(primary, os.R_OK):
        return read_aliases(primary)
    return read_aliases(alias_copy(host), release=host.kernel_release())


def read_aliases(path: Path, release: str | None = None) -> tuple[VfioAlias, ...]:
    """The `vfio_pci:` aliases of one modules.alias (none if it cannot be read). With `release`, the file
    must start with `# release <release>` (a copy made for another kernel counts as none)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    key = (st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get((path, release))
        if hit is not None and hit[0] == key:
            return hit[1]
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    found: list[VfioAlias] = []
    if release is not None and text.partition("\n")[0].strip() != f"# release {release}":
        text = ""
    for line in text.splitlines():
        if not line.startswith("alias " + ALIAS_PREFIX):
            continue
        words = line.split()
        if len(words) == 3:
            found.append(VfioAlias(words[1], words[2]))
    aliases = tuple(found)
    with _cache_lock:
        _cache[(path, release)] = (key, aliases)
    return aliases


def best_match(modalias: str, aliases: tuple[VfioAlias, ...]) -> str | None:
    """The module whose `vfio_pci:` alias matches `modalias` (a device's `pci:v…` text) with the fewest
    wildcards; None when none matches. Ties go to the alias listed first, as modprobe's order does."""
    wanted = MODALIAS_PREFIX + modalias.strip()
    best: VfioAlias | None = None
    for alias in aliases:
        if fnmatch.fnmatchcase(wanted, alias.pattern) and (best is None or alias.wildcards < best.wildcards):
            best = alias
    return best.module if best is not None else None


def pick(modalias: str, aliases: tuple[VfioAlias, ...]) -> DriverName | None:
    """The variant driver for a function with this modalias, None for plain vfio-pci."""
    module = best_match(modalias, aliases) if modalias else None
    if module is None or module.replace("-", "_") == "vfio_pci":
        return None
    try:
        return DriverName.parse(module)
    except InvalidDriverName:
        return None


def variant_driver(host: Host, addr: PciAddress) -> DriverName | None:
    """The vfio variant driver the kernel's aliases pick for this function, None for plain vfio-pci."""
    return pick(read_function(host, addr).modalias, kernel_aliases(host))


def intended_driver(host: Host, addr: PciAddress) -> DriverName:
    """The driver Bind and Attach move this function to: its variant driver, or vfio-pci."""
    return variant_driver(host, addr) or VFIO_PCI
