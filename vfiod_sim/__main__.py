"""`python -m vfiod_sim`: build a simulated host and poke at it from a shell (or from another
process than the one running vfiod): inject and release faults, start fake processes, write attributes the
way an external tool would.

    python -m vfiod_sim build workstation-l4 /tmp/sim
    python -m vfiod_sim fault inject /tmp/sim h --kind hang --path /sys/bus/pci/drivers/nvidia/bind
    python -m vfiod_sim fault release /tmp/sim h
    python -m vfiod_sim process add /tmp/sim --exe /usr/bin/qemu --uid 1000 --fd /dev/vfio/7
    python -m vfiod_sim bind /tmp/sim 0000:a2:00.0 vfio-pci
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from vfiod_sim import faults, processes
from vfiod_sim.builder import build
from vfiod_sim.kernel import SimulatedKernel
from vfiod_sim.machines import profile_names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vfiod_sim", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help=f"lay out a profile ({', '.join(profile_names())}) in a new directory")
    b.add_argument("profile")
    b.add_argument("dir", type=Path)

    f = sub.add_parser("fault", help="inject, release or clear a fault")
    fsub = f.add_subparsers(dest="fault_command", required=True)
    fi = fsub.add_parser("inject")
    fi.add_argument("dir", type=Path)
    fi.add_argument("name")
    fi.add_argument("--kind", required=True, choices=faults.KINDS)
    fi.add_argument("--path")
    fi.add_argument("--value")
    fi.add_argument("--errno")
    fi.add_argument("--seconds", type=float, default=0.0)
    fi.add_argument("--driver")
    fi.add_argument("--pci-address")
    fi.add_argument("--count", type=int)
    fi.add_argument("--then", choices=("complete", "fail"), default="complete")
    for name in ("release", "clear"):
        fr = fsub.add_parser(name)
        fr.add_argument("dir", type=Path)
        fr.add_argument("name", nargs="?" if name == "clear" else None)

    pr = sub.add_parser("process", help="start or stop a fake process")
    psub = pr.add_subparsers(dest="process_command", required=True)
    pa = psub.add_parser("add")
    pa.add_argument("dir", type=Path)
    pa.add_argument("--exe", required=True)
    pa.add_argument("--pid", type=int)
    pa.add_argument("--uid", type=int, default=0)
    pa.add_argument("--fd", action="append", default=[], help="a logical path it holds open (repeatable)")
    pa.add_argument("--unit", help="the systemd unit it runs in (cgroup)")
    prm = psub.add_parser("remove")
    prm.add_argument("dir", type=Path)
    prm.add_argument("pid", type=int)

    for name in ("bind", "unbind"):
        bb = sub.add_parser(name, help=f"write ADDR to /sys/bus/pci/drivers/DRIVER/{name}")
        bb.add_argument("dir", type=Path)
        bb.add_argument("addr")
        bb.add_argument("driver")
    w = sub.add_parser("write", help="write VALUE to a logical sysfs path, e.g. /sys/bus/pci/drivers_probe")
    w.add_argument("dir", type=Path)
    w.add_argument("path")
    w.add_argument("value")
    r = sub.add_parser("reboot", help="reboot the simulated kernel")
    r.add_argument("dir", type=Path)
    return p


def _write(root: Path, logical: str, value: str) -> int:
    if not logical.startswith("/sys/"):
        print(f"{logical}: only /sys attributes can be written", file=sys.stderr)
        return 2
    kernel = SimulatedKernel(root)
    try:
        kernel.write_attribute(root / logical.lstrip("/"), value.encode())
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        print(f"write {value!r} > {logical}: {name} ({e.strerror})", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            kernel = build(args.dir, args.profile)
            print(f"{kernel.profile.name}: {len(kernel.profile.devices)} functions under {args.dir}")
        elif args.command == "fault":
            if args.fault_command == "inject":
                faults.inject(
                    args.dir,
                    args.name,
                    kind=args.kind,
                    path=args.path,
                    value=args.value,
                    errno=args.errno,
                    seconds=args.seconds,
                    driver=args.driver,
                    pci_address=args.pci_address,
                    count=args.count,
                    then=args.then,
                )
            elif args.fault_command == "release":
                faults.release(args.dir, args.name)
            else:
                faults.clear(args.dir, args.name)
        elif args.command == "process":
            if args.process_command == "add":
                pid = processes.add_process(
                    args.dir, exe=args.exe, pid=args.pid, uid=args.uid, fds=args.fd, cgroup_unit=args.unit
                )
                print(pid)
            else:
                processes.remove_process(args.dir, args.pid)
        elif args.command in ("bind", "unbind"):
            return _write(args.dir, f"/sys/bus/pci/drivers/{args.driver}/{args.command}", args.addr)
        elif args.command == "write":
            return _write(args.dir, args.path, args.value)
        elif args.command == "reboot":
            SimulatedKernel(args.dir).reboot()
    except (ValueError, LookupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
