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

pytestmark = [pytest.mark.slow, pytest.mark.root]

GUEST_SCRIPT = "exec /usr/bin/python3 -m tests.e2e.guest_runner service --out /out"


@pytest.fixture(scope="module")
def service_run(images: guest.Images, deb: Path) -> guest.GuestRun:
    return guest.boot_suite(images, "service", GUEST_SCRIPT, timeout=900, files={f"pkg/{deb.name}": deb})


@pytest.mark.parametrize("name", list(service.FAST_INIT))
def test_fast_init(service_run: guest.GuestRun, name: str) -> None:
    problem = service_run.failure(name)
    if problem is None:
        return
    kind, text = problem
    if kind == "skip":
        pytest.skip(text)
    pytest.fail(text, pytrace=False)
