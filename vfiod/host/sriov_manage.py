"""Cycling SR-IOV on an NVIDIA GPU the way NVIDIA's host driver requires: `/usr/lib/nvidia/sriov-manage -d
<PF>` then `-e <PF>`. nvidia.ko has no `sriov_configure` (a direct `sriov_numvfs` write on its PF fails
with ENOENT); NVIDIA's script takes the GPU's unbind lock, moves the PF to pci-pf-stub for the change and
binds every VF back to `nvidia`. Every VF and every vGPU on the GPU goes away; the VFs come back fresh.

Each run is logged with its command, exit status, output and duration.
"""

from __future__ import annotations

import logging
import subprocess
import time

from vfiod.host.errors import HostToolError
from vfiod.host.host import Host
from vfiod.host.pciaddr import PciAddress
from vfiod.logevents import Action

log = logging.getLogger("vfiod.host")

SRIOV_MANAGE = "lib/nvidia/sriov-manage"  # under /usr
TIMEOUT = 300.0  # 32 VFs unbound and bound again; NVIDIA's container allows minutes


class NvidiaSriovManage:
    """The GPU SR-IOV cycler of a real host (see `vfiod.core.system.GpuSriov`)."""

    def __init__(self, host: Host, timeout: float = TIMEOUT) -> None:
        self._host = host
        self._timeout = timeout

    def disable(self, pf: PciAddress) -> None:
        self._run("-d", pf)

    def enable(self, pf: PciAddress) -> None:
        self._run("-e", pf)

    def _run(self, flag: str, pf: PciAddress) -> None:
        tool = self._host.roots.usr / SRIOV_MANAGE
        if not tool.is_file():
            raise HostToolError(
                f"/usr/{SRIOV_MANAGE} is not installed (it comes with NVIDIA's vGPU host driver)"
            )
        argv = [str(tool), flag, str(pf)]
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise HostToolError(f"{' '.join(argv)} did not finish within {self._timeout:g} s") from e
        except OSError as e:
            raise HostToolError(f"{' '.join(argv)} could not run: {e}") from e
        output = (done.stdout + done.stderr).strip()
        log.info(
            "ran %s: exit %d in %.3f s: %s",
            " ".join(argv),
            done.returncode,
            time.monotonic() - started,
            output,
            extra={"ACTION": Action.SRIOV_MANAGE, "PCI_ADDRESS": str(pf), "RESULT": done.returncode},
        )
        if done.returncode != 0:
            raise HostToolError(f"{' '.join(argv)} failed (exit {done.returncode}): {output or 'no output'}")
