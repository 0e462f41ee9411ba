"""The core's settings (`ManagerConfig`): what of the configuration file the manager and its operations
use (vfiod/config.py turns a validated file into one). The defaults are the file's, except the persistence
linger: the core alone (the simulator's demo, the tests of everything else) starts units at once, while the
daemon passes the file's 2 s."""

from __future__ import annotations

from dataclasses import dataclass, field

from vfiod.core.persistence import DEFAULT_UNITS
from vfiod.core.registry import HandoffMode


@dataclass
class ManagerConfig:
    units_by_vendor: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_UNITS))
    # PCI addresses or vendor:device ids anyone allowed to `register` may register beyond the candidates.
    register_allow: list[str] = field(default_factory=list)
    # Seconds a vGPU vfiod created may outlive its instance before Reconcile destroys it.
    vgpu_orphan_grace: float = 300.0
    # Seconds the persistence units stay stopped after the last bind/unbind, for the next one to share.
    persistence_linger: float = 0.0
    # How Attach hands devices over when the caller does not say (vfiod/core/handoff.py).
    handoff: HandoffMode = "node"
