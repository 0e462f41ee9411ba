"""The arguments of `vfiod check`, apart from the report itself: `vfiod run` builds the same parser and
must not import the report's modules (check.py) to do so."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--simulate",
        metavar="PROFILE",
        help="check a simulated host (workstation-l4, dgx-h100, no-iommu, qemu-q35, qemu-q35-iommufd, "
        "mdev-samples, mdev-samples-iommufd, a40-mdev, l40s-vgpu, synthetic:N)",
    )
    where.add_argument(
        "--sysfs-root",
        metavar="DIR",
        type=Path,
        help="read sysfs from DIR; if DIR holds sys/ (a copied or simulated tree) its dev/, proc/ and etc/ "
        "are used too, otherwise DIR is a sysfs mount and /dev, /proc and /etc are the real ones",
    )
    parser.add_argument("--all", action="store_true", help="list every PCI function, not only GPUs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--pci-ids", metavar="FILE", type=Path, help="pci.ids database to name devices with")
