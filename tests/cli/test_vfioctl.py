"""vfioctl in-process, without a bus: argument parsing (global options on either side of the
subcommand, tags, ranges, usage errors as status 2), `--help` (examples, exit statuses), the exit-status
table, and the rendering of every kind of record, human and JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from vfiod.bus.names import ERROR_PREFIX
from vfiod.cli import report, vfioctl, vfioctl_help
from vfiod.cli import vfioctl_render as render
from vfiod.cli.vfioctl_bus import EXIT_TABLE, CallError, exit_status_for, options, unwrap
from vfiod.cli.vfioctl_monitor import timestamp


def parse(*argv: str) -> argparse.Namespace:
    return vfioctl.build_parser().parse_args(list(argv))


# ----- parsing --------------------------------------------------------------------------------------------


def test_global_options_before_or_after_the_subcommand() -> None:
    a = parse("list")
    assert (a.address, a.bus, a.timeout, a.json, a.no_ask_password) == (None, "system", 120.0, False, False)
    a = parse("--json", "--timeout", "5", "--session", "list")
    assert (a.json, a.timeout, a.bus) == (True, 5.0, "session")
    a = parse("--json", "list", "--timeout", "7")  # given before is not reset by the subcommand
    assert (a.json, a.timeout) == (True, 7.0)
    a = parse("list", "--address", "unix:path=/x", "--json", "--no-ask-password")
    assert (a.address, a.json, a.no_ask_password) == ("unix:path=/x", True, True)
    assert vfioctl.target_of(a).kind == "address"
    assert vfioctl.target_of(parse("--session", "status")).kind == "session"
    assert vfioctl.target_of(parse("status")).kind == "system"


def test_subcommand_arguments() -> None:
    a = parse(
        "attach", "vm-1", "gpu", "audio", "--include-group", "--owner-uid", "1000", "--gpudirect-clique", "3"
    )
    assert (a.instance, a.devices, a.include_group, a.owner_uid, a.gpudirect_clique, a.force) == (
        "vm-1",
        ["gpu", "audio"],
        True,
        1000,
        3,
        False,
    )
    assert a.handoff is None  # the daemon's default
    assert parse("attach", "vm-1", "edu", "--handoff", "fd").handoff == "fd"
    a = parse("detach", "vm-1")
    assert (a.devices, a.keep_bound) == ([], False)
    a = parse("register", "0000:a2:00.0", "--tag", "k=v=w", "--tag", "empty=")
    assert a.tags == {"k": "v=w", "empty": ""} and a.name is None
    assert parse("recover").device is None
    assert parse("reconcile").live == []
    assert parse("reconcile", "a", "b", "--dry-run").live == ["a", "b"]
    assert parse("import-hypeman", "/var/lib/hypeman").dir == "/var/lib/hypeman"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["attach", "vm-1"],
        ["show"],
        ["register", "0000:a2:00.0", "--tag", "novalue"],
        ["register", "0000:a2:00.0", "--tag", "=v"],
        ["list", "--tag", "a=1", "--tag", "a=2"],
        ["attach", "vm", "d", "--owner-uid", "-1"],
        ["attach", "vm", "d", "--owner-uid", "4294967296"],
        ["attach", "vm", "d", "--gpudirect-clique", "256"],
        ["attach", "vm", "d", "--gpudirect-clique", "x"],
        ["--timeout", "0", "list"],
        ["--timeout", "soon", "list"],
        ["--session", "--address", "unix:path=/x", "list"],
        ["list-available", "--json", "--all", "extra"],
    ],
)
def test_usage_errors_are_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert vfioctl.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_help_lists_examples_for_every_subcommand_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert vfioctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in vfioctl_help.EXAMPLES:
        assert f"vfioctl {name}" in out
    for code, _ in EXIT_TABLE:
        assert f"\n  {code:>3}  " in out
    for name in vfioctl_help.EXAMPLES:
        assert vfioctl.main([name, "--help"]) == 0
        sub = capsys.readouterr().out
        assert "examples:\n  vfioctl " + name in sub, name
        assert "--timeout" in sub and "--json" in sub


# ----- exit statuses --------------------------------------------------------------------------------------


def test_exit_status_table() -> None:
    assert exit_status_for(ERROR_PREFIX + "NotFound") == 3
    assert exit_status_for("NotFound") == 3
    assert exit_status_for(ERROR_PREFIX + "SomethingNew") == 1
    assert exit_status_for("org.freedesktop.DBus.Error.ServiceUnknown") == 8
    assert exit_status_for("org.freedesktop.DBus.Error.NoReply") == 9  # the bus gave up waiting
    assert exit_status_for(ERROR_PREFIX + "Timeout") == 7  # a device left stuck
    assert exit_status_for("org.freedesktop.DBus.Error.AccessDenied") == 4
    assert exit_status_for("org.freedesktop.DBus.Error.InvalidArgs") == 2
    assert exit_status_for("org.example.Whatever") == 1
    e = CallError(ERROR_PREFIX + "IOMMUGroupConflict", "0000:a2:00.1 is on snd_hda_intel")
    assert (e.name, e.status) == ("IOMMUGroupConflict", 5)
    assert CallError("org.freedesktop.DBus.Error.Failed", "x").name == "org.freedesktop.DBus.Error.Failed"


def test_options_leave_out_what_was_not_given() -> None:
    opts = options(include_group=("b", True), force=None, owner_uid=("u", 0))
    assert sorted(opts) == ["include_group", "owner_uid"]
    assert (opts["owner_uid"].signature, opts["owner_uid"].value) == ("u", 0)
    assert options() == {}


def test_unwrap_removes_variants_recursively() -> None:
    from dbus_fast import Variant

    value = {"a": Variant("a{sv}", {"b": Variant("as", ["x"])}), "c": [Variant("i", 1)]}
    assert unwrap(value) == {"a": {"b": ["x"]}, "c": [1]}


# ----- rendering ------------------------------------------------------------------------------------------

DEVICE = {
    "id": "k" + "0" * 23,
    "name": "l4-gpu",
    "type": "gpu",
    "pci_address": "0000:a2:00.0",
    "vendor_name": "NVIDIA Corporation",
    "device_name": "AD104GL [L4]",
    "iommu_group": 7,
    "driver": "vfio-pci",
    "state": "attached",
    "attached_to": "ml-training",
    "owner_uid": 1000,
    "bound_to_vfio": True,
    "tags": {"pool": "ml", "rack": "r1"},
    "some_new_key": "later",
}


def test_json_is_sorted_and_stable() -> None:
    text = render.to_json({"b": 1, "a": [True, None]})
    assert text == '{\n  "a": [\n    true,\n    null\n  ],\n  "b": 1\n}\n'
    assert render.to_json_line({"b": 1, "a": "é"}) == '{"a":"é","b":1}\n'


def test_device_table_and_detail() -> None:
    table = render.render_devices([DEVICE])
    header, row = table.splitlines()
    assert header.split() == ["ID", "NAME", "ADDRESS", "DEVICE", "DRIVER", "STATE", "ATTACHED", "TO", "TAGS"]
    assert "ml-training (uid 1000)" in row and "pool=ml, rack=r1" in row and "vfio-pci" in row
    assert render.render_devices([]) == "no registered devices\n"
    detail = render.render_device(DEVICE)
    lines = detail.splitlines()
    assert lines[0].split() == ["name", "l4-gpu"]
    assert any(line.split() == ["bound_to_vfio", "yes"] for line in lines)
    assert lines[-1].split() == ["some_new_key", "later"]  # keys added later are shown, last


def test_device_argument_for_cloud_hypervisor() -> None:
    att = {
        "pci_address": "0000:a2:00.0",
        "device_config": {"path": "/sys/bus/pci/devices/0000:a2:00.0/", "x_nv_gpudirect_clique": 2},
    }
    assert render.device_argument(att) == "path=/sys/bus/pci/devices/0000:a2:00.0/,x_nv_gpudirect_clique=2"
    # no device_config: fall back to sysfs_path
    assert render.device_argument({"sysfs_path": "/sys/bus/pci/devices/0000:01:00.0/"}) == (
        "path=/sys/bus/pci/devices/0000:01:00.0/"
    )
    assert render.device_argument({"device_config": {"path": "/p/", "iommu": True}}) == "path=/p/,iommu=on"
    assert render.cloud_hypervisor_args([att, att])[::2] == ["--device", "--device"]


def test_attach_rendering() -> None:
    atts = [
        {
            "id": "a" * 24,
            "pci_address": "0000:a2:00.0",
            "role": "requested",
            "iommu_group": 7,
            "vfio_group_path": "/dev/vfio/7",
            "device_config": {"path": "/sys/bus/pci/devices/0000:a2:00.0/"},
        },
        {
            "id": "b" * 24,
            "pci_address": "0000:a2:00.1",
            "role": "companion",
            "iommu_group": 7,
            "vfio_group_path": "/dev/vfio/7",
            "device_config": {"path": "/sys/bus/pci/devices/0000:a2:00.1/"},
        },
    ]
    fd = {
        **atts[0],
        "vfio_group_path": "",
        "vfio_cdev_path": "/dev/vfio/devices/vfio0",
        "handoff": "fd",
    }
    shown = render.render_attach("vm", [fd], [])
    assert "/dev/vfio/devices/vfio0 (root's)" in shown and "launcher calls OpenDevices" in shown
    assert "OpenDevices" not in render.render_attach("vm", atts, [])
    text = render.render_attach("ml-training", atts, ["/dev/kvm is missing"])
    assert text.splitlines()[0] == "Attached to ml-training:"
    assert "  --device path=/sys/bus/pci/devices/0000:a2:00.1/" in text
    assert "  ! /dev/kvm is missing" in text
    assert "Warnings" not in render.render_attach("vm", atts, [])
    doc = render.attach_document("vm", atts, [])
    assert json.loads(render.to_json(doc))["cloud_hypervisor_args"] == [
        "--device",
        "path=/sys/bus/pci/devices/0000:a2:00.0/",
        "--device",
        "path=/sys/bus/pci/devices/0000:a2:00.1/",
    ]


def test_status_and_available_rendering() -> None:
    status = {
        "iommu_enabled": True,
        "iommu_groups": 9,
        "interrupt_remapping": True,
        "vfio_pci_loaded": False,
        "vfio_cdev": False,
        "iommufd": False,
        "hugepages_2m": 0,
        "gpu_mode": "passthrough",
        "gpu_slots_total": 1,
        "gpu_slots_used": 0,
        "problems": ["vfio-pci is not loaded: modprobe vfio-pci"],
        "future_key": 3,
    }
    text = report.render_status(status, ("ok", "!!"))
    assert "  ok IOMMU enabled (9 IOMMU groups)" in text
    assert "  ! vfio-pci loaded (vfiod loads it on first use)" in text
    assert "  !! vfio-pci is not loaded: modprobe vfio-pci" in text
    assert "future_key: 3" in text
    devices = [
        {
            "pci_address": "0000:a2:00.0",
            "vendor_name": "NVIDIA Corporation",
            "device_name": "AD104GL [L4]",
            "type": "gpu",
            "iommu_group": 7,
            "iommu_group_members": ["0000:a2:00.0", "0000:a2:00.1"],
            "current_driver": "nvidia",
            "registered_as": "",
            "passthrough_ready": True,
            "blockers": [],
        },
        {
            "pci_address": "0000:a2:00.1",
            "type": "pci",
            "vendor_id": "10de",
            "device_id": "22bc",
            "iommu_group": -1,
            "current_driver": "",
            "passthrough_ready": False,
            "blockers": ["no IOMMU group"],
        },
    ]
    text = report.render_available(devices, ("ok", "!!"), True)
    assert "0000:a2:00.1 (no driver)" in text  # the member's driver, from the same listing
    assert "      !! no IOMMU group" in text
    assert "10de:22bc" in text
    check = report.render_check(status, devices, ("ok", "!!"))
    assert "Ready: 1 GPU(s) can be passed through as they stand: 0000:a2:00.0" in check
    assert "none found" in report.render_available([], ("ok", "!!"), False)


def test_the_device_table_shows_sr_iov_and_mdev_relations() -> None:
    base = {"class": "020000", "type": "pci", "iommu_group": 5, "passthrough_ready": False}
    devices = [
        {
            **base,
            "pci_address": "0000:1c:00.0",
            "sriov_totalvfs": 4,
            "sriov_numvfs": 2,
            "virtfns": ["0000:1c:00.1", "0000:1c:00.2"],
            "blockers": ["it is an SR-IOV physical function with 2 virtual functions enabled"],
        },
        {**base, "pci_address": "0000:1c:00.1", "physfn": "0000:1c:00.0", "iommu_group": 40, "blockers": []},
        {**base, "pci_address": "0000:41:00.0", "mdev_types": ["nvidia-1155", "nvidia-1156"], "blockers": []},
    ]
    lines = report.render_available(devices, ("ok", "!!"), True).splitlines()
    pf = lines.index(next(line for line in lines if line.startswith("  0000:1c:00.0")))
    assert lines[pf + 1] == "      SR-IOV: 2 of 4 VFs enabled (0000:1c:00.1, 0000:1c:00.2)"
    assert lines[pf + 2] == "      !! it is an SR-IOV physical function with 2 virtual functions enabled"
    assert "      SR-IOV virtual function of 0000:1c:00.0" in lines
    assert "      mdev parent: nvidia-1155, nvidia-1156" in lines


def test_report_rendering() -> None:
    text = render.render_report("Reconcile", {"released": 2, "kept": 1, "findings": ["released vm-2"]})
    assert text.splitlines() == [
        "Reconcile",
        "  kept      1",
        "  released  2",
        "Findings:",
        "  - released vm-2",
    ]
    assert render.render_report("Recover", {}) == "Recover\n  nothing to report\n"


def test_monitor_lines() -> None:
    event = {
        "time": "2026-01-12T10:00:00.000Z",
        "event": "changed",
        "name": "l4-gpu",
        "pci_address": "0000:a2:00.0",
        "changed": {"Driver": "vfio-pci", "AttachedTo": "", "Tags": {"a": "b c"}},
        "invalidated": ["State"],
    }
    assert render.monitor_line(event) == (
        '2026-01-12T10:00:00.000Z  changed  l4-gpu (0000:a2:00.0)  AttachedTo="" Driver=vfio-pci '
        'Tags={"a":"b c"} State=?\n'
    )
    added = {"time": "t", "event": "added", "id": "x", "properties": {"State": "host", "VendorId": "10de"}}
    assert render.monitor_line(added) == "t  added    x  State=host\n"
    gone = {"time": "t", "event": "service", "name": "org.hypeman.Devices1", "owner": ""}
    assert render.monitor_line(gone) == "t  service  org.hypeman.Devices1 left the bus\n"


def test_timestamp_format() -> None:
    from datetime import UTC, datetime

    assert timestamp(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"


def test_marks_fall_back_to_ascii() -> None:
    assert report.marks("utf-8") == ("✓", "✗")
    assert report.marks("ascii") == ("ok", "!!")
    assert report.marks(None) == ("ok", "!!")
