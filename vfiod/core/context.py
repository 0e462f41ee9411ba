"""Who is calling and what a multi-step call reports: the request context every manager method takes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    """Who is calling. `check_admin(details)` asks polkit for org.hypeman.devices.admin; uid 0 always is.
    `touched`, when given, collects the PCI addresses the call acted on, for the call's outcome line."""

    uid: int
    pid: int | None = None
    check_admin: Callable[[Mapping[str, str]], bool] | None = None
    touched: list[str] | None = field(default=None, compare=False)

    def acted(self, addresses: Iterable[object]) -> None:
        if self.touched is not None:
            add_new(self.touched, addresses)

    def is_admin(self, details: Mapping[str, str] | None = None) -> bool:
        if self.uid == 0:
            return True
        return bool(self.check_admin is not None and self.check_admin(dict(details or {})))


def add_new(into: list[str], addresses: Iterable[object]) -> None:
    """Append each address not already in `into`, in order (the addresses a call named or acted on)."""
    into.extend(a for a in dict.fromkeys(map(str, addresses)) if a not in into)


ROOT = Caller(uid=0)


@dataclass
class Report:
    counters: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def to_record(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.counters)
        out["findings"] = list(self.findings)
        return out


__all__ = ["ROOT", "Caller", "Report", "add_new"]
