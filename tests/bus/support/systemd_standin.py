"""A small `org.freedesktop.systemd1` of our own for tests, written with dbus-fast.

It has what vfiod uses and the semantics that matter: `Subscribe`, `LoadUnit`/`GetUnit` (unit objects
with `Id`, `LoadState`, `ActiveState`; `NoSuchUnit` for GetUnit of an unknown unit, `not-found` from
LoadUnit), `StartUnit`/`StopUnit` returning a job path and announcing the job's end with `JobRemoved` —
after the reply, or (with `early_job_removed`) before it, as real systemd may. `modprobe@<m>.service`
loads module m into the kernel simulator; other units are the simulator's fake daemons
(`processes.start_unit`/`stop_unit`) or, without a simulator, a state kept here. Knobs for failures: a
unit whose jobs never finish (`hang_units`), a job result other than "done" (`job_results`), a modprobe
that loads nothing (`modprobe_works`).

Runs in-process on any event loop: `standin = await SystemdStandin.start(address, sim_root=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

from dbus_fast import BusType, DBusError, PropertyAccess
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from vfiod.bus.names import SYSTEMD_MANAGER_IFACE, SYSTEMD_NAME, SYSTEMD_PATH, SYSTEMD_UNIT_IFACE
from vfiod_sim import SimulatedKernel, processes

NoReply = Annotated[None, DBusSignature("")]
JobNewArgs = Annotated[list[object], DBusSignature("uos")]
JobRemovedArgs = Annotated[list[object], DBusSignature("uoss")]


def unit_path(unit: str) -> str:
    """systemd's escaping of a unit name into an object path element."""
    out = "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)
    return f"{SYSTEMD_PATH}/unit/{out}"


class UnitObject(ServiceInterface):
    def __init__(self, standin: SystemdStandin, unit: str) -> None:
        super().__init__(SYSTEMD_UNIT_IFACE)
        self._standin = standin
        self._unit = unit

    @dbus_property(access=PropertyAccess.READ, name="Id")
    def unit_id(self) -> DBusStr:
        return self._unit

    @dbus_property(access=PropertyAccess.READ, name="LoadState")
    def load_state(self) -> DBusStr:
        return "loaded" if self._standin.known(self._unit) else "not-found"

    @dbus_property(access=PropertyAccess.READ, name="ActiveState")
    def active_state(self) -> DBusStr:
        return "active" if self._standin.active(self._unit) else "inactive"


class ManagerObject(ServiceInterface):
    def __init__(self, standin: SystemdStandin) -> None:
        super().__init__(SYSTEMD_MANAGER_IFACE)
        self._s = standin

    @dbus_method(name="Subscribe")
    def subscribe(self) -> NoReply:
        self._s.calls.append(("Subscribe", ""))

    @dbus_method(name="Unsubscribe")
    def unsubscribe(self) -> NoReply:
        self._s.calls.append(("Unsubscribe", ""))

    @dbus_method(name="GetUnit")
    def get_unit(self, name: DBusStr) -> DBusObjectPath:
        self._s.calls.append(("GetUnit", name))
        if not self._s.known(name):
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return self._s.unit_object(name)

    @dbus_method(name="LoadUnit")
    def load_unit(self, name: DBusStr) -> DBusObjectPath:
        self._s.calls.append(("LoadUnit", name))
        return self._s.unit_object(name)

    @dbus_method(name="StartUnit")
    async def start_unit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        self._s.calls.append(("StartUnit", name))
        return await self._s.job(name, "start")

    @dbus_method(name="StopUnit")
    async def stop_unit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        self._s.calls.append(("StopUnit", name))
        return await self._s.job(name, "stop")

    @dbus_signal(name="JobNew")
    def job_new(self, job_id: int, job: str, unit: str) -> JobNewArgs:
        return [job_id, job, unit]

    @dbus_signal(name="JobRemoved")
    def job_removed(self, job_id: int, job: str, unit: str, result: str) -> JobRemovedArgs:
        return [job_id, job, unit, result]


class SystemdStandin:
    def __init__(self, bus: MessageBus, sim_root: Path | None) -> None:
        self.bus = bus
        self.sim_root = sim_root
        self.kernel = SimulatedKernel(sim_root) if sim_root is not None else None
        self.manager = ManagerObject(self)
        self.calls: list[tuple[str, str]] = []
        self.early_job_removed = False
        self.hang_units: set[str] = set()
        self.job_results: dict[str, str] = {}
        self.modprobe_works = True
        self.extra_units: dict[str, bool] = {}  # unit -> active, for units without a simulator behind them
        self._units: dict[str, UnitObject] = {}
        self._next_job = 0

    @classmethod
    async def start(cls, address: str | None = None, *, sim_root: Path | None = None) -> SystemdStandin:
        bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        standin = cls(bus, sim_root)
        bus.export(SYSTEMD_PATH, standin.manager)
        await bus.request_name(SYSTEMD_NAME)
        return standin

    async def stop(self) -> None:
        if self.bus.connected:
            await self.bus.release_name(SYSTEMD_NAME)
            self.bus.disconnect()

    # ----- units --------------------------------------------------------------------------------------

    def _sim_units(self) -> set[str]:
        if self.kernel is None:
            return set()
        return {p.cgroup_unit for p in self.kernel.profile.processes if p.cgroup_unit}

    def known(self, unit: str) -> bool:
        return unit.startswith("modprobe@") or unit in self.extra_units or unit in self._sim_units()

    def active(self, unit: str) -> bool:
        if unit in self.extra_units:
            return self.extra_units[unit]
        if unit.startswith("modprobe@"):
            return False  # a oneshot without RemainAfterExit
        if self.sim_root is not None and unit in self._sim_units():
            return processes.unit_active(self.sim_root, unit)
        return False

    def unit_object(self, unit: str) -> str:
        path = unit_path(unit)
        if unit not in self._units:
            obj = UnitObject(self, unit)
            self._units[unit] = obj
            self.bus.export(path, obj)
        return path

    async def job(self, unit: str, verb: str) -> str:
        if not self.known(unit):
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {unit} not found.")
        self._next_job += 1
        job_id = self._next_job
        job = f"{SYSTEMD_PATH}/job/{job_id}"
        self.unit_object(unit)
        self.manager.job_new(job_id, job, unit)
        if unit in self.hang_units:
            return job  # never finishes
        result = self.job_results.get(unit, "done")
        if result == "done":
            self._act(unit, verb)
        if self.early_job_removed:
            self.manager.job_removed(job_id, job, unit, result)
        else:
            asyncio.get_running_loop().call_later(0.01, self.manager.job_removed, job_id, job, unit, result)
        return job

    def _act(self, unit: str, verb: str) -> None:
        if unit.startswith("modprobe@"):
            module = unit.removeprefix("modprobe@").removesuffix(".service")
            if verb == "start" and self.modprobe_works and self.kernel is not None:
                # modprobe@.service ignores modprobe's failure (ExecStart=-...)
                with contextlib.suppress(OSError):
                    self.kernel.load_module(module)
            return
        if unit in self.extra_units:
            self.extra_units[unit] = verb == "start"
        elif self.sim_root is not None:
            if verb == "stop":
                processes.stop_unit(self.sim_root, unit)
            else:
                processes.start_unit(self.sim_root, unit)
