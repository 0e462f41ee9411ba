"""vfiod's configuration file, `/etc/vfiod/vfiod.toml` by default, validated with pydantic.

Owns the file's schema and turning any problem with it into one line that names the file, the key and
what is wrong (`ConfigError`). The file is optional: without it every setting has its default. Example:

    # The file with every key and its default: /usr/share/doc/vfiod/examples/vfiod.toml.example.

    # Units held stopped while a GPU of that PCI vendor is bound or unbound (default: NVIDIA's
    # nvidia-persistenced; a vendor not named here keeps its default). An empty list holds nothing.
    [persistence_units]
    "10de" = ["nvidia-persistenced.service"]

    # How long one sysfs write may take, in seconds: `default`, and per driver (slow GPU drivers get
    # at least 30-60 s built in; a value here can only raise a driver's deadline above `default`).
    [deadlines]
    default = 10
    [deadlines.drivers]
    nvidia = 90

    # Devices anyone with the `register` authorization may register even though they are not display
    # controllers: PCI addresses or vendor:device ids.
    register_allow = ["0000:41:00.0", "15b3:101d"]

    # How long a vGPU vfiod created may outlive its instance before Reconcile destroys it, in seconds
    # (hypeman creates the vGPU before it starts the VM, so a young one is not yet an orphan).
    vgpu_orphan_grace = 300

    # Seconds the persistence units stay stopped after the last bind/unbind, for the next one to share.
    persistence_linger = 2

    # How Attach hands devices over when the caller does not say: "node" (the group node is given to the
    # owner) or "fd" (nodes stay root's; OpenDevices passes descriptors; needs VFIO cdevs and iommufd).
    handoff = "node"

    # What one D-Bus connection may cost vfiod at a time: calls being handled, and bytes of replies
    # marshalled but not yet taken by the bus socket. A call beyond either gets Error.Busy at once.
    [per_caller]
    max_calls_in_flight = 32
    max_queued_reply_bytes = 16777216

    # The Prometheus metrics as a node_exporter textfile (empty: none; off while the directory does not
    # exist), rewritten every `interval` seconds.
    [metrics]
    textfile = "/var/lib/prometheus/node-exporter/vfiod.prom"
    interval = 15
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Final, Literal

# No pydantic plugins in a root daemon: pydantic would otherwise scan every installed distribution's entry
# points when the first model is built and import what they name (code vfiod never asked for, run as root;
# the scan alone costs ~8 MB of resident memory and ~40 ms at start). Read when models are built, not here.
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from vfiod.core.persistence import DEFAULT_UNITS
from vfiod.core.settings import ManagerConfig
from vfiod.host.pciaddr import DriverName, InvalidDriverName, InvalidPciAddressText, PciAddress
from vfiod.host.writes import SLOW_DRIVERS, DeadlinePolicy

DEFAULT_PATH: Final = Path("/etc/vfiod/vfiod.toml")
# Debian's prometheus-node-exporter reads *.prom files here (its textfile collector's directory).
DEFAULT_TEXTFILE: Final = "/var/lib/prometheus/node-exporter/vfiod.prom"

_VENDOR_RE: Final = re.compile(r"[0-9a-f]{4}")
_IDS_RE: Final = re.compile(r"[0-9a-f]{4}:[0-9a-f]{4}")
_UNIT_RE: Final = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(service|scope|target|socket|mount)")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


def _vendor(value: str) -> str:
    v = value.lower().removeprefix("0x")
    if not _VENDOR_RE.fullmatch(v):
        raise ValueError(f"{value!r} is not a PCI vendor id (4 hex digits, e.g. 10de)")
    return v


def _unit(value: str) -> str:
    if not _UNIT_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a systemd unit name (e.g. nvidia-persistenced.service)")
    return value


def _driver(value: str) -> str:
    try:
        return str(DriverName.parse(value))
    except InvalidDriverName as e:
        raise ValueError(f"{value!r} is not a kernel driver name") from e


def _allow_entry(value: str) -> str:
    v = value.strip().lower()
    if _IDS_RE.fullmatch(v):
        return v
    try:
        return str(PciAddress.parse(v))
    except InvalidPciAddressText as e:
        raise ValueError(
            f"{value!r} is neither a PCI address (dddd:bb:ss.f) nor vendor:device ids (10de:27b8)"
        ) from e


Vendor = Annotated[str, AfterValidator(_vendor)]
Unit = Annotated[str, AfterValidator(_unit)]
Driver = Annotated[str, AfterValidator(_driver)]
AllowEntry = Annotated[str, AfterValidator(_allow_entry)]
Seconds = Annotated[float, Field(gt=0, le=3600)]


class Deadlines(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Seconds = 10.0
    drivers: dict[Driver, Seconds] = Field(default_factory=dict)

    def policy(self) -> DeadlinePolicy:
        return DeadlinePolicy(default=self.default, per_driver={**SLOW_DRIVERS, **self.drivers})


class PerCaller(BaseModel):
    """Per-connection caps. dbus-daemon's own system-bus default lets a connection have 128 calls awaiting
    replies (max_replies_per_connection); the default here sits well below that, so one caller can never
    occupy every worker, and a caller that does not read its replies cannot make vfiod hold more than a
    bounded backlog for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_calls_in_flight: int = Field(default=32, ge=1, le=4096)
    max_queued_reply_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)


def _textfile(value: str) -> str:
    if value and not (value.startswith("/") and value.endswith(".prom") and "\0" not in value):
        raise ValueError(
            f"{value!r} is not an absolute path ending in .prom (node_exporter reads only those)"
        )
    return value


class MetricsConfig(BaseModel):
    """The node_exporter textfile: where (empty: none) and how often it is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    textfile: Annotated[str, AfterValidator(_textfile)] = DEFAULT_TEXTFILE
    interval: float = Field(default=15.0, ge=1, le=3600)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    persistence_units: dict[Vendor, list[Unit]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_UNITS.items()}
    )
    deadlines: Deadlines = Field(default_factory=Deadlines)
    register_allow: list[AllowEntry] = Field(default_factory=list)
    vgpu_orphan_grace: float = Field(default=300.0, ge=0, le=86400)
    persistence_linger: float = Field(default=2.0, ge=0, le=60)
    handoff: Literal["node", "fd"] = "node"
    per_caller: PerCaller = Field(default_factory=PerCaller)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    def manager_config(self) -> ManagerConfig:
        """The core's view of these settings."""
        return ManagerConfig(
            units_by_vendor={k: list(v) for k, v in self.persistence_units.items()},
            register_allow=list(self.register_allow),
            vgpu_orphan_grace=self.vgpu_orphan_grace,
            persistence_linger=self.persistence_linger,
            handoff=self.handoff,
        )

    @field_validator("persistence_units", mode="after")
    @classmethod
    def _per_vendor(cls, given: dict[str, list[str]]) -> dict[str, list[str]]:
        """The table overrides vendor by vendor: adding AMD's units must not drop NVIDIA's default (an
        empty list is how to hold nothing for a vendor)."""
        return {**{k: list(v) for k, v in DEFAULT_UNITS.items()}, **given}


def load(path: Path | None) -> Config:
    """The configuration in `path` (None: the default file, which may be missing). ConfigError if the file
    is unreadable, not TOML, or not a valid configuration."""
    explicit = path is not None
    target = path if path is not None else DEFAULT_PATH
    try:
        text = target.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{target}: no such file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{target}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{target}: not valid TOML: {e}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{target}: {_first_problem(e)}") from None


def _first_problem(e: ValidationError) -> str:
    problems = e.errors(include_url=False)
    if not problems:
        return "not a valid configuration"
    first = problems[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "extra_forbidden":
        msg = "unknown setting"
    msg = msg.removeprefix("Value error, ")
    more = (
        f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        if len(problems) > 1
        else ""
    )
    return f"{where}: {msg}{more}"
