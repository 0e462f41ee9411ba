"""TAP (version 13) as the guest writes it and the host reads it back: one line per scenario, then `# `
diagnostics. Standard library only: the guest imports this with Debian's /usr/bin/python3.

The writer flushes every line, so a guest that dies half-way still leaves the scenarios it finished.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TapResult:
    number: int
    name: str
    ok: bool
    skip: str | None = None
    diagnostics: list[str] = field(default_factory=list)


@dataclass
class TapReport:
    planned: int | None = None
    results: list[TapResult] = field(default_factory=list)
    bail_out: str | None = None

    def by_name(self) -> dict[str, TapResult]:
        return {r.name: r for r in self.results}


class TapWriter:
    def __init__(self, path: Path, planned: int) -> None:
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open across scenarios
        self._n = 0
        self._line("TAP version 13")
        self._line(f"1..{planned}")

    def _line(self, text: str) -> None:
        self._f.write(text + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def result(
        self, name: str, ok: bool, diagnostics: list[str] | None = None, skip: str | None = None
    ) -> None:
        self._n += 1
        directive = f" # SKIP {skip}" if skip else ""
        self._line(f"{'ok' if ok else 'not ok'} {self._n} - {name}{directive}")
        for line in diagnostics or []:
            for part in line.splitlines() or [""]:
                self._line(f"# {part}")

    def bail_out(self, reason: str) -> None:
        self._line(f"Bail out! {reason}")

    def close(self) -> None:
        self._f.close()


def parse(text: str) -> TapReport:
    report = TapReport()
    current: TapResult | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        if line.startswith("1.."):
            with contextlib.suppress(ValueError, IndexError):
                report.planned = int(line[3:].split()[0])
            continue
        if line.startswith("Bail out!"):
            report.bail_out = line[len("Bail out!") :].strip()
            current = None
            continue
        ok = line.startswith("ok ")
        if ok or line.startswith("not ok "):
            rest = line[3:] if ok else line[7:]
            num_text, _, desc = rest.partition(" ")
            desc = desc.removeprefix("- ")
            skip: str | None = None
            name, sep, directive = desc.partition(" # ")
            if sep and directive.upper().startswith("SKIP"):
                skip = directive[4:].strip() or "skipped"
            elif sep:
                name = desc
            try:
                number = int(num_text)
            except ValueError:
                number = len(report.results) + 1
            current = TapResult(number=number, name=name.strip(), ok=ok, skip=skip)
            report.results.append(current)
            continue
        if line.startswith("#") and current is not None:
            current.diagnostics.append(line[2:] if line.startswith("# ") else line[1:])
    return report


def read(path: Path) -> TapReport:
    try:
        return parse(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return TapReport()
