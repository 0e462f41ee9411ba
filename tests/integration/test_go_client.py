"""The Go client (clients/go/vfiod) built with Debian's Go and godbus (golang-go, golang-dbus-dev), offline,
and its tests run against a live vfiod on the real stack (private dbus-daemon with our policy, polkitd with
our rules): as root on `workstation-l4` (records strict against every key the daemon sends, errors.Is,
context deadlines, device signals), on `mdev-samples` (vGPUs), on `qemu-q35-iommufd` (OpenDevices' files),
and as a user polkit refuses (NotAuthorized).
The seed's workflow (examples/workflow) runs too and its output is checked. gofmt and go vet are clean.

The build cache lives in ~/.cache/vfiod/go-build (outside the clone); the module's go.mod names godbus by
its real path, and the build points it at Debian's copy with an alternate go.mod (-modfile), so nothing is
downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support.realstack import (
    PATH,
    REPO,
    ROOT,
    STRANGER,
    Stack,
    as_user,
    require_root_and_tools,
    start_stack,
    unavailable,
    vfiod_argv,
)

pytestmark = pytest.mark.slow

MODULE = REPO / "clients/go/vfiod"
GODBUS = Path("/usr/share/gocode/src/github.com/godbus/dbus")
CACHE = Path.home() / ".cache/vfiod/go-build"


@pytest.fixture(scope="module")
def gobuild() -> Iterator[dict[str, str]]:
    """The environment that builds the module offline against Debian's godbus."""
    go = shutil.which("go", path=PATH)
    if go is None or not (GODBUS / "go.mod").is_file():
        unavailable("Debian's Go and godbus are not installed (apt-get install golang-go golang-dbus-dev)")
    work = Path(tempfile.mkdtemp(prefix="vfiod-go-"))
    os.chmod(work, 0o755)  # noqa: S103 (the test binary runs as an unprivileged user too)
    modfile = work / "go.mod"
    modfile.write_text((MODULE / "go.mod").read_text() + f"\nreplace github.com/godbus/dbus/v5 => {GODBUS}\n")
    CACHE.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": PATH,
        "HOME": str(work),
        "GOFLAGS": f"-modfile={modfile} -mod=mod",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GOPATH": str(work / "gopath"),
        "GOCACHE": str(CACHE),
        "CGO_ENABLED": "0",
        "WORK_DIR": str(work),
    }
    yield env
    shutil.rmtree(work, ignore_errors=True)


def go(env: dict[str, str], *argv: str, extra: dict[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(
        ["go", *argv],
        cwd=MODULE,
        env={**env, **(extra or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert r.returncode == 0, f"go {' '.join(argv)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_gofmt_and_vet(gobuild: dict[str, str]) -> None:
    r = subprocess.run(
        ["gofmt", "-l", "."], cwd=MODULE, env=gobuild, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "", f"gofmt would change: {r.stdout}"
    go(gobuild, "vet", "./...")


def _stack(profile: str) -> Iterator[Stack]:
    require_root_and_tools()
    with start_stack(vfiod_argv(profile)) as stack:
        yield stack


def test_client_against_the_live_daemon(gobuild: dict[str, str]) -> None:
    for stack in _stack("workstation-l4"):
        env = {"VFIOD_TEST_BUS": stack.address, "VFIOD_TEST_PROFILE": "workstation-l4"}
        out = go(gobuild, "test", "-count=1", "-v", ".", extra=env)
        ran = {line.split()[2] for line in out.splitlines() if line.startswith("--- PASS")}
        assert {
            "TestRecordsCarryEveryKeyOfTheContract",
            "TestErrorsMatchTheContractNames",
            "TestTheContextDeadlineIsTheCallsDeadline",
            "TestWatchDevicesReportsAddedChangedRemoved",
        } <= ran, out
        # the same tests as a user polkit refuses: only TestDenied (and the deadline test) run
        binary = Path(gobuild["WORK_DIR"]) / "vfiod.test"
        go(gobuild, "test", "-c", "-o", str(binary), ".")
        os.chmod(binary, 0o755)  # noqa: S103
        r = subprocess.run(
            as_user(STRANGER, [str(binary), "-test.v", "-test.run", "TestDenied|TestTheContextDeadline"]),
            env={"PATH": PATH, **env, "VFIOD_TEST_EXPECT_DENIED": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0 and "--- PASS: TestDenied" in r.stdout, r.stdout + r.stderr


def _go_test_on(gobuild: dict[str, str], profile: str, root: Path, test: str) -> str:
    """`go test -run TEST` against a live daemon on `profile` whose simulated host is at `root`
    (VFIOD_TEST_ROOT: the Go test compares the files it receives with the host's nodes)."""
    require_root_and_tools()
    with start_stack([*vfiod_argv(profile), "--sim-root", str(root)]) as stack:
        env = {"VFIOD_TEST_BUS": stack.address, "VFIOD_TEST_PROFILE": profile, "VFIOD_TEST_ROOT": str(root)}
        return go(gobuild, "test", "-count=1", "-v", "-run", test, ".", extra=env)


def test_vgpus_against_the_live_daemon(gobuild: dict[str, str], tmp_path: Path) -> None:
    """ListProfiles, AttachVGPU (node mode, and an mdev with Handoff "fd"), ListVGPUs, Detach, and
    OpenDevices of the mdev: refused without AllowMdev, its cdev's *os.File with it."""
    out = _go_test_on(gobuild, "mdev-samples-iommufd", tmp_path / "host", "TestVGPUs")
    assert "--- PASS: TestVGPUs" in out, out


def test_open_devices_against_the_live_daemon(gobuild: dict[str, str], tmp_path: Path) -> None:
    """Attach with Handoff "fd" and OpenDevices: the *os.Files are the daemon's nodes (godbus receives the
    descriptors the reply carries, nested in the a(ssh) too)."""
    out = _go_test_on(gobuild, "qemu-q35-iommufd", tmp_path / "host", "TestOpenDevices")
    assert "--- PASS: TestOpenDevices" in out, out


def test_the_workflow_example(gobuild: dict[str, str]) -> None:
    """The seed's workflow, as the Go example runs it: discover, register, attach refused without the
    audio function, attach with it, the cloud-hypervisor paths, detach (both back on their drivers)."""
    for stack in _stack("workstation-l4"):
        out = go(gobuild, "run", "./examples/workflow", "-address", stack.address, "-instance", "vm-1")
        print(out)
        lines = out.splitlines()
        assert any(ln.startswith("available: 0000:a2:00.0 NVIDIA Corporation") for ln in lines), out
        assert "registered: 0000:a2:00.0 as gpu-0 (state host)" in lines
        assert "attach without include_group: IOMMUGroupConflict" in lines
        assert (
            "attached: 0000:a2:00.0 (requested) /dev/vfio/7 -> cloud-hypervisor --device "
            "path=/sys/bus/pci/devices/0000:a2:00.0/"
        ) in lines, out
        assert any(ln.startswith("attached: 0000:a2:00.1 (companion) /dev/vfio/7") for ln in lines), out
        assert "detached: 0000:a2:00.0 back on nvidia (state host)" in lines
        assert lines[-1] == "unregistered: gpu-0"
        shown = (REPO / "docs/hypeman.md").read_text()
        assert all(line in shown for line in lines), "docs/hypeman.md shows another output of the example"
    assert ROOT.uid == 0


# ----- the Go records and errors are the XML's ------------------------------------------------------------

XML = REPO / "dbus/org.hypeman.Devices1.xml"
DOC = "org.gtk.GDBus.DocString"
# Go struct -> the out-arguments (method, arg) whose documented records it decodes (the union of their keys)
GO_RECORDS = {
    "AvailableDevice": [("ListAvailable", "devices")],
    "Device": [("ListDevices", "devices")],
    "HostStatus": [("GetHostStatus", "status")],
    "Attachment": [("Attach", "attachments"), ("AttachVGPU", "attachment")],
    "Profile": [("ListProfiles", "profiles")],
    "VGPU": [("ListVGPUs", "vgpus")],
}


def _top_level(text: str) -> list[str]:
    """`text` split at the commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*out, cur.strip()]


def _documented(doc: str) -> dict[str, str]:
    """key -> the text after it, of a record's documentation ("Device records: id s (...), name s, ...")."""
    body = re.sub(r"^(\w+ records|One record per function bound|An Attachment record): ", "", doc).rstrip(".")
    out = {}
    for item in _top_level(body):
        m = re.match(r"([a-z0-9_]+) ([a-z{}]+)\b(.*)", item)
        assert m, f"not a documented key: {item!r}"
        out[m.group(1)] = m.group(3)
    return out


def _xml_out_docs() -> dict[tuple[str, str], str]:
    docs = {}
    for method in ET.parse(XML).getroot().iter("method"):  # noqa: S314 (our own file)
        for arg in method.iter("arg"):
            for ann in arg.iter("annotation"):
                if ann.get("name") == DOC:
                    docs[(method.get("name", ""), arg.get("name", ""))] = ann.get("value", "")
    return docs


def _go_structs() -> dict[str, set[str]]:
    text = (MODULE / "records.go").read_text()
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"type (\w+) struct \{(.*?)\n\}", text, re.S):
        out[m.group(1)] = {k for k in re.findall(r'`vfiod:"([a-z0-9_]+)(?:,optional)?"`', m.group(2))}
    return out


def test_the_go_records_have_every_documented_key() -> None:
    docs = _xml_out_docs()
    structs = _go_structs()
    for name, sources in GO_RECORDS.items():
        keys: set[str] = set()
        for source in sources:
            keys |= set(_documented(docs[source]))
        assert structs[name] == keys, (
            f"{name}: only in Go {structs[name] - keys}, only in the XML {keys - structs[name]}"
        )
    config: set[str] = set()
    for source in GO_RECORDS["Attachment"]:
        inner = _documented(docs[source])["device_config"]
        config |= set(re.findall(r"\b([a-z0-9_]+) [sy]\b", inner))
    assert structs["DeviceConfig"] == config
    claims = _documented(docs[("GetHostStatus", "status")])["claims"]
    listed = re.search(r"\(other tools' claims on devices: ([^)]*)\)", claims)
    assert listed and structs["Claim"] == set(listed.group(1).split(", "))


def test_the_go_errors_are_the_contracts() -> None:
    """The sentinels, in order, are the error list of the Manager's documentation (its lines NAME: ...)."""
    raw = XML.read_text()
    errors_doc = raw[
        raw.index("Errors (every error name") : raw.index('"/>', raw.index("Errors (every error name"))
    ]
    names = re.findall(r"^([A-Za-z]+): ", errors_doc, re.M)
    go_names = re.findall(r'\tErr\w+ += &Error\{Name: "(\w+)"\}', (MODULE / "errors.go").read_text())
    assert names and go_names == names
