"""The live service equals dbus/org.hypeman.Devices1.xml, member by member, and the XML documents
everything; the authorization and option tables cover every method."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast import introspection as intr

import vfiod
from tests.bus.conftest import Clients, StartVfiod
from vfiod.bus.authz import ACTIONS
from vfiod.bus.methods import ADMIN_OPTIONS, OPTIONS
from vfiod.bus.names import DEVICE_IFACE, INTROSPECTABLE_IFACE, MANAGER_IFACE, MANAGER_PATH, PROPERTIES_IFACE
from vfiod.bus.standard import SIGNATURES as STANDARD_SIGNATURES
from vfiod.bus.standard import device_interface
from vfiod.bus.variants import DEVICE_PROPERTIES
from vfiod.core.errors import ALL_ERRORS

XML = Path(__file__).resolve().parents[2] / "dbus" / "org.hypeman.Devices1.xml"
DOC = "org.gtk.GDBus.DocString"


def contract() -> dict[str, intr.Interface]:
    node = intr.Node.parse(XML.read_text(encoding="utf-8"))
    return {i.name: i for i in node.interfaces}


def shape(iface: intr.Interface) -> dict[str, object]:
    """Everything the comparison looks at: names, signatures, directions, access."""
    return {
        "methods": {
            m.name: [
                (a.name, a.signature, a.direction.value if a.direction else "in")
                for a in (*m.in_args, *m.out_args)
            ]
            for m in iface.methods
        },
        "signals": {s.name: [(a.name, a.signature) for a in s.args] for s in iface.signals},
        "properties": {p.name: (p.signature, p.access.value) for p in iface.properties},
    }


def introspect(clients: Clients, path: str) -> intr.Node:
    reply = clients.root.call("Introspect", "", [], path=path, interface=INTROSPECTABLE_IFACE)
    assert reply.ok, reply
    return intr.Node.parse(reply.value())


def test_live_interfaces_equal_the_xml(start_vfiod: StartVfiod, clients: Clients) -> None:
    start_vfiod()
    registered = clients.root.m("RegisterDevice", "ssa{sv}", "0000:a2:00.0", "l4", {})
    device_path = registered.body[0]
    want = contract()
    live_manager = {i.name: i for i in introspect(clients, MANAGER_PATH).interfaces}
    live_device = {i.name: i for i in introspect(clients, device_path).interfaces}
    assert shape(live_manager[MANAGER_IFACE]) == shape(want[MANAGER_IFACE])
    assert shape(live_device[DEVICE_IFACE]) == shape(want[DEVICE_IFACE])
    # the manager object is also the ObjectManager; device objects are listed below it
    assert "org.freedesktop.DBus.ObjectManager" in live_manager
    children = introspect(clients, "/org/hypeman/Devices1/devices").nodes
    assert [n.name for n in children] == [device_path.rsplit("/", 1)[1]]


def test_the_xml_documents_every_member_and_error() -> None:
    root = ET.parse(XML).getroot()  # noqa: S314 (our own file)

    def doc(el: ET.Element) -> str:
        for a in el.findall("annotation"):
            if a.get("name") == DOC:
                return a.get("value") or ""
        return ""

    for iface in root.findall("interface"):
        assert doc(iface), iface.get("name")
        for member in (*iface.findall("method"), *iface.findall("property"), *iface.findall("signal")):
            assert doc(member), f"{iface.get('name')}.{member.get('name')} has no DocString"
            for arg in member.findall("arg"):
                assert doc(arg), f"{member.get('name')}({arg.get('name')}) has no DocString"
    manager_doc = doc(next(i for i in root.findall("interface") if i.get("name") == MANAGER_IFACE))
    for error in ALL_ERRORS:
        assert re.search(rf"(?<![A-Za-z]){error.name}: \w", manager_doc), (
            f"error {error.name} is not documented"
        )


def test_every_method_has_an_action_options_and_the_device_properties_match() -> None:
    want = contract()
    methods = {m.name for m in want[MANAGER_IFACE].methods}
    assert {m for (i, m) in ACTIONS if i == MANAGER_IFACE} == methods
    assert set(OPTIONS) == methods
    for method, keys in ADMIN_OPTIONS.items():
        assert keys <= set(OPTIONS[method]), method
    for iface, member in STANDARD_SIGNATURES:
        assert (iface, member) in ACTIONS
    assert shape(device_interface()) == shape(want[DEVICE_IFACE])
    assert [p for p, _ in DEVICE_PROPERTIES.values()] == [p.name for p in want[DEVICE_IFACE].properties]


def test_no_method_takes_a_file_descriptor() -> None:
    # dbus-fast hands a method the raw index of an `h` sent without an fd, which would then name one of
    # vfiod's own fds; no method takes an `h` (the daemon closes any descriptor a caller sends), and a
    # method that adds one must check msg.unix_fds. Only OpenDevices hands descriptors out.
    for iface in contract().values():
        for m in iface.methods:
            assert all("h" not in str(a.signature) for a in m.in_args), m.name
            if m.name != "OpenDevices":
                assert all("h" not in str(a.signature) for a in m.out_args), m.name


def test_manager_version_and_features(start_vfiod: StartVfiod, clients: Clients) -> None:
    """The Manager's read-only Version (the running daemon's: the package keeps an old one running across
    upgrades) and Features, introspected, readable, never settable."""
    start_vfiod()
    root = clients.root

    def props(member: str, sig: str, *args: object) -> Any:
        return root.call(member, sig, list(args), path=MANAGER_PATH, interface=PROPERTIES_IFACE)

    assert props("Get", "ss", MANAGER_IFACE, "Version").value().value == vfiod.__version__
    everything = {k: v.value for k, v in props("GetAll", "s", MANAGER_IFACE).value().items()}
    assert everything["Version"] == vfiod.__version__
    assert {"sriov", "mdev", "vgpu-mdev", "vgpu-vendor", "vfio-variant-drivers", "iommufd"} <= set(
        everything["Features"]
    )
    refused = props("Set", "ssv", MANAGER_IFACE, "Version", Variant("s", "9.9"))
    assert refused.error == "org.freedesktop.DBus.Error.PropertyReadOnly"
    assert props("Get", "ss", MANAGER_IFACE, "Nope").error == "org.freedesktop.DBus.Error.UnknownProperty"
    xml = root.call("Introspect", "", [], path=MANAGER_PATH, interface=INTROSPECTABLE_IFACE).value()
    manager = next(i for i in intr.Node.parse(xml).interfaces if i.name == MANAGER_IFACE)
    assert {(p.name, p.signature, p.access.value) for p in manager.properties} == {
        ("Version", "s", "read"),
        ("Features", "as", "read"),
    }


def test_version_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from vfiod.cli import daemon, vfioctl

    for main in (daemon.main, vfioctl.main):
        code: int | str | None
        try:
            code = main(["--version"])
        except SystemExit as e:
            code = e.code
        assert code in (0, None)
    out = capsys.readouterr().out
    assert out.splitlines() == [f"vfiod {vfiod.__version__}", f"vfioctl {vfiod.__version__}"]
