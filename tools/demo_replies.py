"""The demo's reply formatting (`tools/demo.sh`): busctl --json=short replies of Attach and AttachVGPU turned
into the VMM command lines they are for.

    demo_replies.py ch REPLY              cloud-hypervisor --device lines of an Attach reply
    demo_replies.py vgpu NAME=REPLY...    QEMU and cloud-hypervisor lines of AttachVGPU replies
"""

from __future__ import annotations

import json
import sys
from typing import Any


def plain(v: Any) -> Any:
    """busctl's JSON without its {"type", "data"} wrappers."""
    if isinstance(v, dict) and set(v) == {"type", "data"}:
        return plain(v["data"])
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def cloud_hypervisor(raw: str) -> None:
    attachments, warnings = (plain(x) for x in json.loads(raw)["data"])
    lines = ["cloud-hypervisor ..."]
    for a in attachments:
        cfg = a["device_config"]
        extra = "".join(f",{k}={v}" for k, v in sorted(cfg.items()) if k != "path")
        lines.append(f"    --device path={cfg['path']}{extra}")
    print(" \\\n".join(lines))
    for a in attachments:
        print(f"# {a['pci_address']}: {a['role']}, group node {a['vfio_group_path'] or '-'}")
    for w in warnings:
        print(f"# warning: {w}")


def vgpus(named: list[str]) -> None:
    for item in named:
        name, _, raw = item.partition("=")
        att, _warnings = (plain(x) for x in json.loads(raw)["data"])
        cfg = att["device_config"]
        print(f"# {name}: VF {att['pci_address']}, group node {att['vfio_group_path']}")
        print(f"qemu-system-x86_64 -uuid {cfg['uuid']} ... -device vfio-pci,sysfsdev={cfg['sysfsdev']}")
        print(f"cloud-hypervisor ... --device path={cfg['path']}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "ch":
        cloud_hypervisor(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "vgpu":
        vgpus(sys.argv[2:])
    else:
        sys.exit(__doc__)
