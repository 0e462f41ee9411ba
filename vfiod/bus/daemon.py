"""`vfiod run`: the daemon's life from start to exit.

Owns the start-up order (bus connection and the authorization mode, said in the first log line; the
registry; the host, real or simulated; systemd or its stand-ins; the manager's start-up recovery; the
objects; uevents; and only then the bus name, so nobody reaches a half-started service), readiness and the
watchdog (sd_notify), SIGHUP (reload the configuration, keeping the old one if the new one is bad) and
SIGTERM (stop accepting calls, let those in flight finish up to a bound, release the name, exit 0).

Exit statuses: 0 after SIGTERM/SIGINT, 1 when it cannot start (no bus, registry unusable, name taken or
denied), 2 for bad configuration or arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dbus_fast import BusType, DBusError, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from vfiod import config as config_mod
from vfiod.bus import logs
from vfiod.bus.authz import Authorizer
from vfiod.bus.calls import Caller
from vfiod.bus.connection import Connection
from vfiod.bus.metrics_file import TextfileWriter, textfile_path
from vfiod.bus.names import BUS_NAME, SYSTEMD_NAME
from vfiod.bus.service import Service
from vfiod.bus.systemd import SystemdClient, UnitsLeftAlone
from vfiod.bus.uevents import NetlinkUevents, SimulatedUevents, UeventSource
from vfiod.core import recovery
from vfiod.core.context import Report
from vfiod.core.manager import Manager
from vfiod.core.registry import Registry, RegistryError
from vfiod.core.system import LoadedModulesOnly, ModuleLoader, UnitController
from vfiod.host.host import Host, HostRoots
from vfiod.logevents import Action

if TYPE_CHECKING:  # the simulator is imported only when --simulate is given (see _host)
    from vfiod_sim.simulation import Simulation

try:
    import systemd.daemon as sd_daemon
except ImportError:  # only needed when started by systemd with NOTIFY_SOCKET
    sd_daemon = None

log = logging.getLogger("vfiod.daemon")

DEFAULT_STATE_DIR: Final = Path("/var/lib/vfiod")
DRAIN_TIMEOUT: Final = 30.0
EXIT_OK: Final = 0
EXIT_START: Final = 1
EXIT_CONFIG: Final = 2


class StartupError(Exception):
    """vfiod cannot start; the message is one line for the operator."""

    def __init__(self, message: str, status: int = EXIT_START) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    bus: str = "system"  # system | session | a D-Bus address
    state_dir: Path | None = None
    config_path: Path | None = None
    simulate: str | None = None
    sim_root: Path | None = None
    drain_timeout: float = DRAIN_TIMEOUT
    verbose: bool = False


def describe_bus(bus: str) -> str:
    return f"the {bus} bus" if bus in ("system", "session") else f"the bus at {bus}"


class LoggedUnits:
    """The simulated systemd of `--simulate`: says what it stops and starts, and does it to the simulator's
    fake processes."""

    def __init__(self, inner: UnitController) -> None:
        self._inner = inner

    def is_active(self, unit: str) -> bool:
        return self._inner.is_active(unit)

    def stop(self, unit: str) -> None:
        log.info("simulated systemd: stopping %s", unit, extra={"UNIT": unit, "ACTION": Action.STOP_UNIT})
        self._inner.stop(unit)

    def start(self, unit: str) -> None:
        log.info("simulated systemd: starting %s", unit, extra={"UNIT": unit, "ACTION": Action.START_UNIT})
        self._inner.start(unit)


class Notifier:
    """sd_notify through systemd-python; silently nothing when not started by systemd."""

    def __init__(self) -> None:
        self._notify: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            if sd_daemon is not None:
                self._notify = sd_daemon.notify
            else:
                log.warning(
                    "NOTIFY_SOCKET is set but systemd-python is missing: cannot tell systemd anything"
                )

    def __call__(self, state: str) -> None:
        if self._notify is not None:
            try:
                self._notify(state)
            except Exception as e:
                log.warning("sd_notify failed: %s", e)

    @staticmethod
    def watchdog_interval() -> float | None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000  # ping at half the interval, as sd_watchdog_enabled(3) advises


class Daemon:
    def __init__(self, options: Options, config: config_mod.Config) -> None:
        self.options = options
        self.config = config
        self.notify = Notifier()
        self.bus: MessageBus | None = None
        self.registry: Registry | None = None
        self.host: Host | None = None
        self.simulation: Simulation | None = None
        self.manager: Manager | None = None
        self.service: Service | None = None
        self.authz: Authorizer | None = None
        self.uevents: UeventSource | None = None
        self.systemd: SystemdClient | None = None
        self.sim_root: Path | None = None
        self._tmp: Path | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.unfinished = 0
        self.recovery: asyncio.Future[None] | None = None  # start-up's background part
        self.metrics_file: TextfileWriter | None = None

    # ----- start --------------------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        loop = asyncio.get_running_loop()
        bus = await self._connect()
        self.bus = bus
        calls = Caller(bus)
        self.authz = Authorizer(calls, own_uid=os.getuid())
        mode = await self.authz.start()
        where = describe_bus(opts.bus)
        if mode == "polkit":
            log.info("vfiod starting on %s (pid %d); every call is authorized by polkit", where, os.getpid())
        else:
            log.warning(
                "no polkitd on %s: vfiod allows only uid 0 and its own uid %d and denies every other caller "
                "(pid %d)",
                where,
                os.getuid(),
                os.getpid(),
                extra={"ACTION": Action.AUTHORIZATION_MODE},
            )
        self.notify("STATUS=starting: reading the registry and the kernel")

        state_dir = opts.state_dir or DEFAULT_STATE_DIR
        if opts.simulate is not None:
            # The simulated host comes first: its own /var/lib/vfiod is where the registry lives by default.
            self.sim_root = opts.sim_root or self._temp_root()
            self.host = self._host()
            state_dir = opts.state_dir or self.sim_root / "var/lib/vfiod"
        try:
            self.registry = Registry.open(state_dir)
        except RegistryError as e:
            raise StartupError(str(e)) from None
        if self.host is None:
            self.host = self._host()
        units, modules = await self._system(calls, loop)
        self.manager = Manager(
            self.host,
            self.registry,
            modules,
            units,
            config=self.config.manager_config(),
            gpu_sriov=self.simulation.gpu_sriov if self.simulation is not None else None,
        )
        # Only the quick part before the name: what was interrupted. Finishing it can take a write's
        # deadline per device, and systemd gives a Type=dbus unit 90 s to take its name.
        report, operations = await loop.run_in_executor(None, self.manager.begin_startup)

        # Callers of a simulated daemon are real processes: read their /proc/<pid>/exe from the real /proc.
        proc_host = self.simulation.caller_host() if self.simulation is not None else None
        self.service = Service(
            bus, self.manager, self.authz, proc_host=proc_host, per_caller=self.config.per_caller
        )
        await self.service.start()
        if self.sim_root is not None:
            self.uevents = SimulatedUevents(loop, self.service.on_uevent, self.sim_root)
        else:
            self.uevents = NetlinkUevents(loop, self.service.on_uevent)
        self.uevents.start()

        await self._request_name(bus, where)
        self.metrics_file = TextfileWriter(
            self.service.render_metrics,
            textfile_path(self.config.metrics.textfile, self.sim_root),
            self.config.metrics.interval,
        )
        self.metrics_file.start()
        devices = len(self.service.device_ids)
        log.info(
            "serving %s on %s: %d registered device%s%s",
            BUS_NAME,
            where,
            devices,
            "" if devices == 1 else "s",
            f" (simulated host {self.simulation.profile.name} at {self.sim_root})" if self.simulation else "",
            extra={"ACTION": Action.READY},
        )
        self._start_watchdog(loop)
        recovering = len(self.manager.recovering)
        if recovering:
            self.notify(
                f"READY=1\nSTATUS=recovering 0 of {recovering} device{'s' if recovering != 1 else ''}"
            )
        self.recovery = asyncio.ensure_future(self._finish_startup(report, operations, devices))

    async def _finish_startup(
        self, report: Report, operations: list[recovery.Operation], devices: int
    ) -> None:
        """Start-up's slow part, while serving: calls on the devices concerned answer Recovering."""
        assert self.manager is not None and self.service is not None
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: vfiod is exiting
                loop.call_soon_threadsafe(self.notify, f"STATUS=recovering {done} of {total} devices")

        try:
            report = await loop.run_in_executor(
                None, functools.partial(self.manager.finish_startup, report, operations, progress)
            )
        except Exception as e:
            log.error("start-up recovery failed: %s", e, exc_info=e, extra={"ACTION": Action.STARTUP})
            return
        counters = ", ".join(f"{k}={v}" for k, v in sorted(report.counters.items()) if v)
        log.info(
            "start-up recovery done%s",
            f": {counters}" if counters else ": the registry and the kernel agree",
            extra={"ACTION": Action.STARTUP},
        )
        self.service.snapshots.invalidate()
        await self.service.sync()
        self.notify(f"READY=1\nSTATUS=serving {devices} registered device{'s' if devices != 1 else ''}")

    async def _connect(self) -> MessageBus:
        bus_opt = self.options.bus
        try:
            # Descriptors are negotiated for OpenDevices' replies; any a caller sends is dropped.
            fds = {"negotiate_unix_fd": True, "keep_received_fds": False}
            if bus_opt == "system":
                bus = Connection(bus_type=BusType.SYSTEM, **fds)
            elif bus_opt == "session":
                bus = Connection(bus_type=BusType.SESSION, **fds)
            else:
                bus = Connection(bus_address=bus_opt, **fds)
            return await bus.connect()
        except Exception as e:
            raise StartupError(
                f"cannot connect to {describe_bus(bus_opt)}: {e or type(e).__name__}"
            ) from None

    def _temp_root(self) -> Path:
        self._tmp = Path(tempfile.mkdtemp(prefix="vfiod-sim-"))
        return self._tmp / "host"

    def _host(self) -> Host:
        policy = self.config.deadlines.policy()
        if self.options.simulate is None:
            return Host(HostRoots(), deadlines=policy)
        from vfiod_sim.simulation import (  # noqa: PLC0415 -- simulator only with --simulate
            Simulation,
            SimulationError,
        )

        root = self.sim_root
        assert root is not None
        try:
            sim = Simulation.open(root, self.options.simulate, deadlines=policy, reuse=True)
        except SimulationError as e:
            raise StartupError(f"--simulate {self.options.simulate}: {e}", EXIT_CONFIG) from None
        if sim.profile.name != self.options.simulate:
            log.warning(
                "%s already holds a simulated %s host; using it (not %s)",
                root,
                sim.profile.name,
                self.options.simulate,
            )
        self.simulation = sim
        return sim.host

    async def _system(
        self, calls: Caller, loop: asyncio.AbstractEventLoop
    ) -> tuple[UnitController, ModuleLoader]:
        assert self.host is not None
        if await calls.name_has_owner(SYSTEMD_NAME):
            # Its own connection: the bus policy keeps systemd's JobRemoved from the one that will own
            # BUS_NAME (vfiod.bus.systemd says why).
            client = SystemdClient(Caller(await self._connect()), self.host, loop)
            self.systemd = client
            await client.subscribe()
            log.info("units and kernel modules through systemd on the bus")
            return client, client
        if self.simulation is not None:
            log.info("simulated host: units and modules through the simulator's stand-in for systemd")
            return LoggedUnits(self.simulation.units), self.simulation.modules
        return UnitsLeftAlone(), LoadedModulesOnly(self.host)

    async def _request_name(self, bus: MessageBus, where: str) -> None:
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            if e.type == "org.freedesktop.DBus.Error.AccessDenied":
                raise StartupError(
                    f"{where} does not allow this process (uid {os.getuid()}) to own {BUS_NAME}; on the "
                    "system bus vfiod runs as root, with "
                    "/usr/share/dbus-1/system.d/org.hypeman.Devices1.conf installed"
                ) from None
            raise StartupError(f"cannot own {BUS_NAME} on {where}: {e.text}") from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise StartupError(f"{BUS_NAME} is already owned on {where}: another vfiod is running there")

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = self.notify.watchdog_interval()
        if interval is None:
            return

        def ping() -> None:
            # From the event loop on purpose: if the loop stops turning, systemd notices.
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        ping()

    # ----- reload and stop ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: read the configuration again; a bad one is reported and the old one kept."""
        self.notify("RELOADING=1")
        try:
            new = config_mod.load(self.options.config_path)
        except config_mod.ConfigError as e:
            log.error("keeping the old configuration: %s", e, extra={"ACTION": Action.RELOAD})
            self.notify("READY=1")
            return False
        self.config = new
        if self.manager is not None:
            self.manager.reconfigure(new.manager_config())
            self.manager.host.deadlines = new.deadlines.policy()
        if self.service is not None:
            self.service.set_caps(new.per_caller)
        if self.metrics_file is not None:
            self.metrics_file.reconfigure(
                textfile_path(new.metrics.textfile, self.sim_root), new.metrics.interval
            )
        log.info(
            "configuration reloaded from %s",
            self.options.config_path or config_mod.DEFAULT_PATH,
            extra={"ACTION": Action.RELOAD},
        )
        self.notify("READY=1")
        return True

    async def stop(self) -> None:
        self.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.uevents is not None:
            self.uevents.stop()
        if self.service is not None and not await self.service.drain(self.options.drain_timeout):
            self.unfinished = self.service.in_flight
            log.warning(
                "exiting with %d call(s) still running after %g s; the next start finishes or rolls back "
                "what they began",
                self.unfinished,
                self.options.drain_timeout,
            )
        if self.manager is not None:  # units kept stopped for a next bind run again now (through systemd)
            await asyncio.get_running_loop().run_in_executor(None, self.manager.hold.end_lingering)
        if self.bus is not None and self.bus.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.release_name(BUS_NAME), 5.0)
            self.bus.disconnect()
        if self.systemd is not None:
            self.systemd.close()
        if self.metrics_file is not None:
            await self.metrics_file.stop()  # the final state, while the registry is still open
        if self.service is not None:
            self.service.close()
        if self.registry is not None and not self.unfinished:
            self.registry.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        log.info("vfiod stopped", extra={"ACTION": Action.STOP})

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except StartupError:
            await self._abandon()
            raise
        bus = self.bus
        assert bus is not None
        disconnected = asyncio.ensure_future(self._wait_disconnect(bus))
        stop_wait = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait({disconnected, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if disconnected in done and not stopping.is_set():
            log.error("the bus connection was lost; exiting so the service manager restarts vfiod")
            await self.stop()
            return EXIT_START
        disconnected.cancel()
        log.info("stopping (signal)", extra={"ACTION": Action.STOP})
        await self.stop()
        return EXIT_OK

    async def _wait_disconnect(self, bus: MessageBus) -> None:
        """Until the bus connection, or the systemd client's own one, is lost."""
        buses = [bus] if self.systemd is None else [bus, self.systemd.bus]
        lost = [asyncio.ensure_future(b.wait_for_disconnect()) for b in buses]  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait(lost, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in lost:
                f.cancel()

    async def _abandon(self) -> None:
        if self.uevents is not None:
            self.uevents.stop()
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()
        if self.systemd is not None:
            self.systemd.close()
        if self.service is not None:
            self.service.close()
        if self.registry is not None:
            self.registry.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def run(options: Options) -> int:
    """The `vfiod run` command: returns the exit status."""
    try:
        cfg = config_mod.load(options.config_path)
    except config_mod.ConfigError as e:
        logs.setup(verbose=options.verbose)
        log.error("bad configuration: %s", e, extra={"ACTION": Action.START})
        return EXIT_CONFIG
    logs.setup(verbose=options.verbose)
    daemon = Daemon(options, cfg)
    try:
        status = asyncio.run(daemon.run())
    except StartupError as e:
        log.error("cannot start: %s", e, extra={"ACTION": Action.START})
        return e.status
    except Exception as e:
        log.critical("vfiod failed: %s: %s", type(e).__name__, e, exc_info=e, extra={"ACTION": Action.START})
        return EXIT_START
    if daemon.unfinished:
        # Worker threads still inside a hung sysfs write would keep the interpreter alive: leave now.
        logging.shutdown()
        os._exit(status)
    return status
