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


def _version(apt: kernels.PrivateApt, run: kernels.Run) -> str:
    out = apt.cache(run, "show", "--no-all-versions", f"qemu-system-x86/{SUITE}")
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split()[1]
    raise LookupError(f"apt-cache show qemu-system-x86/{SUITE} names no version:\n{out}")


def _dest(cache: Path, version: str) -> Path:
    return cache / f"qemu-{version.replace(':', '_')}"


def ensure(cache: Path, run: kernels.Run) -> Path:
    """The unpacked QEMU 10 (its root: `BINARY`, `DATA_DIRS`, `MODULE_DIR` below it), fetched once per
    version (the folder is named by the version the downloaded package carries)."""
    apt = kernels.ready(BackportsApt(cache / "apt" / SUITE, "bookworm"), run)
    cached = _dest(cache, _version(apt, run))
    if (cached / BINARY).is_file():
        return cached
    work = cache / "qemu.tmp"
    run(["rm", "-rf", work], timeout=120)
    (work / "debs").mkdir(parents=True)
    debs = kernels.fetch_all(apt, run, [f"{p}/{SUITE}" for p in PACKAGES], work / "debs")
    for deb in debs:
        run(["dpkg", "-x", deb, work], timeout=600)
    (qemu,) = [d for d in debs if d.name.startswith("qemu-system-x86_")]
    dest = _dest(cache, run(["dpkg-deb", "-f", qemu, "Version"], timeout=60).strip())
    run(["rm", "-rf", work / "debs"], timeout=120)
    if not (work / BINARY).is_file():
        raise LookupError(f"{', '.join(PACKAGES)} ({dest.name}) have no {BINARY}")
    run(["rm", "-rf", dest], timeout=120)
    work.rename(dest)
    return dest
