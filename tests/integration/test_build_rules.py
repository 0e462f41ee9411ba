"""packaging/stage.py's rules for what a package build refuses (no root, no Debian tools needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.integration.support.realstack import REPO


def _stage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vfiod_stage", REPO / "packaging/stage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vfiod_tree(root: Path) -> None:
    """The private tree as build-deb.sh lays it out before `stage.py payload` (enough for the launchers)."""
    for module in (
        "vfiod/__init__.py",
        "vfiod/cli/__init__.py",
        "vfiod/cli/daemon.py",
        "vfiod/cli/vfioctl.py",
    ):
        path = root / "usr/lib/vfiod" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")


def test_the_pins_cover_the_runtime_dependencies() -> None:
    _stage().check_requirements()


def test_launchers_and_the_interface_xml_are_staged(tmp_path: Path) -> None:
    stage = _stage()
    _vfiod_tree(tmp_path)
    stage.payload(tmp_path)
    daemon = (tmp_path / "usr/sbin/vfiod").read_text()
    assert daemon.startswith("#!/usr/bin/python3 -I\n")
    assert 'sys.path.insert(0, "/usr/lib/vfiod")' in daemon
    assert "from vfiod.cli.daemon import main" in daemon
    assert "from vfiod.cli.vfioctl import main" in (tmp_path / "usr/bin/vfioctl").read_text()
    if (REPO / stage.INTERFACE_XML).exists():
        assert (tmp_path / stage.INTERFACE_DEST).is_file()


def test_a_missing_interface_xml_fails_the_build_once_the_service_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = _stage()
    if not (REPO / stage.SERVICE_MODULE).exists():
        pytest.skip(f"{stage.SERVICE_MODULE} does not exist yet")
    _vfiod_tree(tmp_path)
    monkeypatch.setattr(stage, "INTERFACE_XML", "dbus/does-not-exist.xml")
    with pytest.raises(stage.StageError, match="is missing but the D-Bus service"):
        stage.payload(tmp_path)


def test_a_console_script_whose_module_is_missing_fails_the_build(tmp_path: Path) -> None:
    stage = _stage()
    _vfiod_tree(tmp_path)
    (tmp_path / "usr/lib/vfiod/vfiod/cli/vfioctl.py").unlink()
    with pytest.raises(stage.StageError, match="vfioctl"):
        stage.payload(tmp_path)


def test_each_debian_release_pins_what_it_does_not_take_from_debian() -> None:
    """bookworm bundles every runtime dependency but systemd-python; trixie takes pydantic from its own
    python3-pydantic and bundles only dbus-fast; a requirements file that bundles what the release gives,
    or misses what it does not, is refused; the versions differ so an upgraded host takes trixie's."""
    stage = _stage()
    for name in ("bookworm", "trixie"):
        stage.check_requirements(name)
    assert stage.version("bookworm") == stage.version() and stage.version("trixie").endswith("+deb13")
    assert "python3-pydantic (>= 2.6)" in stage.dist("trixie")["depends"]
    assert stage.dist("bookworm")["abi"] == "cp311" and stage.dist("trixie")["abi"] == "cp313"
    with pytest.raises(stage.StageError, match="unknown Debian release 'sid'"):
        stage.dist("sid")


def test_a_release_may_not_bundle_what_it_takes_from_debian(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage()
    real = stage.dist

    def bundling_pydantic(name: str = "bookworm") -> dict[str, object]:
        return {**real(name), "requirements": "packaging/requirements.txt"}  # bookworm's: pydantic in it

    monkeypatch.setattr(stage, "dist", bundling_pydantic)
    with pytest.raises(stage.StageError, match="bundles pydantic, which trixie's own packages give"):
        stage.check_requirements("trixie")
