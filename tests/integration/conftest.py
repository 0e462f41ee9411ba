"""Fixtures of the real-daemon tests: a private system bus + the real polkitd (+ vfiod where needed).

These tests need root; without it they skip with the reason, and with VFIOD_REQUIRE_REAL_DAEMONS=1 (CI)
any such skip is a failure instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.support.realstack import Stack, require_root_and_tools, start_stack


@pytest.fixture(scope="module")
def policy_stack() -> Iterator[Stack]:
    """dbus-daemon with our bus policy and polkitd with our actions and rules; no vfiod."""
    require_root_and_tools()
    with start_stack() as stack:
        yield stack
