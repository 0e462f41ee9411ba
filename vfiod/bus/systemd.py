"""systemd over D-Bus: the `UnitController` and `ModuleLoader` the core uses on a real host.

Owns talking to `org.freedesktop.systemd1`: `Subscribe` once, read a unit's state before acting on it
(`LoadUnit` + `LoadState`/`ActiveState`; a unit that does not exist is simply not running, so there is
nothing to stop), `StopUnit`/`StartUnit` in "replace" mode and waiting for the job's `JobRemoved` with a
deadline. systemd may send `JobRemoved` before the reply that names the job, so every `JobRemoved` from
systemd is buffered by job path for a while and a waiter looks there first. Kernel modules are loaded by
starting `modprobe@<module>.service` and then checking /sys/module, because that unit succeeds even when
modprobe fails.

The client needs a bus connection of its own, one that owns no well-known name: dbus-daemon applies a
`send_destination="X"` policy rule to a broadcast signal when the receiving connection owns X, and vfiod's
policy (dbus/org.hypeman.Devices1.conf) denies `send_destination="org.hypeman.Devices1"` for every
interface but its own. On the connection that owns org.hypeman.Devices1, systemd's `JobRemoved` is
silently not delivered and every job would wait out its deadline. `Daemon` opens that connection.

systemd gets a new unique name when it re-executes (`daemon-reexec`, every systemd upgrade): the client
follows `NameOwnerChanged` of org.freedesktop.systemd1, so only the current owner's signals count, and
subscribes again.

When systemd is not on the bus (containers, the test guest), `UnitsLeftAlone` leaves units alone (saying so
once) and `vfiod.core.system.LoadedModulesOnly` only checks modules.

The core calls these from worker threads; each call is carried onto the event loop with
`run_coroutine_threadsafe` and the thread waits for it (never call them on the loop itself).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from vfiod.bus.calls import BusCallError, Caller
from vfiod.bus.names import (
    DBUS_IFACE,
    DBUS_NAME,
    SYSTEMD_MANAGER_IFACE,
    SYSTEMD_NAME,
    SYSTEMD_PATH,
    SYSTEMD_UNIT_IFACE,
)
from vfiod.core.errors import Failed, Timeout, VFIONotAvailable
from vfiod.core.system import modprobe_hint
from vfiod.host.host import Host
from vfiod.host.pciaddr import DriverName, InvalidDriverName
from vfiod.host.pcifunction import module_name
from vfiod.logevents import Action

log = logging.getLogger("vfiod.systemd")

T = TypeVar("T")

UNIT_DEADLINE: Final = 90.0  # nvidia-persistenced can take a while to stop
MODPROBE_DEADLINE: Final = 60.0
ACTIVE_STATES: Final = frozenset({"active", "activating", "reloading", "deactivating"})
NOT_RUNNING: Final = frozenset({"inactive", "failed"})
_UNIT_RE: Final = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}\.(service|socket|target|mount|timer|path|scope)")
_BUFFER: Final = 1024  # JobRemoved of jobs nobody waits for yet (they are other clients' jobs, mostly)
_BUFFER_AGE: Final = 120.0


class SystemdClient:
    """UnitController + ModuleLoader over org.freedesktop.systemd1, on a connection that owns no name."""

    def __init__(
        self,
        caller: Caller,
        host: Host,
        loop: asyncio.AbstractEventLoop,
        *,
        unit_deadline: float = UNIT_DEADLINE,
        modprobe_deadline: float = MODPROBE_DEADLINE,
    ) -> None:
        self._calls = caller
        self._host = host
        self._loop = loop
        self.unit_deadline = unit_deadline
        self.modprobe_deadline = modprobe_deadline
        self._owner: str | None = None
        self._finished: OrderedDict[str, tuple[str, float]] = OrderedDict()  # job path -> (result, when)
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._resubscribe: asyncio.Task[None] | None = None

    async def subscribe(self) -> None:
        """Subscribe to job signals. Call once on the loop before anything waits for a job."""
        self._calls.bus.add_message_handler(self._on_message)
        await self._calls.add_match(
            f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_IFACE}',member='NameOwnerChanged',"
            f"arg0='{SYSTEMD_NAME}'"
        )
        await self._calls.add_match(
            f"type='signal',sender='{SYSTEMD_NAME}',interface='{SYSTEMD_MANAGER_IFACE}',member='JobRemoved'"
        )
        self._owner = await self._calls.name_owner(SYSTEMD_NAME)
        await self._manager("Subscribe")

    @property
    def bus(self) -> MessageBus:
        return self._calls.bus

    def close(self) -> None:
        """Disconnect the client's own bus connection (on the loop, when vfiod stops)."""
        if self._resubscribe is not None:
            self._resubscribe.cancel()
        bus = self._calls.bus
        bus.remove_message_handler(self._on_message)
        if bus.connected:
            bus.disconnect()

    # ----- signals ------------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.interface == DBUS_IFACE and msg.sender == DBUS_NAME:
            self._owner_changed(msg)
            return
        if msg.member != "JobRemoved" or msg.interface != SYSTEMD_MANAGER_IFACE:
            return
        if msg.sender != self._owner or msg.signature != "uoss":
            return  # anyone can broadcast a signal; only systemd's own count
        _id, job, _unit, result = msg.body
        waiter = self._waiters.pop(job, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(result)
            return
        now = time.monotonic()
        self._finished[job] = (result, now)
        while self._finished and (
            len(self._finished) > _BUFFER or next(iter(self._finished.values()))[1] < now - _BUFFER_AGE
        ):
            self._finished.popitem(last=False)

    def _owner_changed(self, msg: Message) -> None:
        if msg.signature != "sss" or msg.body[0] != SYSTEMD_NAME:
            return
        new = str(msg.body[2])
        if new == self._owner:
            return
        self._owner = new or None
        if not new:
            log.warning(
                "systemd left the bus; waiting for it to come back", extra={"ACTION": Action.SYSTEMD_WATCH}
            )
            return
        log.info(
            "systemd is back on the bus as %s: subscribing again", new, extra={"ACTION": Action.SYSTEMD_WATCH}
        )
        if self._resubscribe is not None:
            self._resubscribe.cancel()
        self._resubscribe = self._loop.create_task(self._subscribe_again())

    async def _subscribe_again(self) -> None:
        try:
            await self._manager("Subscribe")
        except BusCallError as e:
            # A re-executed systemd keeps its subscribers (AlreadySubscribed): nothing is lost then.
            if not e.name.endswith("AlreadySubscribed"):
                log.warning(
                    "could not subscribe to systemd again: %s", e, extra={"ACTION": Action.SYSTEMD_WATCH}
                )

    async def _wait_job(self, job: str, unit: str, deadline: float) -> str:
        done = self._finished.pop(job, None)
        if done is not None:
            return done[0]
        fut: asyncio.Future[str] = self._loop.create_future()
        self._waiters[job] = fut
        try:
            return await asyncio.wait_for(fut, deadline)
        except TimeoutError:
            raise Timeout(
                f"systemd did not finish the job for {unit} ({job}) within {deadline:g} s"
            ) from None
        finally:
            self._waiters.pop(job, None)

    # ----- async API ----------------------------------------------------------------------------------

    async def _manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        return await self._calls.call(
            SYSTEMD_NAME, SYSTEMD_PATH, SYSTEMD_MANAGER_IFACE, member, signature, body
        )

    async def unit_state(self, unit: str) -> tuple[str, str]:
        """(LoadState, ActiveState); ("not-found", "inactive") for a unit systemd does not know."""
        _check_unit(unit)
        try:
            (path,) = await self._manager("LoadUnit", "s", [unit])
        except BusCallError as e:
            if e.name.endswith(("NoSuchUnit", "LoadFailed")):
                return "not-found", "inactive"
            raise Failed(f"systemd could not load {unit}: {e.text or e.name}") from e
        values = {}
        for prop in ("LoadState", "ActiveState"):
            try:
                (v,) = await self._calls.call(
                    SYSTEMD_NAME,
                    path,
                    "org.freedesktop.DBus.Properties",
                    "Get",
                    "ss",
                    [SYSTEMD_UNIT_IFACE, prop],
                )
            except BusCallError as e:
                raise Failed(f"systemd could not say the {prop} of {unit}: {e.text or e.name}") from e
            values[prop] = str(v.value)
        return values["LoadState"], values["ActiveState"]

    async def run_job(self, verb: str, unit: str, deadline: float) -> None:
        """StartUnit/StopUnit in replace mode and wait for the job; Failed unless its result is done."""
        _check_unit(unit)
        try:
            (job,) = await self._manager(verb, "ss", [unit, "replace"])
        except BusCallError as e:
            raise Failed(f"systemd refused to {verb[:-4].lower()} {unit}: {e.text or e.name}") from e
        result = await self._wait_job(str(job), unit, deadline)
        if result != "done":
            raise Failed(f"systemd could not {verb[:-4].lower()} {unit}: the job ended with {result!r}")

    async def stop_unit(self, unit: str) -> None:
        load, active = await self.unit_state(unit)
        if load == "not-found" or active in NOT_RUNNING:
            log.info(
                "%s is not running: nothing to stop", unit, extra={"UNIT": unit, "ACTION": Action.STOP_UNIT}
            )
            return
        await self.run_job("StopUnit", unit, self.unit_deadline)
        log.info("stopped %s", unit, extra={"UNIT": unit, "ACTION": Action.STOP_UNIT})

    async def start_unit(self, unit: str) -> None:
        await self.run_job("StartUnit", unit, self.unit_deadline)
        log.info("started %s", unit, extra={"UNIT": unit, "ACTION": Action.START_UNIT})

    async def load_module(self, module: str) -> None:
        try:
            DriverName.parse(module)  # the one rule for a driver or module name
        except InvalidDriverName:
            raise VFIONotAvailable(f"{module!r} is not a kernel module name") from None
        if self._host.module_loaded(module_name(module)):
            return
        unit = f"modprobe@{module}.service"
        try:
            await self.run_job("StartUnit", unit, self.modprobe_deadline)
        except (Failed, Timeout) as e:
            raise VFIONotAvailable(
                f"kernel module {module} could not be loaded: {e}; run: {modprobe_hint(module)}"
            ) from e
        if not self._host.module_loaded(module_name(module)):
            raise VFIONotAvailable(
                f"kernel module {module} is not loaded after {unit} ran (is it installed for this kernel?); "
                f"run: {modprobe_hint(module)}"
            )
        log.info("loaded kernel module %s", module, extra={"ACTION": Action.LOAD_MODULE, "MODULE": module})

    # ----- the core's synchronous protocols -------------------------------------------------------------

    def _sync(self, coro: Coroutine[Any, Any, T], deadline: float) -> T:
        if _on_loop_thread(self._loop):
            coro.close()
            raise RuntimeError("systemd calls from the event loop thread would deadlock it")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=deadline + 30.0)
        except TimeoutError:
            fut.cancel()
            raise Timeout("systemd did not answer in time") from None

    def is_active(self, unit: str) -> bool:
        _load, active = self._sync(self.unit_state(unit), self.unit_deadline)
        return active in ACTIVE_STATES

    def stop(self, unit: str) -> None:
        self._sync(self.stop_unit(unit), self.unit_deadline)

    def start(self, unit: str) -> None:
        self._sync(self.start_unit(unit), self.unit_deadline)

    def load(self, module: str) -> None:
        self._sync(self.load_module(module), self.modprobe_deadline)


UNIT_ACTIONS: Final = {"stop": Action.STOP_UNIT, "start": Action.START_UNIT}


class UnitsLeftAlone:
    """The UnitController when systemd is not on the bus: units are not touched (said once in the log)."""

    def __init__(self) -> None:
        self._said = False
        self._lock = threading.Lock()

    def _say(self, what: str, unit: str) -> None:
        with self._lock:
            if self._said:
                return
            self._said = True
        log.warning(
            "systemd is not on the bus: units such as %s are left alone (asked to %s it); stop GPU daemons "
            "yourself before binding their devices",
            unit,
            what,
            extra={"UNIT": unit, "ACTION": UNIT_ACTIONS.get(what, Action.SYSTEMD_WATCH)},
        )

    def is_active(self, unit: str) -> bool:
        self._say("check", unit)
        return False

    def stop(self, unit: str) -> None:
        self._say("stop", unit)

    def start(self, unit: str) -> None:
        self._say("start", unit)


def _check_unit(unit: str) -> None:
    if not _UNIT_RE.fullmatch(unit):
        raise Failed(f"{unit!r} is not a systemd unit name")


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
