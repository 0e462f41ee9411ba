"""Module parameters the simulated kernel honours when a module loads: vfio-pci's `ids=`."""

from __future__ import annotations

from vfiod_sim.model import PCI_ANY_ID, MatchEntry, Profile
from vfiod_sim.parsing import scan_hex


def vfio_pci_ids(profile: Profile) -> list[MatchEntry]:
    """The `ids=` module parameter as modprobe would pass it: the kernel command line
    (vfio-pci.ids= / vfio_pci.ids=) and `options vfio-pci ids=` in /etc/modprobe.d."""
    specs: list[str] = []
    for token in profile.cmdline.split():
        key, _, value = token.partition("=")
        if key in ("vfio-pci.ids", "vfio_pci.ids"):
            specs.append(value)
    for _path, text in sorted(profile.etc_files):
        if not _path.startswith("modprobe.d/"):
            continue
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "options" and words[1].replace("-", "_") == "vfio_pci":
                specs += [w[len("ids=") :] for w in words[2:] if w.startswith("ids=")]
    out = []
    for spec in ",".join(specs).split(","):
        # vfio_pci_fill_ids: sscanf("%x:%x:%x:%x:%x:%x"), at least vendor:device
        fields = scan_hex(spec.replace(":", " ").encode(), 6)
        if len(fields) < 2 or not spec.strip():
            continue
        v, d, *rest = fields
        sv = rest[0] if len(rest) > 0 else PCI_ANY_ID
        sd = rest[1] if len(rest) > 1 else PCI_ANY_ID
        c = rest[2] if len(rest) > 2 else 0
        cm = rest[3] if len(rest) > 3 else 0
        out.append(MatchEntry(v, d, sv, sd, c, cm))
    return out
