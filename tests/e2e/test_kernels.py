"""The same installed package on two more real kernels: bullseye's 5.10 (before `vfio-dev/`, Ubuntu 22.04's
and RHEL 9's generation) and trixie's 6.12, each Debian's current `linux-image-amd64` of its release
(tests/e2e/kernels.py), under the bookworm root and fast init of test_service. Each boot runs the seed's
workflow (discover, conflict, attach with include_group, the group used by the ctypes VMM and by a real
QEMU), the held device (Detach refused while QEMU holds it, then restored), and SR-IOV (the PF refused,
VF counts, a VF attached and used). bookworm's 6.1 runs the whole suite in test_service.

The test ids carry the kernel's version (resolved when the suite is enabled); the guest prints it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import guest, kernels
from tests.e2e.conftest import kernel_id, report

pytestmark = [pytest.mark.slow, pytest.mark.root]

OTHER_SUITES = tuple(s for s in kernels.SUITES if s != kernels.DEFAULT_SUITE)
SCENARIOS = (
    "package-installs",
    "bus-activation",
    "vga-console-refused",
    "vga-list-and-conflict",
    "vga-attach",
    "grant-kept",
    "vmm-uses-group",
    "vmm-qemu-uses-group",
    "held-detach",
    "sriov-pf-refused",
    "sriov-vf-counts",
    "sriov-vf-attached",
)
SCRIPT = "exec /usr/bin/python3 -m tests.e2e.guest_runner service --out /out --only " + ",".join(SCENARIOS)


@pytest.fixture(scope="module", params=OTHER_SUITES, ids=[kernel_id(s) for s in OTHER_SUITES])
def kernel_run(request: pytest.FixtureRequest, deb: Path) -> guest.GuestRun:
    suite = str(request.param)
    try:
        images = guest.prepare(suite=suite)
    except guest.SetupError as e:
        pytest.fail(f"cannot set up the {suite} guest: {e}", pytrace=False)
    return guest.boot_suite(images, f"kernel-{suite}", SCRIPT, timeout=900, files={f"pkg/{deb.name}": deb})


@pytest.mark.parametrize("name", SCENARIOS)
def test_kernel(kernel_run: guest.GuestRun, name: str) -> None:
    report(kernel_run, name)
