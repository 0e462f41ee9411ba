"""Fixtures of the core tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.core.support.worlds import MakeEnv, make_envs


@pytest.fixture
def env(tmp_path: Path) -> Iterator[MakeEnv]:
    """`env(profile=..., deadline=...)`: a simulated world with a started manager (see worlds.Env)."""
    yield from make_envs(tmp_path)
