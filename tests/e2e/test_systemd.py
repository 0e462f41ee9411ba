"""The installed package under systemd as PID 1 (`init=`-style boot: stage2.sh prepares the root with
guest/systemd-prepare.sh, then execs /lib/systemd/systemd). vfiod.service runs under its real sandbox, is
D-Bus-activated by systemd, loads vfio-pci through modprobe@, and holds a persistence unit stopped around
its sysfs writes: the test config maps the QEMU vendor (1234) to `fake-persistenced.service`, and the
journal must show it stopped before the first write and started after the last.

One boot; each scenario of `service.SYSTEMD` is its own test. The whole journal is kept in the run
folder (journal.log) and vfiod's part of it beside each scenario's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import guest, service

pytestmark = [pytest.mark.slow, pytest.mark.root]

# vfiod bugs this suite found and reported, not fixed yet: a failure whose report contains the text is an
# xfail naming the bug (any other failure fails). Remove an entry once its bug is fixed.
KNOWN_PRODUCT_BUGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def systemd_run(images: guest.Images, deb: Path) -> guest.GuestRun:
    return guest.boot_under_systemd(images, "systemd", deb)


@pytest.mark.parametrize("name", list(service.SYSTEMD))
def test_systemd(systemd_run: guest.GuestRun, name: str) -> None:
    problem = systemd_run.failure(name)
    if problem is None:
        return
    kind, text = problem
    if kind == "skip":
        pytest.skip(text)
    head = text.split("--- guest log", 1)[0]
    for needle, bug in KNOWN_PRODUCT_BUGS.items():
        if needle in head or (needle in text and "not run:" in head):
            pytest.xfail(f"known vfiod bug (reported): {bug}")
    pytest.fail(text, pytrace=False)
