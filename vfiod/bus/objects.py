"""The device objects under /org/hypeman/Devices1/devices: their property values (read from the manager),
kept current after every call, uevent and manager change, and announced with ObjectManager and
PropertiesChanged signals. Refresh requests that arrive while one runs are merged into the next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_fast import Message, Variant

from vfiod import phases
from vfiod.bus import variants
from vfiod.bus.names import DEVICE_IFACE, MANAGER_PATH, OBJECT_MANAGER_IFACE, PROPERTIES_IFACE, device_path
from vfiod.core.errors import NotFound
from vfiod.core.manager import Manager

log = logging.getLogger("vfiod.bus")

T = TypeVar("T")


class DeviceObjects:
    def __init__(
        self,
        read: Callable[[Callable[[], Any]], Awaitable[Any]],
        manager: Manager,
        send: Callable[[Message], None],
    ) -> None:
        self._read = read  # runs a blocking read off the loop
        self._manager = manager
        self._send = send
        self.props: dict[str, dict[str, Variant]] = {}  # device id -> property values
        self._tree_lock = asyncio.Lock()
        self._pending: set[str] = set()
        self._flush: asyncio.Task[None] | None = None

    def id_at(self, path: str) -> str | None:
        """The id of the device whose object is at `path`, if one is."""
        return next((i for i in self.props if device_path(i) == path), None)

    async def sync(self, *, announce: bool = True) -> None:
        """Re-read every registered device; add, remove and update objects (with their signals)."""
        with phases.timed("objects sync"):  # after a call, before its reply
            await self._sync(announce)

    async def _sync(self, announce: bool) -> None:
        # The read happens under the lock too, so an older snapshot is never applied after a newer one.
        async with self._tree_lock:
            recs = await self._read(lambda: [d.to_record() for d in self._manager.list_devices()])
            fresh = {str(r["id"]): variants.device_properties(r) for r in recs}
            for device_id in sorted(set(self.props) - set(fresh)):
                del self.props[device_id]
                if announce:
                    self._removed(device_id)
            for device_id, props in sorted(fresh.items()):
                self._apply(device_id, props, announce)

    async def refresh(self, device_id: str) -> None:
        """Re-read one device (gone: its object goes)."""
        async with self._tree_lock:
            try:
                device = await self._read(lambda: self._manager.get_device(device_id))
            except NotFound:
                if self.props.pop(device_id, None) is not None:
                    self._removed(device_id)
                return
            self._apply(device_id, variants.device_properties(device.to_record()), True)

    def _apply(self, device_id: str, props: dict[str, Variant], announce: bool) -> None:
        old = self.props.get(device_id)
        self.props[device_id] = props
        if not announce:
            return
        path = device_path(device_id)
        if old is None:
            self._signal(
                MANAGER_PATH,
                OBJECT_MANAGER_IFACE,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [path, {DEVICE_IFACE: dict(props)}],
            )
            return
        changed = {k: v for k, v in props.items() if old.get(k) != v}
        if changed:
            self._signal(path, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as", [DEVICE_IFACE, changed, []])

    def _removed(self, device_id: str) -> None:
        path = device_path(device_id)
        self._signal(MANAGER_PATH, OBJECT_MANAGER_IFACE, "InterfacesRemoved", "oas", [path, [DEVICE_IFACE]])

    def _signal(self, path: str, iface: str, member: str, signature: str, body: list[Any]) -> None:
        self._send(Message.new_signal(path, iface, member, signature, body))

    def schedule(self, device_id: str) -> None:
        """Refresh `device_id` ("" = every device) soon; requests that arrive meanwhile are merged."""
        self._pending.add(device_id)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(self._flush_pending())

    async def _flush_pending(self) -> None:
        await asyncio.sleep(0)
        while self._pending:
            pending, self._pending = self._pending, set()
            try:
                if "" in pending:
                    await self.sync()
                else:
                    for device_id in sorted(pending):
                        await self.refresh(device_id)
            except Exception:
                log.exception("refreshing device objects failed")
