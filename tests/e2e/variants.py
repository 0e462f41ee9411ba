"""Guest side of the vfio variant driver suite: the installed package under systemd as PID 1, on a kernel
built with vfio variant drivers as modules (`VFIOD_E2E_KERNEL_TARBALL`, 6.12 with `virtio_vfio_pci`,
`mlx5_vfio_pci`, `pds_vfio_pci`, `qat_vfio_pci`), with one more device: a modern virtio-net
(`virtio-net-pci,disable-legacy=on`, 1af4:1041) at 00:0a.0, which virtio_vfio_pci's override-only id
table names. Scenarios (`VARIANTS`): the pick is listed, matches kmod's own resolution of the alias, and
Attach loads (modprobe@virtio_vfio_pci.service), binds and hands over the variant; a real QEMU takes it;
Detach returns it to virtio-pci; a device an admin bound to its variant by hand is released by Unbind.
Standard library only (Debian's /usr/bin/python3 in the guest).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.service import HYPEMAN, Guest, Scenario, must, registry_matches_kernel, sh, unit_prop
from tests.e2e.trace import VGA, check, wait_for

NIC = "0000:00:0a.0"
VARIANT = "virtio_vfio_pci"
QEMU_DEVICE = "virtio-net-pci,disable-legacy=on,addr=0xa.0,mac=52:54:00:12:34:0a"
DEV = Path("/sys/bus/pci/devices")


def _modalias(addr: str) -> str:
    return (DEV / addr / "modalias").read_text().strip()


def _variant_records(g: Guest) -> dict[str, str]:
    recs = g.expect_ok("root", "ListAvailable", "a{sv}", "1", "all", "b", "true")[0]
    return {r["pci_address"]: r["variant_driver"] for r in recs}


def sc_variant_listed(g: Guest) -> None:
    """ListAvailable names virtio_vfio_pci for the modern virtio-net and no variant for the GPU; kmod's
    `modprobe -R vfio_<modalias>` resolves the same module from this kernel's modules.alias, and the
    native driver is virtio-pci (built in)."""
    release = os.uname().release
    lines = [
        ln
        for ln in Path(f"/lib/modules/{release}/modules.alias").read_text().splitlines()
        if ln.startswith("alias vfio_pci:")
    ]
    g.say(f"{release}: {len(lines)} vfio_pci: aliases: " + "; ".join(lines))
    check(g.driver(NIC) == "virtio-pci", f"{NIC} is on {g.driver(NIC)}, not virtio-pci")
    picks = _variant_records(g)
    g.say(f"variant_driver: {NIC}={picks.get(NIC)!r} {VGA}={picks.get(VGA)!r}")
    check(picks.get(NIC) == VARIANT, f"variant_driver of {NIC}: {picks.get(NIC)!r}")
    check(picks.get(VGA) == "", f"variant_driver of the GPU: {picks.get(VGA)!r}")
    nic = must(["modprobe", "-R", "vfio_" + _modalias(NIC)]).split()
    gpu = sh(["modprobe", "-R", "vfio_" + _modalias(VGA)]).stdout.split()  # vfio_pci is built in here
    g.say(f"modprobe -R vfio_<modalias>: {NIC} -> {nic}, {VGA} -> {gpu or 'nothing'}")
    check(nic == [VARIANT], f"kmod resolves {NIC} to {nic}")
    check(set(gpu) <= {"vfio_pci"}, f"kmod resolves the GPU to {gpu}")
    copy = Path("/run/vfiod/vfio_pci.alias")
    check(copy.is_file() and copy.read_text().startswith(f"# release {release}\n"), f"{copy} is missing")


def sc_variant_attach(g: Guest) -> None:
    """Registered by root (a NIC needs the admin), attached by hypeman: vfiod starts
    modprobe@virtio_vfio_pci.service, binds the variant through driver_override, and the group node is
    hypeman's; the ctypes VMM gets the device from it."""
    check(not Path(f"/sys/module/{VARIANT}").exists(), f"{VARIANT} is loaded before Attach")
    g.register("root", NIC, "nic")
    reply = g.attach(HYPEMAN, "vm-nic", ["nic"])
    check(reply.ok, f"Attach failed: {reply.describe()}")
    g.expect_drivers({NIC: VARIANT}, "after Attach")
    result = unit_prop(f"modprobe@{VARIANT}.service", "Result")
    g.say(f"modprobe@{VARIANT}.service: Result={result}")
    check(result == "success" and Path(f"/sys/module/{VARIANT}").is_dir(), f"{VARIANT} was not loaded")
    vfio_dev = sorted(os.listdir(DEV / NIC / "vfio-dev"))
    node = f"/dev/vfio/{g.group(NIC)}"
    st = os.stat(node)
    g.say(f"{NIC}: vfio-dev {vfio_dev}, {node} uid {st.st_uid} mode {oct(st.st_mode & 0o777)}")
    check(bool(vfio_dev), f"{NIC} has no vfio-dev/")
    res = g.vmm(HYPEMAN, node, NIC)
    check(res.get("ok") is True and res.get("vendor_id") == "1af4", f"the VMM failed: {res}")
    device = g.expect_ok(HYPEMAN, "GetDevice", "sa{sv}", "nic", "0")[0]
    check(device["driver"] == VARIANT and device["native_driver"] == "virtio-pci", f"GetDevice: {device}")


def sc_variant_qemu(g: Guest) -> None:
    """A real QEMU as hypeman takes the device bound to the variant (-device vfio-pci,host=): query-pci
    lists 1af4:1041."""
    with g.qemu(HYPEMAN, [NIC]) as q:
        ids = {k: (f.vendor_id, f.device_id) for k, f in q.passed().items()}
        check(ids == {"hostdev0": ("1af4", "1041")}, f"query-pci: {ids}")


def sc_variant_detach(g: Guest) -> None:
    """Detach returns the device from the variant to virtio-pci, override cleared, node root's again."""
    reply = g.detach(HYPEMAN, "vm-nic")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({NIC: "virtio-pci"}, "after Detach")
    override = (DEV / NIC / "driver_override").read_text().strip()
    check(override == "(null)", f"driver_override left as {override!r}")
    registry_matches_kernel(g)


def sc_variant_unbind_found(g: Guest) -> None:
    """An admin binds the device to its variant by hand (override, unbind, drivers_probe) and registers it
    again: vfiod records the variant as what it found; Unbind releases it and the kernel probes virtio-pci."""
    g.expect_ok("root", "UnregisterDevice", "sa{sv}", "nic", "0")
    (DEV / NIC / "driver_override").write_text(VARIANT)
    (DEV / NIC / "driver" / "unbind").write_text(NIC)
    Path("/sys/bus/pci/drivers_probe").write_text(NIC)
    check(wait_for(lambda: g.driver(NIC) == VARIANT, 10), f"the hand bind left {NIC} on {g.driver(NIC)}")
    g.register("root", NIC, "nic")
    device = g.expect_ok("root", "GetDevice", "sa{sv}", "nic", "0")[0]
    g.say(f"registered on the variant: state {device['state']}, native_driver {device['native_driver']!r}")
    check(device["native_driver"] == VARIANT and device["bound_to_vfio"], f"GetDevice: {device}")
    g.expect_ok("root", "Unbind", "sa{sv}", "nic", "0")
    g.expect_drivers({NIC: "virtio-pci"}, "after Unbind")
    override = (DEV / NIC / "driver_override").read_text().strip()
    check(override == "(null)", f"driver_override left as {override!r}")
    registry_matches_kernel(g)


VARIANTS: dict[str, Scenario] = {
    "variant-listed": sc_variant_listed,
    "variant-attach": sc_variant_attach,
    "variant-qemu": sc_variant_qemu,
    "variant-detach": sc_variant_detach,
    "variant-unbind-found": sc_variant_unbind_found,
}

VARIANTS_DEPENDS: dict[str, str] = {
    "variant-attach": "variant-listed",
    "variant-qemu": "variant-attach",
    "variant-detach": "variant-attach",
    "variant-unbind-found": "variant-detach",
}
