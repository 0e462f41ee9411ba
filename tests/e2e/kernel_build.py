"""`make e2e-kernel`: the guest kernel the variant-driver and descriptor hand-over suites boot, built here.

No Debian kernel enables `CONFIG_IOMMUFD` or `CONFIG_VFIO_DEVICE_CDEV`, and Debian's build no vfio variant
driver, so the suite builds a small one from Debian trixie's `linux-source-6.12`: `x86_64_defconfig` and
`kvm_guest.config`, then what the suites need (`BUILT_IN`, `MODULES`; `DISABLED` keeps it small and
quick), checked in the resulting `.config` before the build. About 25 minutes on 2 cores; needs flex,
bison, libelf-dev, bc and libssl-dev (`make deps`).

    python3 -m tests.e2e.kernel_build [--jobs N]     (prints the tarball's path)

The result is a tarball of `boot/` (the kernel and its config) and `lib/modules/` (stripped, depmod'ed),
what `VFIOD_E2E_KERNEL_TARBALL` names, cached under `<cache>/kernel-build/<source version>-<options
digest>/`: a new source upload or another option list builds again, anything else reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

from tests.e2e import guest, kernels

SOURCE_SUITE = "trixie"
SOURCE_PACKAGE = "linux-source-6.12"
BUILT_IN = (
    # the IOMMU, VFIO with both interfaces (group/container and cdev/iommufd), SR-IOV
    *("PCI_IOV", "IOMMU_SUPPORT", "INTEL_IOMMU", "INTEL_IOMMU_SVM", "IRQ_REMAP", "IOMMUFD"),
    *("VFIO", "VFIO_GROUP", "VFIO_CONTAINER", "VFIO_DEVICE_CDEV", "VFIO_IOMMU_TYPE1", "VFIO_VIRQFD"),
    *("VFIO_PCI", "VFIO_PCI_VGA", "MODULES", "MODULE_UNLOAD"),
    # the guest: its root over 9p with an overlay, an initramfs, systemd
    *("VIRTIO_PCI", "NET_9P", "NET_9P_VIRTIO", "9P_FS", "9P_FS_POSIX_ACL", "OVERLAY_FS", "TMPFS"),
    *("DEVTMPFS", "BLK_DEV_INITRD", "RD_GZIP", "RD_XZ", "RD_ZSTD", "UNIX", "INET", "EXT4_FS", "CGROUPS"),
    *("MAGIC_SYSRQ", "DEVPORT", "FUSE_FS"),
    # QEMU's devices the scenarios pass through or keep on the host
    *("DRM", "DRM_FBDEV_EMULATION", "FRAMEBUFFER_CONSOLE", "DRM_BOCHS", "DRM_VIRTIO_GPU"),
    *("SND", "SND_HDA_INTEL", "E1000", "IGB", "IGBVF", "BLK_DEV_NVME", "SAMPLES"),
    # what the variant drivers below depend on
    *("NET_VENDOR_MELLANOX", "NET_VENDOR_AMD", "NET_VENDOR_PENSANDO", "VIRTIO_PCI_ADMIN_LEGACY"),
    *("CRYPTO_HW", "CRYPTO_DEV_QAT", "DEBUG_INFO_NONE"),
)
MODULES = (
    # mediated devices: the kernel's samples
    *("VFIO_MDEV", "SAMPLE_VFIO_MDEV_MTTY", "SAMPLE_VFIO_MDEV_MBOCHS", "SAMPLE_VFIO_MDEV_MDPY"),
    # vfio variant drivers: their `vfio_pci:` aliases in modules.alias are what vfiod chooses a variant by
    *("MLX5_CORE", "MLX5_VFIO_PCI", "VIRTIO_VFIO_PCI", "PDS_CORE", "PDS_VFIO_PCI"),
    *("CRYPTO_DEV_QAT_4XXX", "QAT_VFIO_PCI"),
)
DISABLED = (
    *("MODULE_SIG", "DEBUG_INFO", "DEBUG_INFO_DWARF5", "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT"),
    *("DEBUG_INFO_BTF", "IOMMUFD_TEST", "WERROR"),
)
# What the suites cannot do without: checked in the .config before the build starts.
REQUIRED = {
    **{o: "y" for o in ("IOMMUFD", "VFIO_DEVICE_CDEV", "VFIO_PCI", "INTEL_IOMMU", "PCI_IOV", "9P_FS")},
    **{o: "m" for o in ("VIRTIO_VFIO_PCI", "MLX5_VFIO_PCI", "PDS_VFIO_PCI", "QAT_VFIO_PCI")},
    "SAMPLE_VFIO_MDEV_MTTY": "m",
}


def options_digest() -> str:
    text = "\n".join(("y", *BUILT_IN, "m", *MODULES, "n", *DISABLED))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _source_version(apt: kernels.PrivateApt) -> str:
    out = apt.cache(guest.run_command, "show", "--no-all-versions", SOURCE_PACKAGE)
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split()[1]
    raise guest.SetupError(f"apt-cache show {SOURCE_PACKAGE} ({SOURCE_SUITE}) names no version")


def ensure(cache: Path | None = None, jobs: int | None = None) -> Path:
    """The tarball, built once per source version and option list."""
    cache = cache or guest.cache_dir()
    run = guest.run_command
    apt = kernels.private_apt(cache, SOURCE_SUITE, run)
    version = _source_version(apt)
    dest = cache / "kernel-build" / f"{version.replace(':', '_')}-{options_digest()}"
    found = sorted(dest.glob("linux-*-iommufd.tar.xz"))
    if found:
        return found[-1]
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    (work / "deb").mkdir(parents=True)
    deb = kernels.fetch(apt, run, f"{SOURCE_PACKAGE}={version}", work / "deb")
    run(["dpkg", "-x", deb, work / "deb"], timeout=900)
    (source_tar,) = (work / "deb" / "usr" / "src").glob("linux-source-*.tar.*")
    src, build = work / "src", work / "build"
    src.mkdir()
    run(["tar", "-xf", source_tar, "-C", src, "--strip-components=1"], timeout=1800)
    shutil.rmtree(work / "deb")
    make = ["make", "-C", str(src), f"O={build}"]
    run([*make, "x86_64_defconfig", "kvm_guest.config"], timeout=600)
    config = [str(src / "scripts" / "config"), "--file", str(build / ".config")]
    run([*config, *(a for o in BUILT_IN for a in ("-e", o))], timeout=120)
    run([*config, *(a for o in MODULES for a in ("-m", o))], timeout=120)
    run([*config, *(a for o in DISABLED for a in ("-d", o))], timeout=120)
    run([*make, "olddefconfig"], timeout=600)
    _check_config(build / ".config")
    jobs = jobs or os.cpu_count() or 2
    run(["nice", "-n", "19", *make, f"-j{jobs}", "bzImage", "modules"], timeout=4 * 3600)
    release = (build / "include" / "config" / "kernel.release").read_text().strip()
    tree = work / "tree"
    (tree / "boot").mkdir(parents=True)
    shutil.copy2(build / "arch" / "x86" / "boot" / "bzImage", tree / "boot" / f"vmlinuz-{release}")
    shutil.copy2(build / ".config", tree / "boot" / f"config-{release}")
    run([*make, f"INSTALL_MOD_PATH={tree}", "INSTALL_MOD_STRIP=1", "modules_install"], timeout=1800)
    for link in ("build", "source"):
        (tree / "lib" / "modules" / release / link).unlink(missing_ok=True)
    run(["depmod", "-b", tree, release], timeout=600)
    tarball = work / f"linux-{release}-iommufd.tar.xz"
    run(["tar", "-C", tree, "-cJf", tarball, "boot", "lib"], timeout=1800)
    for big in (src, build, tree):
        shutil.rmtree(big)
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    return dest / tarball.name


def _check_config(path: Path) -> None:
    have = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            have[key.removeprefix("CONFIG_")] = value
    wrong = {o: have.get(o, "not set") for o, want in REQUIRED.items() if have.get(o) != want}
    if wrong:
        raise guest.SetupError(f"the kernel configuration lacks what the suites need: {wrong}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel_build", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="make -j (default: the number of CPUs)")
    args = parser.parse_args(argv)
    try:
        print(ensure(jobs=args.jobs))
    except guest.SetupError as e:
        print(f"e2e-kernel: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
