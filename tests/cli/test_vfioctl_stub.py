"""vfioctl against a scripted stand-in for org.hypeman.Devices1 on a private bus: which method each
subcommand calls with which arguments and options, every contract error's exit status and message format,
the unreachable and timeout cases, and `monitor` following signals. The real service is exercised in
test_vfioctl_e2e.py; this file pins the client's side of the contract exactly, whatever the service does.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

import vfiod
from tests.cli.support.buses import private_bus, read_until
from tests.cli.support.completion import complete
from vfiod.bus.names import BUS_NAME, DEVICE_IFACE, ERROR_PREFIX, MANAGER_PATH
from vfiod.cli import vfioctl
from vfiod.core.errors import ALL_ERRORS

REPO = Path(__file__).resolve().parents[2]

# ----- the stand-in service -----------------------------------------------------------------------------


@dataclass
class Call:
    member: str
    signature: str
    body: list[Any]
    flags: int


Responder = Callable[[Message], Message | None]


def plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class Stub:
    """Owns org.hypeman.Devices1 on `address` from a thread of its own; answers what `responses` says."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[Call] = []
        self.responses: dict[str, Responder] = {}
        self.delay = 0.0
        self.loop = asyncio.new_event_loop()
        self.bus: MessageBus | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _start(self) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._handle)
        await self.bus.request_name(BUS_NAME)

    def close(self) -> None:
        async def stop() -> None:
            if self.bus is not None:
                self.bus.disconnect()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.destination not in (BUS_NAME, self._unique()):
            return None
        self.calls.append(Call(msg.member or "", msg.signature, [plain(b) for b in msg.body], int(msg.flags)))
        responder = self.responses.get(msg.member or "")
        if responder is None:
            reply = Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownMethod", f"stub: no {msg.member}"
            )
        else:
            reply = responder(msg) or Message.new_method_return(msg)
        if self.delay:
            bus = self.bus
            assert bus is not None
            self.loop.call_later(self.delay, bus.send, reply)
            return True
        return reply

    def _unique(self) -> str:
        return self.bus.unique_name if self.bus is not None and self.bus.unique_name else ""

    def reply(self, member: str, signature: str, *body: Any) -> None:
        self.responses[member] = lambda msg: Message.new_method_return(msg, signature, list(body))

    def error(self, member: str, name: str, text: str) -> None:
        self.responses[member] = lambda msg: Message.new_error(msg, name, text)

    def signal(self, path: str, interface: str, member: str, signature: str, *body: Any) -> None:
        async def send() -> None:
            assert self.bus is not None
            await self.bus.send(Message.new_signal(path, interface, member, signature, list(body)))

        self.run(send())

    def last(self, member: str) -> Call:
        matching = [c for c in self.calls if c.member == member]
        assert matching, f"{member} was not called; calls: {[c.member for c in self.calls]}"
        return matching[-1]


def v(sig: str, value: Any) -> Variant:
    return Variant(sig, value)


DEVICE_ID = "k" + "0" * 23
DEVICE: dict[str, Variant] = {
    "id": v("s", DEVICE_ID),
    "name": v("s", "l4-gpu"),
    "type": v("s", "gpu"),
    "pci_address": v("s", "0000:a2:00.0"),
    "vendor_id": v("s", "10de"),
    "device_id": v("s", "27b8"),
    "vendor_name": v("s", "NVIDIA Corporation"),
    "device_name": v("s", "AD104GL [L4]"),
    "iommu_group": v("i", 7),
    "bound_to_vfio": v("b", False),
    "driver": v("s", "nvidia"),
    "native_driver": v("s", "nvidia"),
    "state": v("s", "host"),
    "attached_to": v("s", ""),
    "created_at": v("s", "2026-01-12T10:00:00Z"),
    "sysfs_path": v("s", "/sys/bus/pci/devices/0000:a2:00.0/"),
    "vfio_group_path": v("s", ""),
    "tags": v("a{ss}", {"pool": "ml"}),
    "object_path": v("o", f"/org/hypeman/Devices1/devices/{DEVICE_ID}"),
}


def attachment(addr: str, role: str, clique: int | None = None) -> dict[str, Variant]:
    config: dict[str, Variant] = {"path": v("s", f"/sys/bus/pci/devices/{addr}/")}
    if clique is not None:
        config["x_nv_gpudirect_clique"] = v("y", clique)
    return {
        "id": v("s", DEVICE_ID),
        "pci_address": v("s", addr),
        "role": v("s", role),
        "sysfs_path": v("s", f"/sys/bus/pci/devices/{addr}/"),
        "vfio_group_path": v("s", "/dev/vfio/7"),
        "iommu_group": v("i", 7),
        "device_config": v("a{sv}", config),
    }


@pytest.fixture(scope="module")
def bus_address() -> Iterator[str]:
    with private_bus() as address:
        yield address


@pytest.fixture
def stub(bus_address: str) -> Iterator[Stub]:
    s = Stub(bus_address)
    try:
        yield s
    finally:
        s.close()


def ctl(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    code = vfioctl.main(["--address", address, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- what each subcommand sends --------------------------------------------------------------------------


def test_status_and_check_call_the_contract(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    status = {"iommu_enabled": v("b", True), "iommu_groups": v("u", 9), "problems": v("as", ["fix it"])}
    stub.reply("GetHostStatus", "a{sv}", status)
    stub.reply("ListAvailable", "aa{sv}", [])
    code, out, _ = ctl(capsys, stub.address, "status")
    assert code == 0 and "IOMMU enabled (9 IOMMU groups)" in out and "fix it" in out
    assert stub.last("GetHostStatus").signature == "a{sv}"
    # version skew: the package keeps the old daemon running across an upgrade; status says so
    assert "vfiod (too old to say) is running, " in out  # the stub has no Version property
    stub.reply("Get", "v", Variant("s", "0.0.9"))
    code, out, _ = ctl(capsys, stub.address, "status")
    assert f"vfiod 0.0.9 is running, {vfiod.__version__} is installed" in out
    assert stub.last("Get").body == ["org.hypeman.Devices1.Manager", "Version"]
    stub.reply("Get", "v", Variant("s", vfiod.__version__))
    code, out, _ = ctl(capsys, stub.address, "status", "--json")
    doc = json.loads(out)
    assert (doc["daemon_version"], doc["installed_version"]) == (vfiod.__version__, vfiod.__version__)
    assert "is running" not in ctl(capsys, stub.address, "status")[1]
    # the stub has no ListProfiles yet: a daemon older than vfioctl
    code, out, _ = ctl(capsys, stub.address, "check", "--json")
    assert code == 0
    assert json.loads(out) == {
        "host": {"iommu_enabled": True, "iommu_groups": 9, "problems": ["fix it"]},
        "devices": [],
        "sharing": {"sriov": [], "profiles": []},
    }
    assert stub.last("ListAvailable").body == [{"all": True}]
    profile = {"type_id": v("s", "mtty-2"), "name": v("s", "Dual port serial"), "parents": v("as", ["mtty"])}
    stub.reply("ListProfiles", "aa{sv}", [profile])
    code, out, _ = ctl(capsys, stub.address, "check")
    assert code == 0 and "mdev parent mtty: mtty-2 (Dual port serial)" in out


def test_list_available_sends_all_only_when_asked(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    stub.reply("ListAvailable", "aa{sv}", [])
    assert ctl(capsys, stub.address, "list-available")[0] == 0
    assert stub.last("ListAvailable").body == [{}]
    assert ctl(capsys, stub.address, "list-available", "--all")[0] == 0
    assert stub.last("ListAvailable").body == [{"all": True}]


def test_list_with_tags_and_json(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    stub.reply("ListDevices", "aa{sv}", [DEVICE])
    code, out, _ = ctl(capsys, stub.address, "list", "--tag", "pool=ml", "--tag", "rack=r1=a", "--json")
    assert code == 0
    assert stub.last("ListDevices").body == [{"tags": {"pool": "ml", "rack": "r1=a"}}]
    assert json.loads(out)[0]["name"] == "l4-gpu"
    code, out, _ = ctl(capsys, stub.address, "list")
    assert code == 0 and "l4-gpu" in out and "pool=ml" in out and "NAME" in out


def test_register_show_unregister(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    path = f"/org/hypeman/Devices1/devices/{DEVICE_ID}"
    stub.reply("RegisterDevice", "oa{sv}", path, DEVICE)
    stub.reply("GetDevice", "a{sv}", DEVICE)
    stub.reply("UnregisterDevice", "")
    code, out, _ = ctl(capsys, stub.address, "register", "0000:a2:00.0", "--name", "l4-gpu", "--tag", "a=b")
    assert code == 0 and "Registered 0000:a2:00.0 as l4-gpu" in out
    assert stub.last("RegisterDevice").signature == "ssa{sv}"
    assert stub.last("RegisterDevice").body == ["0000:a2:00.0", "l4-gpu", {"tags": {"a": "b"}}]
    assert ctl(capsys, stub.address, "register", "0000:a2:00.1")[0] == 0
    assert stub.last("RegisterDevice").body == ["0000:a2:00.1", "", {}]
    # lspci's short form (bb:ss.f) means domain 0000; the daemon only ever sees the full address
    assert ctl(capsys, stub.address, "register", "A2:00.1")[0] == 0
    assert stub.last("RegisterDevice").body == ["0000:A2:00.1", "", {}]
    code, out, _ = ctl(capsys, stub.address, "show", "l4-gpu", "--json")
    assert code == 0 and json.loads(out)["object_path"] == path
    assert stub.last("GetDevice").body == ["l4-gpu", {}]
    code, out, _ = ctl(capsys, stub.address, "unregister", "l4-gpu", "--json")
    assert code == 0 and json.loads(out) == {"unregistered": "l4-gpu"}
    assert stub.last("UnregisterDevice").body == ["l4-gpu", {}]


def test_attach_vgpu_prints_both_vmm_forms(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    path = f"/sys/bus/mdev/devices/{uuid}/"
    config = {"path": v("s", path), "sysfsdev": v("s", path.rstrip("/")), "uuid": v("s", uuid)}
    record = {
        "id": v("s", "k" * 24),
        "pci_address": v("s", ""),
        "vfio_group_path": v("s", "/dev/vfio/15"),
        "device_config": v("a{sv}", config),
    }
    stub.reply("AttachVGPU", "a{sv}as", record, [])
    code, out, _ = ctl(capsys, stub.address, "attach-vgpu", "vm1", "Dual port serial", "--uuid", uuid)
    assert code == 0
    call = stub.last("AttachVGPU")
    assert call.signature == "ssa{sv}" and call.body == ["vm1", "Dual port serial", {"uuid": uuid}]
    assert f"--device path={path}\n" in out  # only what cloud-hypervisor takes
    assert f"-device vfio-pci,sysfsdev={path.rstrip('/')}" in out and "/dev/vfio/15" in out
    code, out, _ = ctl(capsys, stub.address, "attach-vgpu", "vm1", "mtty-2", "--json")
    doc = json.loads(out)
    assert doc["cloud_hypervisor_args"] == ["--device", f"path={path}"]
    assert doc["qemu_args"] == ["-device", f"vfio-pci,sysfsdev={path.rstrip('/')}"]
    fd = {**record, "vfio_group_path": v("s", ""), "vfio_cdev_path": v("s", "/dev/vfio/devices/vfio2")}
    stub.reply("AttachVGPU", "a{sv}as", fd, [])
    code, out, _ = ctl(capsys, stub.address, "attach-vgpu", "vm1", "mtty-2", "--handoff", "fd")
    assert code == 0 and stub.last("AttachVGPU").body == ["vm1", "mtty-2", {"handoff": "fd"}]
    assert out.startswith(f"vGPU {uuid} for vm1: cdev /dev/vfio/devices/vfio2 (root's), device id ")


def test_attach_prints_attachments_device_lines_and_warnings(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    atts = [attachment("0000:a2:00.0", "requested", 0), attachment("0000:a2:00.1", "companion")]
    stub.reply("Attach", "aa{sv}as", atts, ["RLIMIT_MEMLOCK of the caller is 8192 KiB"])
    code, out, _ = ctl(
        capsys, stub.address, "attach", "ml-training", "l4-gpu", "--include-group",
        "--owner-uid", "1000", "--gpudirect-clique", "0", "--force",
    )  # fmt: skip
    assert code == 0
    call = stub.last("Attach")
    assert call.signature == "sasa{sv}"
    assert call.body == [
        "ml-training",
        ["l4-gpu"],
        {"include_group": True, "owner_uid": 1000, "gpudirect_clique": 0, "force": True},
    ]
    assert "--device path=/sys/bus/pci/devices/0000:a2:00.0/,x_nv_gpudirect_clique=0" in out
    assert "--device path=/sys/bus/pci/devices/0000:a2:00.1/\n" in out
    assert "companion" in out and "RLIMIT_MEMLOCK" in out
    code, out, _ = ctl(capsys, stub.address, "attach", "ml-training", "l4-gpu", "--json")
    assert code == 0 and stub.last("Attach").body == ["ml-training", ["l4-gpu"], {}]
    doc = json.loads(out)
    assert sorted(doc) == ["attachments", "changed", "cloud_hypervisor_args", "instance", "warnings"]
    assert doc["cloud_hypervisor_args"][:2] == [
        "--device",
        "path=/sys/bus/pci/devices/0000:a2:00.0/,x_nv_gpudirect_clique=0",
    ]


def test_detach_bind_unbind(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    attached = {**DEVICE, "attached_to": v("s", "ml-training"), "owner_uid": v("u", 1000)}
    stub.reply("ListDevices", "aa{sv}", [attached])
    stub.reply("GetDevice", "a{sv}", DEVICE)
    for member in ("Detach", "Bind", "Unbind"):
        stub.reply(member, "")
    code, out, _ = ctl(capsys, stub.address, "detach", "ml-training")
    assert code == 0 and stub.last("Detach").body == ["ml-training", [], {}]
    assert "l4-gpu (0000:a2:00.0): nvidia, state host" in out
    code, out, _ = ctl(capsys, stub.address, "detach", "ml-training", "l4-gpu", "--keep-bound", "--json")
    assert code == 0 and stub.last("Detach").body == ["ml-training", ["l4-gpu"], {"keep_bound": True}]
    assert json.loads(out)["keep_bound"] is True
    assert ctl(capsys, stub.address, "bind", "l4-gpu", "--include-group", "--exclusive", "--force")[0] == 0
    assert stub.last("Bind").body == ["l4-gpu", {"include_group": True, "exclusive": True, "force": True}]
    code, out, _ = ctl(capsys, stub.address, "unbind", "l4-gpu", "--json")
    assert code == 0 and stub.last("Unbind").body == ["l4-gpu", {}]
    assert json.loads(out)["unbound"] == "l4-gpu"


def test_reconcile_recover_import(
    stub: Stub, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = {"released": v("u", 1), "findings": v("as", ["released web-1"])}
    for member in ("Reconcile", "Recover", "ImportHypeman"):
        stub.reply(member, "a{sv}", report)
    code, out, _ = ctl(capsys, stub.address, "reconcile", "ml-training", "--dry-run")
    assert code == 0 and stub.last("Reconcile").body == [["ml-training"], {"dry_run": True}]
    # Naming no live instance releases everything: a script must say --all-dead (before, it just did it).
    calls = len([c for c in stub.calls if c.member == "Reconcile"])
    code, _, err = ctl(capsys, stub.address, "reconcile", "--all-users")
    assert (
        code == 2 and "--all-dead" in err and len([c for c in stub.calls if c.member == "Reconcile"]) == calls
    )
    assert ctl(capsys, stub.address, "reconcile", "--all-users", "--all-dead")[0] == 0
    assert stub.last("Reconcile").body == [[], {"all_users": True}]
    assert ctl(capsys, stub.address, "reconcile", "--dry-run")[0] == 0  # looking is always fine
    assert "released web-1" in out and "dry run" in out
    assert ctl(capsys, stub.address, "recover")[0] == 0
    assert stub.last("Recover").body == ["", {}]
    assert ctl(capsys, stub.address, "recover", "l4-gpu", "--dry-run")[0] == 0
    assert stub.last("Recover").body == ["l4-gpu", {"dry_run": True}]
    monkeypatch.chdir(tmp_path)
    code, out, _ = ctl(capsys, stub.address, "import-hypeman", "data", "--json")
    assert code == 0 and json.loads(out) == {"released": 1, "findings": ["released web-1"]}
    assert stub.last("ImportHypeman").body == [str(tmp_path / "data"), {}]


def test_metrics_prints_the_exposition(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    text = '# HELP vfiod_info x\n# TYPE vfiod_info gauge\nvfiod_info{version="0.1.0"} 1\n'
    stub.reply("GetMetrics", "s", text)
    for extra in ((), ("--json",)):
        code, out, _ = ctl(capsys, stub.address, "metrics", *extra)
        assert code == 0 and out == text  # the exposition as it is, in both modes
    assert stub.last("GetMetrics").body == [{}]


def test_interactive_authorization_flag(
    stub: Stub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.reply("GetHostStatus", "a{sv}", {})
    flag = int(MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
    assert ctl(capsys, stub.address, "status")[0] == 0
    assert not stub.last("GetHostStatus").flags & flag  # stdin is not a terminal under pytest
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    assert ctl(capsys, stub.address, "status")[0] == 0
    assert stub.last("GetHostStatus").flags & flag
    assert ctl(capsys, stub.address, "status", "--no-ask-password")[0] == 0
    assert not stub.last("GetHostStatus").flags & flag


# ----- errors and exit statuses ----------------------------------------------------------------------------

EXPECTED_STATUS = {
    "Failed": 1,
    "InvalidArgument": 2,
    "InvalidName": 2,
    "InvalidPCIAddress": 2,
    "NotFound": 3,
    "DeviceNotFound": 3,
    "NotAuthorized": 4,
    "NotOwner": 4,
    "InUse": 5,
    "DeviceBusy": 5,
    "IOMMUGroupConflict": 5,
    "HostCritical": 5,
    "SriovEnabled": 5,
    "NoCapacity": 5,
    "ProfileNotFound": 3,
    "NameExists": 5,
    "AlreadyExists": 5,
    "AlreadyBound": 5,
    "NotBound": 5,
    "NativeIsVfio": 5,
    "HandoffUnsupported": 5,
    "Busy": 5,
    "Recovering": 5,
    "VFIONotAvailable": 6,
    "Timeout": 7,
    "NativeDriverNotRestored": 7,
}


def test_every_contract_error_has_its_exit_status(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    assert {e.name for e in ALL_ERRORS} == set(EXPECTED_STATUS)
    for name, status in EXPECTED_STATUS.items():
        stub.error("GetDevice", ERROR_PREFIX + name, f"it went wrong: {name.lower()}")
        code, out, err = ctl(capsys, stub.address, "show", "x1")
        assert code == status, name
        assert out == ""
        assert err == f"vfioctl: {name}: it went wrong: {name.lower()}\n"


def test_foreign_errors(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    stub.error("GetDevice", "org.freedesktop.DBus.Error.AccessDenied", "bus policy says no")
    assert ctl(capsys, stub.address, "show", "x1")[:3:2] == (
        4,
        "vfioctl: org.freedesktop.DBus.Error.AccessDenied: bus policy says no\n",
    )
    stub.responses.pop("GetDevice")
    code, _, err = ctl(capsys, stub.address, "show", "x1")
    assert code == 1 and "UnknownMethod" in err and "Traceback" not in err


def test_no_reply_within_timeout_is_status_9_not_a_device_timeout(
    stub: Stub, capsys: pytest.CaptureFixture[str]
) -> None:
    """The client gave up, the call goes on in vfiod: not the device error Timeout (7, a stuck device),
    but NoReply (9), saying the call may still complete and where to see how it ended."""
    stub.reply("GetHostStatus", "a{sv}", {})
    stub.delay = 1.0
    start = time.monotonic()
    code, _, err = ctl(capsys, stub.address, "--timeout", "0.2", "status")
    assert code == 9 and err.startswith("vfioctl: NoReply: no reply to GetHostStatus within 0.2 s")
    assert "may still complete" in err and "vfioctl monitor" in err
    assert time.monotonic() - start < 1.0
    stub.delay = 0.0
    stub.error("GetHostStatus", "org.hypeman.Devices1.Error.Timeout", "0000:a2:00.0 is stuck")
    assert ctl(capsys, stub.address, "status")[0] == 7


def test_service_not_on_the_bus_is_status_8(bus_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ctl(capsys, bus_address, "list")
    assert code == 8
    assert err.startswith("vfioctl: org.freedesktop.DBus.Error.ServiceUnknown: ")
    assert "is vfiod running" in err


def test_no_bus_is_status_8_and_a_bad_address_is_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ctl(capsys, "unix:path=/nonexistent/bus", "list")
    assert code == 8 and err.startswith(
        "vfioctl: NoBus: cannot connect to the bus at unix:path=/nonexistent/bus"
    )
    code, _, err = ctl(capsys, "nonsense", "list")
    assert code == 2 and err.startswith("vfioctl: InvalidArgument: bad bus address")


# ----- monitor --------------------------------------------------------------------------------------------


def test_monitor_prints_one_line_per_change_and_exits_0_on_ctrl_c(stub: Stub) -> None:
    path = f"/org/hypeman/Devices1/devices/{DEVICE_ID}"
    props = {"Id": v("s", DEVICE_ID), "Name": v("s", "l4-gpu"), "PciAddress": v("s", "0000:a2:00.0")}
    stub.reply("GetManagedObjects", "a{oa{sa{sv}}}", {path: {DEVICE_IFACE: props}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiod.cli.vfioctl", "--address", stub.address, "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        read_until(proc, proc.stderr, "Monitoring org.hypeman.Devices1")
        changed = {"Driver": v("s", "vfio-pci"), "BoundToVfio": v("b", True), "AttachedTo": v("s", "")}
        stub.signal(
            path,
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            "sa{sv}as",
            DEVICE_IFACE,
            changed,
            [],
        )
        line = read_until(proc, proc.stdout, "changed")
        assert "l4-gpu (0000:a2:00.0)" in line and "Driver=vfio-pci" in line and "BoundToVfio=true" in line
        assert 'AttachedTo=""' in line
        assert line[:4].isdigit() and "Z  changed" in line
        other = "/org/hypeman/Devices1/devices/b" + "1" * 23
        added = {DEVICE_IFACE: {"Name": v("s", "pci-0000-a2-00-1"), "State": v("s", "host")}}
        stub.signal(
            MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", "oa{sa{sv}}", other, added
        )
        assert "added    pci-0000-a2-00-1" in read_until(proc, proc.stdout, "added")
        stub.signal(
            MANAGER_PATH,
            "org.freedesktop.DBus.ObjectManager",
            "InterfacesRemoved",
            "oas",
            other,
            [DEVICE_IFACE],
        )
        assert "removed  pci-0000-a2-00-1" in read_until(proc, proc.stdout, "removed")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_monitor_json_lines_and_service_restart(bus_address: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiod.cli.vfioctl", "--address", bus_address, "monitor", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        read_until(proc, proc.stderr, "waiting for it")
        stub = Stub(bus_address)  # the service appears after monitor started
        try:
            event = json.loads(read_until(proc, proc.stdout, '"service"').splitlines()[-1])
            assert event["event"] == "service" and event["owner"].startswith(":")
        finally:
            stub.close()
        event = json.loads(read_until(proc, proc.stdout, '"service"').splitlines()[-1])
        assert event["owner"] == ""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bash_completion_asks_vfioctl_and_the_daemon(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    """packaging/completions/vfioctl, sourced in a real bash: commands and options from vfioctl itself,
    device names and ids and instances from the daemon (ListDevices), nothing when it cannot be reached."""
    other = {**DEVICE, "name": v("s", "l4-audio"), "id": v("s", "b" * 24), "attached_to": v("s", "web-1")}
    stub.reply("ListDevices", "aa{sv}", [DEVICE, other])
    from vfiod.cli import vfioctl

    assert vfioctl.main(["__complete", "devices", "--address", stub.address]) == 0
    assert capsys.readouterr().out.split() == ["bbbbbbbbbbbbbbbbbbbbbbbb", DEVICE_ID, "l4-audio", "l4-gpu"]
    assert {"attach", "attach-vgpu"} <= set(complete("vfioctl", "att"))
    assert "--include-group" in complete("vfioctl", "attach", "--inc")
    assert complete("vfioctl", "--address", stub.address, "show", "l4") == ["l4-audio", "l4-gpu"]
    assert complete("vfioctl", "--address", stub.address, "detach", "") == ["web-1"]
    assert complete("vfioctl", "--address", "unix:path=/nonexistent", "show", "") == []
