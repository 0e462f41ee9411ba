"""The `org.hypeman.Devices1` service: dispatch of the Manager's methods and the standard interfaces.

Owns what a caller sees on the bus, thinly: one message handler sees every method call first (unknown
actions, wrong signatures, shutdown and per-caller caps are refused there), records the message in a
ContextVar (dbus-fast does not hand it to a method) and lets dbus-fast dispatch the Manager interface
generated from `methods`; each call is then checked and authorized (`requests`), run (`adapters`) and its
outcome mapped by `errors.to_dbus_error`. Blocking work never runs on the event loop; reads and changes
use separate pools, so a sysfs write hung in the kernel cannot delay `ListDevices` or a property read. The
standard interfaces are answered here, authorized like any other method; device objects (`objects`) are
not exported through dbus-fast, whose InterfacesAdded would come from the device's path, where
ObjectManager clients do not listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from dbus_fast import DBusError, ErrorType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from vfiod import __version__, phases
from vfiod.bus import adapters, errors, methods, requests, standard
from vfiod.bus.authz import ACTIONS, MUTATING, Authorizer, action_for, denial_message
from vfiod.bus.call import CURRENT_MESSAGE, Call
from vfiod.bus.connection import Connection
from vfiod.bus.names import (
    DEVICE_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    STANDARD_IFACES,
    device_path,
)
from vfiod.bus.objects import DeviceObjects
from vfiod.bus.shared_reads import FairLanes, Snapshots
from vfiod.bus.uevents import Uevent
from vfiod.config import PerCaller
from vfiod.core import metrics
from vfiod.core.errors import (
    Busy,
    NotAuthorized,
)
from vfiod.core.manager import Manager
from vfiod.core.records import Device
from vfiod.host import procfs
from vfiod.host.host import Host
from vfiod.host.writes import WriteRecord
from vfiod.logevents import Action, MessageId

log = logging.getLogger("vfiod.bus")

T = TypeVar("T")

# Whose turn a read of this task waits for: the caller's unique name for an unprivileged inspect call,
# None (the priority pool) for mutating and uid-0 calls and for vfiod's own housekeeping.
READ_LANE: contextvars.ContextVar[str | None] = contextvars.ContextVar("vfiod_read_lane", default=None)

READ_WORKERS: Final = 16
CALL_WORKERS: Final = 48
PRIORITY_READ_WORKERS: Final = 8
# Seconds after a group node's uevent at which its grant is re-checked: udev applies its rules some
# milliseconds after the kernel's event, later on a busy host (core/grants.py).
GRANT_RECHECK_DELAYS: Final = (0.3, 1.5, 5.0)


class Service:
    """Everything behind the bus name: the Manager object, the device objects, the standard interfaces."""

    def __init__(
        self,
        bus: MessageBus,
        manager: Manager,
        authz: Authorizer,
        *,
        proc_host: Host | None = None,
        read_workers: int = READ_WORKERS,
        call_workers: int = CALL_WORKERS,
        per_caller: PerCaller | None = None,
    ) -> None:
        self.bus = bus
        self.metrics = metrics.Metrics(__version__)
        self.manager = manager
        self.authz = authz
        self.loop = asyncio.get_running_loop()
        # Callers are real processes: their /proc is the real one even when the host is simulated.
        self._proc_host = proc_host or manager.host
        self._reads = ThreadPoolExecutor(read_workers, thread_name_prefix="vfiod-read")
        self._calls = ThreadPoolExecutor(call_workers, thread_name_prefix="vfiod-call")
        self._priority_reads = ThreadPoolExecutor(PRIORITY_READ_WORKERS, thread_name_prefix="vfiod-prio")
        self.lanes = FairLanes(self._reads, read_workers, self._priority_reads)
        self.snapshots = Snapshots()
        self.interface = methods.manager_interface(self)
        self._signatures = {
            m.name: "".join(str(a.signature) for a in m.in_args) for m in self.interface.introspect().methods
        }
        self.objects = DeviceObjects(self.read, manager, self._send)
        self._refresh_queued: set[str] = set()  # PCI addresses with a manager re-read queued (uevents)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True
        self._in_flight = 0
        # What one connection may cost at a time (the configuration's [per_caller]); beyond it: Error.Busy.
        self.max_calls_per_caller = 0
        self.max_queued_reply_bytes = 0
        self.set_caps(per_caller or PerCaller())
        self._calls_of: dict[str, int] = {}  # unique name -> calls accepted and not yet answered
        self.refused_busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ----- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Export the Manager and the current devices (before the bus name is requested)."""
        self.bus.add_message_handler(self._on_message)
        self.bus.export(MANAGER_PATH, self.interface)
        await self.sync(announce=False)
        self.manager.add_change_listener(self._changed_from_thread)
        self.manager.host.add_write_listener(self._wrote)
        self.manager.host.add_write_listener(self.metrics.observe_write)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting calls and wait up to `timeout` s for those in flight; True if none is left."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._priority_reads.shutdown(wait=False, cancel_futures=True)
        self.manager.host.remove_write_listener(self._wrote)
        self.manager.host.remove_write_listener(self.metrics.observe_write)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _begin(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def read(self, fn: Callable[[], T]) -> T:
        """Run a read off the loop: in the caller's turn (READ_LANE), or at once on the priority pool."""
        return await self.lanes.run(READ_LANE.get(), fn)

    async def shared(self, key: Hashable, fn: Callable[[], T]) -> T:
        """A read whose result identical calls share while it is fresh (`Snapshots`). Priority calls never
        wait for a scan queued in someone else's turn: they share only scans on the priority pool."""
        lane = READ_LANE.get()
        value = await self.snapshots.get(key, lambda: self.lanes.run(lane, fn), priority=lane is None)
        if isinstance(self.bus, Connection):
            self.bus.frozen.freeze(value)  # the same object answers many calls: marshal its body once
        return value

    async def render_metrics(self) -> str:
        """GetMetrics and the textfile: counters as they are now (not shared), gauges read afresh."""
        return await self.read(lambda: self.metrics.render(metrics.gauges(self.manager.deps)))

    def _wrote(self, record: WriteRecord) -> None:
        self.snapshots.invalidate()  # a sysfs write by vfiod (called on the writing thread)

    async def change(self, fn: Callable[[], T]) -> T:
        # In the call's context: the manager's phases (vfiod.phases) land in the call's outcome line.
        return await self.loop.run_in_executor(self._calls, phases.carried(fn))

    def caller_exe(self, pid: int | None) -> str:
        if pid is None:
            return ""
        try:
            return procfs.process_info(self._proc_host, pid).exe
        except Exception:
            return ""

    # ----- dispatch -----------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> Message | bool | None:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        iface, member = msg.interface, msg.member or ""
        if iface is None:
            return self._refuse(msg, errors.invalid_argument("vfiod needs the interface named in every call"))
        if iface in STANDARD_IFACES:
            if (iface, member) not in standard.SIGNATURES:
                return None  # dbus-fast answers UnknownMethod
            if (busy := self._over_cap(msg)) is not None:
                return busy
            self._begin()
            self._spawn(self._standard(msg))
            return True
        if iface != MANAGER_IFACE or msg.path != MANAGER_PATH:
            return None  # dbus-fast answers UnknownObject / UnknownMethod
        expected = self._signatures.get(member)
        if expected is None:
            return None
        if action_for(iface, member) is None:
            return self._refuse(msg, errors.not_authorized(f"{member} is not in vfiod's authorization table"))
        if msg.signature != expected:
            return self._refuse(
                msg,
                errors.invalid_argument(
                    f"{member} takes arguments of type {expected!r}, not {msg.signature or 'none'!r}"
                ),
            )
        if not self.accepting:
            return self._refuse(msg, errors.failed("vfiod is shutting down; call again when it is back"))
        if (busy := self._over_cap(msg)) is not None:
            return busy
        CURRENT_MESSAGE.set(msg)
        return None

    def set_caps(self, per_caller: PerCaller) -> None:
        """Apply the per-caller caps (at start and on reload; calls already in flight keep their slots)."""
        self.max_calls_per_caller = per_caller.max_calls_in_flight
        self.max_queued_reply_bytes = per_caller.max_queued_reply_bytes

    def _over_cap(self, msg: Message) -> Message | bool | None:
        """Count the call against its sender, or refuse it with Busy when the sender is at its cap.

        Every call counted here is released by `_release` once it is answered."""
        sender = msg.sender or ""
        calls = self._calls_of.get(sender, 0)
        queued = self.bus.queued_bytes(sender) if isinstance(self.bus, Connection) else 0
        if calls < self.max_calls_per_caller and queued < self.max_queued_reply_bytes:
            self._calls_of[sender] = calls + 1
            return None
        self.refused_busy += 1
        self.metrics.observe_busy()
        if self.refused_busy == 1 or self.refused_busy % 1000 == 0:
            # Once, then every thousandth: a flood must not turn into a flood of log lines.
            log.warning(
                "%s has %d calls in flight and %d bytes of replies waiting; refusing its calls with Busy "
                "(%d refused so far, all callers)",
                sender,
                calls,
                queued,
                self.refused_busy,
                extra={"ACTION": Action.BUSY, "CALLER_BUS_NAME": sender},
            )
        reason = (
            f"{calls} calls in flight (at most {self.max_calls_per_caller})"
            if calls >= self.max_calls_per_caller
            else f"{queued} bytes of replies it has not read yet (at most {self.max_queued_reply_bytes})"
        )
        return self._refuse(
            msg,
            errors.to_dbus_error(
                Busy(
                    f"this connection already has {reason}; nothing was done: call again once earlier "
                    "calls are answered"
                )
            ),
        )

    def _release(self, msg: Message) -> None:
        sender = msg.sender or ""
        left = self._calls_of.get(sender, 0) - 1
        if left > 0:
            self._calls_of[sender] = left
        else:
            self._calls_of.pop(sender, None)

    @staticmethod
    def _refuse(msg: Message, err: DBusError) -> Message | bool:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        return err._as_message(msg)

    async def dispatch(self, method: methods.Method, args: tuple[Any, ...]) -> Any:
        """A Manager method call from the generated interface: checked, authorized once per device it
        names, then run by its adapter; `handle` maps any failure to a contract error."""

        async def run(call: Call) -> Any:
            req = await requests.prepare(method, args, lambda keys: self.read(lambda: self._devices(keys)))
            for details in req.details:
                await call.authorize(details)
            return await adapters.ADAPTERS[method.handler](self, call.core_caller(), req)

        return await self.handle(method.name, run)

    def _devices(self, keys: list[str]) -> list[Device]:
        """The registered devices named by `keys` (ids or names), each once, in the order named."""
        seen: dict[str, Device] = {}
        for key in keys:
            device = self.manager.get_device(key)
            seen.setdefault(device.id, device)
        return list(seen.values())

    async def handle(self, method: str, body: Callable[[Call], Awaitable[T]]) -> T:
        """Run one Manager method: identify the caller, run `body`, map any failure to a contract error."""
        msg = CURRENT_MESSAGE.get()
        if msg is None:
            raise errors.failed("vfiod lost track of this call; call again")
        self._begin()
        call = Call(self.authz, self.loop, self.caller_exe, msg, method)
        started = time.monotonic()
        try:
            await call.identify()
            privileged = call.action in MUTATING or call.who.uid == 0
            READ_LANE.set(None if privileged else call.who.sender)
            result = await body(call)
        except Exception as e:
            err = errors.to_dbus_error(e, context=method)
            self.metrics.observe_call(method, err.type.rsplit(".", 1)[-1], time.monotonic() - started)
            if call.action in MUTATING and call.who.uid >= 0:
                call.outcome(err.type.rsplit(".", 1)[-1], started, err.text, e)
            raise err from None
        else:
            self.metrics.observe_call(method, "ok", time.monotonic() - started)
            if call.action in MUTATING:
                call.outcome("ok", started)
            return result
        finally:
            if call.action in MUTATING:
                # Whatever it changed (the registry too, which no uevent announces) is read afresh.
                self.snapshots.invalidate()
            self._release(msg)
            self._end()

    # ----- the standard interfaces --------------------------------------------------------------------

    async def _standard(self, msg: Message) -> None:
        try:
            reply = await self._standard_reply(msg)
        except Exception as e:
            err = (
                e
                if isinstance(e, DBusError)
                else errors.to_dbus_error(e, context=f"{msg.interface}.{msg.member}")
            )
            reply = err._as_message(msg)
        finally:
            self._release(msg)
            self._end()
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def _standard_reply(self, msg: Message) -> Message:
        iface, member = msg.interface or "", msg.member or ""
        expected = standard.SIGNATURES[(iface, member)]
        if msg.signature != expected:
            raise errors.invalid_argument(
                f"{iface}.{member} takes {expected or 'no arguments'!r}, not {msg.signature!r}"
            )
        if not self.accepting:
            raise errors.failed("vfiod is shutting down; call again when it is back")
        who = await self.authz.identify(msg.sender or "")
        READ_LANE.set(None if who.uid == 0 else who.sender)
        action = ACTIONS[(iface, member)]
        decision = await self.authz.check(
            who, action, interactive=bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        )
        if not decision.allowed:
            log.warning(
                "%s.%s on %s by uid %d denied (%s)",
                iface,
                member,
                msg.path,
                who.uid,
                decision.result,
                extra={
                    "ACTION": Action.STANDARD_CALL,
                    "METHOD": f"{iface}.{member}",
                    "MESSAGE_ID": MessageId.CALL_DENIED,
                    "CALLER_UID": who.uid,
                    "POLKIT_RESULT": decision.result,
                    "POLKIT_ACTION": action,
                },
            )
            raise NotAuthorized(denial_message(who, action, decision, False))
        path = msg.path or "/"
        if member == "Introspect":
            return Message.new_method_return(msg, "s", [self._introspect(path)])
        if member == "Ping":
            return Message.new_method_return(msg)
        if member == "GetMachineId":
            return Message.new_method_return(msg, "s", [standard.machine_id()])
        if member == "GetManagedObjects":
            if path != MANAGER_PATH:
                raise DBusError(ErrorType.UNKNOWN_METHOD, f"{path} is not an object manager")
            await self.sync()
            managed = {device_path(i): {DEVICE_IFACE: dict(p)} for i, p in sorted(self.objects.props.items())}
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [managed])
        return await self._properties(msg, member, path)

    async def _properties(self, msg: Message, member: str, path: str) -> Message:
        iface_name = str(msg.body[0])
        if path == MANAGER_PATH:
            if iface_name not in (MANAGER_IFACE, *STANDARD_IFACES):
                raise DBusError(ErrorType.UNKNOWN_INTERFACE, f"{path} has no interface {iface_name!r}")
            return standard.manager_property_reply(msg, member, iface_name == MANAGER_IFACE)
        device_id = self.objects.id_at(path)
        if device_id is None:
            raise DBusError(ErrorType.UNKNOWN_OBJECT, f"there is no object at {path}")
        if iface_name != DEVICE_IFACE:
            if iface_name in STANDARD_IFACES and member == "GetAll":
                return Message.new_method_return(msg, "a{sv}", [{}])
            raise DBusError(ErrorType.UNKNOWN_INTERFACE, f"{path} has no interface {iface_name!r}")
        await self.objects.refresh(device_id)
        props = self.objects.props.get(device_id)
        if props is None:
            raise DBusError(ErrorType.UNKNOWN_OBJECT, f"the device at {path} was unregistered")
        if member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [dict(props)])
        name = str(msg.body[1])
        if name not in props:
            raise DBusError(ErrorType.UNKNOWN_PROPERTY, f"{DEVICE_IFACE} has no property {name!r}")
        if member == "Set":  # the kernel and vfiod's calls decide every property, never a Set
            raise DBusError(ErrorType.PROPERTY_READ_ONLY, f"{DEVICE_IFACE}.{name} is read-only")
        return Message.new_method_return(msg, "v", [props[name]])

    def _introspect(self, path: str) -> str:
        return standard.introspect(path, [device_path(i) for i in self.objects.props], self.interface)

    # ----- device objects -----------------------------------------------------------------------------

    async def sync(self, *, announce: bool = True) -> None:
        await self.objects.sync(announce=announce)

    def _send(self, msg: Message) -> None:
        if self.bus.connected:
            self.bus.send(msg)

    async def sync_quietly(self) -> None:
        try:
            await self.sync()
        except Exception:
            log.exception("re-reading the devices after a call failed")

    def _changed_from_thread(self, device_id: str) -> None:
        """The manager's change listener (called from worker threads)."""
        self.snapshots.invalidate()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            self.loop.call_soon_threadsafe(self.objects.schedule, device_id)

    def on_uevent(self, ev: Uevent) -> None:
        if ev.vfio_group is not None or ev.lost:
            # udev applies its rules to a group node after the kernel's event: look once it had time to.
            groups = None if ev.vfio_group is None else [ev.vfio_group]  # lost: every attached group
            for delay in GRANT_RECHECK_DELAYS:
                self.loop.call_later(delay, self._recheck_grants, groups)
        if ev.vfio_group is not None:
            return
        self.snapshots.invalidate()  # any device: ListAvailable and GetHostStatus cover them all
        if ev.lost:
            self.objects.schedule("")
            return
        for device_id, props in self.objects.props.items():
            if props["PciAddress"].value == ev.pci_address:
                log.debug(
                    "uevent %s for %s", ev.action, ev.pci_address, extra={"PCI_ADDRESS": ev.pci_address}
                )
                # A bind by another tool changes the stored state too; the manager re-reads it off the
                # loop and its change listener then refreshes the object. One re-read per device is queued
                # at a time: a burst of uevents costs one, not a worker each.
                if ev.pci_address not in self._refresh_queued:
                    self._refresh_queued.add(ev.pci_address)
                    self._reads.submit(self._refresh_device, ev.pci_address)
                self.objects.schedule(device_id)

    def _recheck_grants(self, groups: list[int] | None) -> None:
        def work() -> None:
            try:
                self.manager.refreshes.grants(groups)
            except Exception:
                log.exception("re-checking the group nodes' grants failed")

        with contextlib.suppress(RuntimeError):  # the pool is shut down: the daemon is exiting
            self._reads.submit(work)

    def _refresh_device(self, pci_address: str) -> None:
        self._refresh_queued.discard(pci_address)  # from here on, a new uevent queues another re-read
        self.manager.refresh_device(pci_address)

    @property
    def device_ids(self) -> list[str]:
        return sorted(self.objects.props)
