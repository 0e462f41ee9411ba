"""The installed package on a clean bookworm guest under a fast init: `dpkg -i` of the project's .deb,
the stock system dbus-daemon (so the shipped bus policy is enforced), the real polkitd, and vfiod started
by bus activation from the installed activation file. Every call is `busctl --timeout=` as a test user.

One guest boot runs every scenario of `service.FAST_INIT` in order (tests/e2e/guest_runner.py); each is
reported as its own test, with vfiod's log of that scenario and the guest console when it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import guest, service
from tests.e2e.conftest import report

pytestmark = [pytest.mark.slow, pytest.mark.root]

GUEST_SCRIPT = "exec /usr/bin/python3 -m tests.e2e.guest_runner service --out /out"


@pytest.fixture(scope="module")
def service_run(images: guest.Images, deb: Path) -> guest.GuestRun:
    return guest.boot_suite(images, "service", GUEST_SCRIPT, timeout=900, files={f"pkg/{deb.name}": deb})


SRIOV_VF = ("sriov-vf-counts", "sriov-vf-attached")
MDEV = ("mdev-profiles", "mdev-attach-used", "mdev-capacity", "mdev-mdevctl", "mdev-crash")
QEMU = ("vmm-qemu-uses-group", "vmm-qemu-uses-mdev")


@pytest.mark.parametrize("name", [n for n in service.FAST_INIT if n not in SRIOV_VF + MDEV + QEMU])
def test_fast_init(service_run: guest.GuestRun, name: str) -> None:
    report(service_run, name)


def test_sriov_vf_counts(service_run: guest.GuestRun) -> None:
    """SetVirtualFunctions on the guest's NVMe PF: 2, 2, 0, 1, 2 (see service.sc_sriov_vf_counts)."""
    report(service_run, "sriov-vf-counts")


def test_sriov_vf_attached(service_run: guest.GuestRun) -> None:
    """A VF attached by hypeman and used as its node's owner (see service.sc_sriov_vf_attached)."""
    report(service_run, "sriov-vf-attached")


def test_vmm_qemu_uses_group(service_run: guest.GuestRun) -> None:
    """A real QEMU as hypeman takes the attached VGA and HDA functions: query-pci lists both with their
    ids; a stranger's QEMU gets EACCES (see service.sc_vmm_qemu_uses_group). held-detach uses the same QEMU
    as the holder."""
    report(service_run, "vmm-qemu-uses-group")


def test_vmm_qemu_uses_mdev(service_run: guest.GuestRun) -> None:
    """A real QEMU takes an mdev vGPU by its sysfsdev path; Detach refused while it runs
    (see service.sc_vmm_qemu_uses_mdev)."""
    report(service_run, "vmm-qemu-uses-mdev")


def test_mdev_profiles(service_run: guest.GuestRun) -> None:
    """The sample mdev drivers' types through ListProfiles (see service.sc_mdev_profiles)."""
    report(service_run, "mdev-profiles")


def test_mdev_attach_used(service_run: guest.GuestRun) -> None:
    """AttachVGPU of mtty-2 used by an unprivileged VMM; Detach refused while held (sc_mdev_attach_used)."""
    report(service_run, "mdev-attach-used")


def test_mdev_capacity(service_run: guest.GuestRun) -> None:
    """mbochs until NoCapacity, free one, create again (see service.sc_mdev_capacity)."""
    report(service_run, "mdev-capacity")


def test_mdev_mdevctl(service_run: guest.GuestRun) -> None:
    """mdevctl list --dumpjson agrees with ListVGPUs (see service.sc_mdev_mdevctl)."""
    report(service_run, "mdev-mdevctl")


def test_mdev_crash(service_run: guest.GuestRun) -> None:
    """SIGKILL between create and hand-over: nothing leaked after the restart (see service.sc_mdev_crash)."""
    report(service_run, "mdev-crash")
