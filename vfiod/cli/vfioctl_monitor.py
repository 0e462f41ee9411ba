"""`vfioctl monitor`: device changes as they happen, one line each.

Owns the match rules (ObjectManager InterfacesAdded/Removed and PropertiesChanged under
/org/hypeman/Devices1, NameOwnerChanged of org.hypeman.Devices1), the cache of device names used to label
lines, following the service across restarts (a restarted service's devices are reported as `added` once
its name is back), and stopping cleanly: SIGINT/SIGTERM end the command with status 0, a lost bus
connection with the "cannot reach the service" status.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from dbus_fast import Message, MessageType

from vfiod.bus.names import (
    BUS_NAME,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    DEVICE_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PROPERTIES_IFACE,
)
from vfiod.cli import vfioctl_render as render
from vfiod.cli.vfioctl_bus import EXIT_OK, EXIT_UNREACHABLE, CallError, Client, unwrap

MATCH_RULES = (
    f"type='signal',sender='{BUS_NAME}',path='{MANAGER_PATH}',interface='{OBJECT_MANAGER_IFACE}'",
    f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_IFACE}',member='PropertiesChanged',"
    f"path_namespace='{MANAGER_PATH}'",
    f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_IFACE}',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
)


def timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds: 2026-01-12T10:00:00.123Z."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class Monitor:
    """Turns the service's signals into events and writes one line per event to `out`."""

    def __init__(self, client: Client, out: TextIO, as_json: bool) -> None:
        self.client = client
        self.out = out
        self.as_json = as_json
        self.owner = ""
        self.devices: dict[str, dict[str, Any]] = {}  # object path -> Device properties seen so far
        self._ready = False
        self._pending: list[Message] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # ----- output ------------------------------------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        event = {"time": timestamp(), **event}
        self.out.write(render.to_json_line(event) if self.as_json else render.monitor_line(event))
        self.out.flush()

    def _device_event(self, kind: str, path: str, **extra: object) -> dict[str, Any]:
        props = self.devices.get(path, {})
        return {
            "event": kind,
            "path": path,
            "id": str(props.get("Id") or path.rsplit("/", 1)[-1]),
            "name": str(props.get("Name") or ""),
            "pci_address": str(props.get("PciAddress") or ""),
            **extra,
        }

    # ----- signals -------------------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if not self._ready:
            self._pending.append(msg)
            return
        self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        if msg.interface == DBUS_IFACE and msg.member == "NameOwnerChanged":
            self._owner_changed(msg)
            return
        path = msg.path or ""
        if msg.sender == DBUS_NAME or not (path == MANAGER_PATH or path.startswith(MANAGER_PATH + "/")):
            return
        if self.owner and msg.sender != self.owner:
            return
        body = [unwrap(v) for v in msg.body]
        if msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesAdded" and len(body) >= 2:
            self._added(str(body[0]), body[1])
        elif msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesRemoved" and len(body) >= 2:
            self._removed(str(body[0]), body[1])
        elif msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged" and len(body) >= 3:
            self._changed(path, body[0], body[1], body[2])

    def _added(self, path: str, interfaces: object) -> None:
        if not isinstance(interfaces, Mapping) or DEVICE_IFACE not in interfaces:
            return
        props = interfaces[DEVICE_IFACE]
        self.devices[path] = dict(props) if isinstance(props, Mapping) else {}
        self.emit(self._device_event("added", path, properties=dict(self.devices[path])))

    def _removed(self, path: str, interfaces: object) -> None:
        if not isinstance(interfaces, list) or DEVICE_IFACE not in interfaces:
            return
        self.emit(self._device_event("removed", path))
        self.devices.pop(path, None)

    def _changed(self, path: str, interface: object, changed: object, invalidated: object) -> None:
        if interface != DEVICE_IFACE or not isinstance(changed, Mapping):
            return
        # Label the line with the name the device had before a rename, then remember the new values.
        event = self._device_event(
            "changed",
            path,
            changed=dict(changed),
            invalidated=[str(i) for i in invalidated] if isinstance(invalidated, list) else [],
        )
        self.devices.setdefault(path, {}).update(changed)
        self.emit(event)

    def _owner_changed(self, msg: Message) -> None:
        body = [unwrap(v) for v in msg.body]
        if len(body) < 3 or body[0] != BUS_NAME:
            return
        new = str(body[2])
        self.owner = new
        self.emit({"event": "service", "name": BUS_NAME, "owner": new})
        if new:
            self._spawn(self._snapshot(report_new=True))

    # ----- snapshot ----------------------------------------------------------------------------------------

    async def _snapshot(self, *, report_new: bool) -> None:
        """Read every device object; with `report_new`, print `added` for devices not seen before."""
        try:
            (objects,) = await self.client.call(
                "GetManagedObjects", interface=OBJECT_MANAGER_IFACE, path=MANAGER_PATH
            )
        except CallError:
            return
        if not isinstance(objects, Mapping):
            return
        for path, interfaces in sorted(objects.items()):
            props = interfaces.get(DEVICE_IFACE) if isinstance(interfaces, Mapping) else None
            if not isinstance(props, Mapping):
                continue
            known = path in self.devices
            self.devices[path] = dict(props)
            if report_new and not known:
                self.emit(self._device_event("added", path, properties=dict(props)))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> int:
        """Subscribe and read the current state; returns how many devices there are now."""
        bus = self.client.bus
        bus.add_message_handler(self.on_message)
        for rule in MATCH_RULES:
            await self.client.call(
                "AddMatch", "s", [rule], interface=DBUS_IFACE, path=DBUS_PATH, destination=DBUS_NAME
            )
        try:
            (owner,) = await self.client.call(
                "GetNameOwner", "s", [BUS_NAME], interface=DBUS_IFACE, path=DBUS_PATH, destination=DBUS_NAME
            )
            self.owner = str(owner)
        except CallError:
            self.owner = ""
        if self.owner:
            await self._snapshot(report_new=False)
        self._ready = True
        pending, self._pending = self._pending, []
        for msg in pending:
            self._dispatch(msg)
        return len(self.devices)


async def run(client: Client, out: TextIO, err: TextIO, as_json: bool) -> int:
    """Print events until SIGINT/SIGTERM (status 0) or until the bus connection is lost (status 8)."""
    monitor = Monitor(client, out, as_json)
    count = await monitor.start()
    if monitor.owner:
        err.write(
            f"Monitoring {BUS_NAME} on {client.target.describe()} ({count} device(s)); Ctrl-C to stop.\n"
        )
    else:
        err.write(f"{BUS_NAME} is not on {client.target.describe()}; waiting for it. Ctrl-C to stop.\n")
    err.flush()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    stopper = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(client.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    try:
        done, _ = await asyncio.wait({stopper, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        for task in (stopper, lost):
            task.cancel()
    if stopper in done:
        return EXIT_OK
    with contextlib.suppress(BaseException):
        lost.exception()  # retrieved, so asyncio does not log it as never retrieved
    err.write("vfioctl: Disconnected: the bus connection was closed\n")
    return EXIT_UNREACHABLE
