"""QEMU 10 for the guest: the VMM that takes passed descriptors (`-object iommufd,fd=` and
`-device vfio-pci,fd=`, QEMU 8.2 and later; bookworm's 7.2 has neither).

bookworm-backports' qemu-system-x86, -common, -data and its seabios are fetched with `apt-get download`
through a private apt configuration (lists and archives under the cache, the host's apt state untouched)
and unpacked, not installed, under `<cache>/qemu-<version>/`, once per version. The cache folder is the
guest's /mnt/hostroot: the guest runs that binary with `-L` for its data and `QEMU_MODULE_DIR` for its
modules, on the libraries bookworm's own QEMU already brought into the guest's root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.e2e import kernels

SUITE = "bookworm-backports"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
BINARY = "usr/bin/qemu-system-x86_64"
DATA_DIRS = ("usr/share/qemu", "usr/share/seabios")
MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"


@dataclass(frozen=True)
class BackportsApt(kernels.PrivateApt):
    """bookworm and its backports (the backported QEMU is only ever asked for by `pkg/SUITE`)."""

    def set_up(self) -> None:
        super().set_up()
        signed = f"[signed-by={kernels.KEYRING}]"
        (self.root / "sources.list").write_text(
            f"deb {signed} {kernels.MIRROR} bookworm main\ndeb {signed} {kernels.MIRROR} {SUITE} main\n",
            encoding="utf-8",
        )


def _version(apt: BackportsApt, run: kernels.Run) -> str:
    out = apt.cache(run, "show", "--no-all-versions", f"qemu-system-x86/{SUITE}")
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split()[1]
    raise LookupError(f"apt-cache show qemu-system-x86/{SUITE} names no version:\n{out}")


def ensure(cache: Path, run: kernels.Run) -> Path:
    """The unpacked QEMU 10 (its root: `BINARY`, `DATA_DIRS`, `MODULE_DIR` below it), fetched once."""
    apt = BackportsApt(cache / "apt" / SUITE, "bookworm")
    apt.set_up()
    if not apt.has_lists():
        apt.update(run)
    version = _version(apt, run)
    dest = cache / f"qemu-{version.replace(':', '_')}"
    if (dest / BINARY).is_file():
        return dest
    work = dest.with_name(dest.name + ".tmp")
    run(["rm", "-rf", work], timeout=120)
    work.mkdir(parents=True)
    debs = work / "debs"
    debs.mkdir()
    try:
        apt.download(run, [f"{p}/{SUITE}" for p in PACKAGES], debs)
    except Exception:  # stale lists name a version the mirror dropped: refresh them once
        apt.update(run)
        return ensure(cache, run)
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg", "-x", deb, work], timeout=600)
    run(["rm", "-rf", debs], timeout=120)
    if not (work / BINARY).is_file():
        raise LookupError(f"{', '.join(PACKAGES)} ({version}) have no {BINARY}")
    work.rename(dest)
    return dest
