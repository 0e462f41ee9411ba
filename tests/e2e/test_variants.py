"""vfio variant drivers on a real kernel that builds them: the kernel tarball named by
`VFIOD_E2E_KERNEL_TARBALL` (boot/ and lib/modules/ of a 6.12 with IOMMUFD, VFIO cdevs and the
mlx5/virtio/pds/qat variants as modules; CI points it at its prebuilt copy), booted under systemd as PID 1
with the installed package and one more device, a modern virtio-net that virtio_vfio_pci's alias names.
No Debian kernel builds a variant driver or enables iommufd: without the variable, the suite builds its own
kernel first (`make e2e-kernel`, tests/e2e/kernel_build.py; about 25 minutes once, then cached).

One boot; each scenario of `variants.VARIANTS` is its own test (tests/e2e/variants.py), and so is each of
`handoff.HANDOFF`, the descriptor hand-over on the same kernel (tests/e2e/handoff.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import guest, handoff, kernel_build, qemu10, variants
from tests.e2e.conftest import report

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture(scope="module")
def variants_run(deb: Path) -> guest.GuestRun:
    tarball = guest.kernel_tarball()
    try:
        if tarball is None:  # none named: the project's own (make e2e-kernel), built once and cached
            tarball = kernel_build.ensure()
        images = guest.prepare(tarball=tarball)
    except guest.SetupError as e:
        pytest.fail(f"cannot set up the variant-driver guest: {e}", pytrace=False)
    try:
        qemu10.ensure(images.cache, guest.run_command)  # the guest's VMM for passed descriptors
    except Exception as e:
        pytest.fail(f"cannot fetch QEMU 10 for the descriptor hand-over: {e}", pytrace=False)
    return guest.boot_under_systemd(images, "variants", deb, suite="variants", devices=variants.QEMU_DEVICES)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variant(variants_run: guest.GuestRun, name: str) -> None:
    report(variants_run, name)


@pytest.mark.parametrize("name", list(handoff.HANDOFF))
def test_fd_handoff(variants_run: guest.GuestRun, name: str) -> None:
    """Attach with handoff fd and OpenDevices on the same boot (tests/e2e/handoff.py)."""
    report(variants_run, name)
