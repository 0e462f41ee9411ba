"""The man pages the package ships describe every command and option the programs have (no drift), and
render without groff warnings."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.integration.support.realstack import REPO
from vfiod.cli import daemon, vfioctl
from vfiod.config import Config

MAN = REPO / "packaging/man"


def _text(page: Path) -> str:
    """The roff source with its escapes for '-' undone, so option names can be searched for."""
    return page.read_text().replace("\\-", "-")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }


@pytest.mark.parametrize(
    ("page", "parser"),
    [("vfioctl.1", vfioctl.build_parser()), ("vfiod.8", daemon.build_parser())],
    ids=["vfioctl", "vfiod"],
)
def test_every_command_and_option_is_documented(page: str, parser: argparse.ArgumentParser) -> None:
    text = _text(MAN / page)
    commands = _subparsers(parser)
    assert commands, f"{page}: the parser has no commands"
    missing = []
    for name, sub in commands.items():
        if not re.search(rf"^\.B {re.escape(name)}\b", text, re.MULTILINE):
            missing.append(f"command {name}")
        missing += [f"{name} {opt}" for opt in sorted(_long_options(sub)) if opt not in text]
    assert not missing, f"{page} does not describe: {', '.join(missing)}"


def _settings(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every key of the configuration schema (dotted) with its default, tables included."""
    out: dict[str, object] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[prefix + name] = None
            out |= _settings(annotation, f"{prefix}{name}.")
        else:
            out[prefix + name] = info.get_default(call_default_factory=True)
    return out


def test_the_configuration_page_describes_every_key_and_default() -> None:
    """vfiod.toml(5): each key of the schema is described (a .B line or a [table] heading), and each
    number's default is stated beside it."""
    text = _text(MAN / "vfiod.toml.5")
    missing = []
    for key, default in _settings(Config).items():
        leaf = key.rsplit(".", 1)[-1]
        if not re.search(rf"^\.(B|SH) \[?({re.escape(key)}|{re.escape(leaf)})\]?$", text, re.MULTILINE):
            missing.append(key)
        if isinstance(default, int | float) and not isinstance(default, bool):
            shown = str(int(default)) if float(default).is_integer() else str(default)
            if not re.search(rf"default {re.escape(shown)}\b", text):
                missing.append(f"{key}'s default {shown}")
    assert not missing, f"vfiod.toml.5 does not describe: {', '.join(missing)}"


@pytest.mark.parametrize("page", ["vfioctl.1", "vfiod.8", "vfiod.toml.5"])
def test_renders_without_warnings(page: str) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    r = subprocess.run(
        ["man", "--warnings", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert "vfio" in r.stdout
