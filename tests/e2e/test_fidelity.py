"""Real kernel vs simulator: vfiod's binder and guards in a QEMU guest (Debian's bookworm kernel, real
vfio-pci and IOMMU groups), then the same scenarios on the simulator's `qemu-q35` profile.

One guest boot runs every scenario of `trace.SCENARIOS` (tests/e2e/guest_runner.py); `test_kernel` reports
each as its own test. `test_simulator_matches_kernel` replays them on the simulator and compares the two
sysfs traces write by write: a difference is a simulator bug. Differences already reported (and not yet
fixed in the simulator) are listed in KNOWN_SIMULATOR_GAPS: they make the comparison xfail, naming them;
any other difference fails it, and a listed gap that stops appearing can simply be removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import guest, trace
from tests.e2e.conftest import report

pytestmark = [pytest.mark.slow, pytest.mark.root]

GUEST_SCRIPT = "exec /usr/bin/python3 -m tests.e2e.guest_runner trace --out /out"

# scenario -> substrings of differences that are known simulator gaps (reported, not yet fixed)
KNOWN_SIMULATOR_GAPS: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def kernel_run(images: guest.Images) -> guest.GuestRun:
    return guest.boot_suite(images, "trace", GUEST_SCRIPT, timeout=900)


@pytest.fixture(scope="module")
def simulator_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, trace.ScenarioResult]:
    rig = trace.SimRig(tmp_path_factory.mktemp("qemu-q35"))
    return {r.name: r for r in trace.run_all(rig)}


def _kernel_trace(run: guest.GuestRun, name: str) -> trace.ScenarioResult | None:
    path = run.boot.run_dir / "trace" / f"{name}.json"
    try:
        return trace.ScenarioResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.parametrize("name", list(trace.SCENARIOS))
def test_kernel(kernel_run: guest.GuestRun, name: str) -> None:
    """The scenario passed in the guest, on the real kernel."""
    report(kernel_run, name)


@pytest.mark.parametrize("name", list(trace.SCENARIOS))
def test_simulator_matches_kernel(
    kernel_run: guest.GuestRun, simulator_results: dict[str, trace.ScenarioResult], name: str
) -> None:
    """The simulator's trace of the scenario is the kernel's: same writes, results, drivers, nodes."""
    real = _kernel_trace(kernel_run, name)
    if real is None:
        pytest.fail(f"no kernel trace for {name}: {kernel_run.boot.describe()}", pytrace=False)
    all_real = [r for n in trace.SCENARIOS if (r := _kernel_trace(kernel_run, n)) is not None]
    real_norm, sim_norm = trace.normalizers(all_real, list(simulator_results.values()))
    diffs = trace.compare(real, simulator_results[name], real_norm, sim_norm)
    if not diffs:
        return
    known = KNOWN_SIMULATOR_GAPS.get(name, [])
    unknown = [d for d in diffs if not any(k in d for k in known)]
    listing = "\n".join(f"  - {d}" for d in diffs)
    where = Path(kernel_run.boot.run_dir) / "trace" / f"{name}.json"
    if unknown:
        pytest.fail(
            f"the simulator differs from the kernel in {name} (kernel trace: {where}):\n{listing}\n"
            f"not known before:\n" + "\n".join(f"  - {d}" for d in unknown),
            pytrace=False,
        )
    pytest.xfail(f"known simulator gaps in {name}:\n{listing}")
