"""The journal's vocabulary stays one: every MESSAGE_ID the code logs has its entry in the package's journal
catalog (and systemd's own journalctl compiles it), every ACTION is a member of one enum (a Manager
method's is its name in kebab case), and no code spells an ACTION as a string of its own."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.journal_catalog import CATALOG, entries
from vfiod.bus.methods import METHODS
from vfiod.logevents import MESSAGE_IDS, Action

ROOT = Path(__file__).resolve().parent.parent
KEBAB = re.compile(r"[a-z]+(-[a-z0-9]+)*")


def test_every_message_id_has_one_catalog_entry_and_no_entry_is_orphaned() -> None:
    assert sorted(entries()) == sorted(MESSAGE_IDS.values())
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    for entry in entries().values():
        assert entry.headers.get("Defined-By") == "vfiod", entry.message_id
        assert entry.headers.get("Subject") and entry.headers.get("Documentation", "").startswith("man:")
        assert len(entry.body.split()) > 20, f"{entry.message_id} explains too little"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="systemd's journalctl is not installed")
def test_journalctl_compiles_the_catalog(tmp_path: Path) -> None:
    installed = tmp_path / "usr/lib/systemd/catalog/vfiod.catalog"
    installed.parent.mkdir(parents=True)
    shutil.copy(CATALOG, installed)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    expected = {f"{e.message_id} vfiod: {e.headers['Subject']}" for e in entries().values()}
    assert set(listed) == expected


def test_each_manager_method_has_its_action() -> None:
    for method in METHODS:
        action = Action.for_method(method.name)
        assert action is not Action.STANDARD_CALL, method.name
        assert action.value.replace("-", "") == method.name.lower()
    assert Action.for_method("GetAll") is Action.STANDARD_CALL
    assert all(KEBAB.fullmatch(a.value) for a in Action)


def _spelled_actions(tree: ast.AST) -> list[int]:
    """Lines that give ACTION (a log line's field, or log_fields' action=) a string rather than an Action."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "ACTION"
                    and isinstance(value, ast.Constant | ast.JoinedStr)
                ):
                    found.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg == "action" and isinstance(node.value, ast.Constant):
            found.append(node.value.lineno)
    return found


def test_no_code_spells_an_action_of_its_own() -> None:
    spelled = {}
    for path in sorted((ROOT / "vfiod").rglob("*.py")):
        if path.parts[-2] == "cli":
            continue  # argparse's action="store_true" is another action
        lines = _spelled_actions(ast.parse(path.read_text(encoding="utf-8")))
        if lines:
            spelled[str(path.relative_to(ROOT))] = lines
    assert spelled == {}
