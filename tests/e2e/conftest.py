"""The real-kernel suite boots QEMU guests: it runs only when asked (`make test-e2e`, i.e. VFIOD_E2E=1),
as root, so a plain `pytest` (make unit) skips it in a second.

`images` (session) builds or reuses the cached kernel, initramfs, guest root and NVMe image once per run;
each test module boots its own guest once (a module-scoped fixture calling `boot_suite`) and reports every
scenario of that guest as its own test.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import guest

ENABLE_ENV = "VFIOD_E2E"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "") not in ("", "0", "no", "false")


@pytest.fixture(scope="session", autouse=True)
def _e2e_gate() -> None:
    if not enabled():
        pytest.skip(f"real-kernel suite: set {ENABLE_ENV}=1 (make test-e2e) to boot the QEMU guests")
    if os.geteuid() != 0:
        pytest.skip("real-kernel suite: needs root")


@pytest.fixture(scope="session")
def images() -> Iterator[guest.Images]:
    if not enabled():
        pytest.skip(f"set {ENABLE_ENV}=1")
    try:
        yield guest.prepare()
    except guest.SetupError as e:
        pytest.fail(f"cannot set up the e2e guest: {e}", pytrace=False)


def daemon_has_run() -> bool:
    """Whether this tree's vfiod has the `run` command yet (the service suites need it)."""
    import argparse

    from vfiod.cli import daemon

    parser = daemon.build_parser()
    for action in parser._actions:  # argparse keeps its subcommands only there
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            return True
    return False


@pytest.fixture(scope="session")
def deb(images: guest.Images) -> Path:
    """The project's .deb, built once per run (or $VFIOD_E2E_DEB)."""
    if not daemon_has_run():
        pytest.skip("`vfiod run` does not exist yet (vfiod/cli/daemon.py): no service to test")
    try:
        return guest.ensure_deb()
    except guest.SetupError as e:
        pytest.fail(f"cannot build the .deb: {e}", pytrace=False)


def report(run: guest.GuestRun, name: str) -> None:
    """One scenario of a guest run as this test's outcome (skipped, failed with its log, or passed)."""
    problem = run.failure(name)
    if problem is None:
        return
    kind, text = problem
    if kind == "skip":
        pytest.skip(text)
    pytest.fail(text, pytrace=False)


def kernel_id(suite: str) -> str:
    """`bullseye-5.10.0-46-amd64` when the suite runs here (the version apt resolves now), else the suite."""
    if not enabled() or os.geteuid() != 0:
        return suite
    try:
        return f"{suite}-{guest.resolve_kernel_package(suite).removeprefix('linux-image-')}"
    except guest.SetupError:
        return suite


_KERNEL_IN_ID = re.compile(r"\[((?:bullseye|bookworm|trixie)-[^\]]*?-amd64)-")
_TIME_PER_KERNEL: dict[str, float] = {}


def _kernel_of(nodeid: str) -> str:
    """The kernel a test ran on: named in its id, the variant-driver tarball, else bookworm's."""
    found = _KERNEL_IN_ID.search(nodeid)
    if found:
        return found.group(1)
    if nodeid.startswith("tests/e2e/test_variants.py"):
        return os.path.basename(os.environ.get("VFIOD_E2E_KERNEL_TARBALL", "variant-driver kernel"))
    return _default_kernel()


@functools.cache
def _default_kernel() -> str:
    return kernel_id("bookworm")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Setup carries each guest's boot (a module-scoped fixture), so it counts toward its kernel too.
    if enabled():
        kernel = _kernel_of(report.nodeid)
        _TIME_PER_KERNEL[kernel] = _TIME_PER_KERNEL.get(kernel, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIME_PER_KERNEL:
        return
    terminalreporter.write_sep("-", "real-kernel suite: time per kernel (boot, set-up and scenarios)")
    for kernel, seconds in sorted(_TIME_PER_KERNEL.items()):
        terminalreporter.write_line(f"{kernel:48} {seconds:7.1f} s")
