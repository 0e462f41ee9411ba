"""Guest side of the vfio variant driver suite: the installed package under systemd as PID 1, on a kernel
built with vfio variant drivers as modules (`VFIOD_E2E_KERNEL_TARBALL`, 6.12 with `virtio_vfio_pci`,
`mlx5_vfio_pci`, `pds_vfio_pci`, `qat_vfio_pci`), with one more device: a modern virtio-net
(`virtio-net-pci,disable-legacy=on`, 1af4:1041) at 00:0a.0, which virtio_vfio_pci's override-only id
table names. Scenarios (`VARIANTS`): the pick is listed, matches kmod's own resolution of the alias, and
Attach loads (modprobe@virtio_vfio_pci.service), binds and hands over the variant; a real QEMU takes it;
Detach returns it to virtio-pci; a device an admin bound to its variant by hand is released by Unbind.
And a virtio-gpu (00:0b.0), a GPU whose native driver is virtio-pci.
Standard library only (Debian's /usr/bin/python3 in the guest).
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.service import HYPEMAN, Guest, Scenario, must, registry_matches_kernel, sh, unit_prop
from tests.e2e.trace import VGA, check, wait_for

NIC = "0000:00:0a.0"
VARIANT = "virtio_vfio_pci"
VIRTIO_GPU = "0000:00:0b.0"
BOCHS_DISPLAY = "0000:00:03.0"
QEMU_DEVICES = (
    "virtio-net-pci,disable-legacy=on,addr=0xa.0,mac=52:54:00:12:34:0a",
    "virtio-gpu-pci,addr=0xb.0",
)
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


def _cards(addr: str) -> list[str]:
    """The DRM card nodes of a function, on it or on a virtio child, as named now."""
    found = glob.glob(str(DEV / addr / "drm" / "card*")) + glob.glob(
        str(DEV / addr / "virtio*" / "drm" / "card*")
    )
    return sorted(f"/dev/dri/{os.path.basename(p)}" for p in found)


@contextlib.contextmanager
def _holding(node: str) -> Iterator[int]:
    """A root process keeping `node` open (a compositor on the card)."""
    proc = subprocess.Popen(
        ["sh", "-c", f"exec 3<{node}; echo ready; exec sleep 120"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def sc_virtio_gpu_held(g: Guest) -> None:
    """A GPU whose native driver is virtio-pci (virtio-gpu-pci at 00:0b.0, class 0380); where its DRM card
    sits (the function or the virtio child) is printed. While a process holds that card, Attach answers
    DeviceBusy naming it; once it is gone, Attach binds vfio-pci. While the GPU is away the host's
    bochs-display is rebound and takes its DRM minor, so Detach returns it to virtio-pci as another card;
    a holder of that new card is found the same way (vfiod never caches card numbers)."""
    check(g.driver(VIRTIO_GPU) == "virtio-pci", f"{VIRTIO_GPU} is on {g.driver(VIRTIO_GPU)}")
    before = _cards(VIRTIO_GPU)
    own = sorted(glob.glob(str(DEV / VIRTIO_GPU / "drm" / "*")))
    child = sorted(glob.glob(str(DEV / VIRTIO_GPU / "virtio*" / "drm" / "*")))
    cls = (DEV / VIRTIO_GPU / "class").read_text().strip()
    g.say(f"{VIRTIO_GPU}: class {cls}, DRM on the function {own}, on the virtio child {child}")
    check(len(before) == 1, f"cards {before}")
    g.register("root", VIRTIO_GPU, "vgpu0")
    with _holding(before[0]) as pid:
        reply = g.attach(HYPEMAN, "vm-gpu", ["vgpu0"])
        check(reply.error == "DeviceBusy" and str(pid) in reply.message, f"Attach: {reply.describe()}")
    reply = g.attach(HYPEMAN, "vm-gpu", ["vgpu0"])
    check(reply.ok, f"Attach failed: {reply.describe()}")
    g.expect_drivers({VIRTIO_GPU: "vfio-pci"}, "after Attach")
    check(_cards(VIRTIO_GPU) == [], f"cards while attached: {_cards(VIRTIO_GPU)}")
    # Meanwhile the host's second display (bochs-display) is rebound: it takes the lowest free DRM minor.
    display = _cards(BOCHS_DISPLAY)
    Path("/sys/bus/pci/drivers/bochs-drm/unbind").write_text(BOCHS_DISPLAY)
    Path("/sys/bus/pci/drivers/bochs-drm/bind").write_text(BOCHS_DISPLAY)
    check(wait_for(lambda: len(_cards(BOCHS_DISPLAY)) == 1, 10), f"{BOCHS_DISPLAY} has no card again")
    g.say(f"{BOCHS_DISPLAY} rebound while the GPU was away: {display} -> {_cards(BOCHS_DISPLAY)}")
    reply = g.detach(HYPEMAN, "vm-gpu")
    check(reply.ok, f"Detach failed: {reply.describe()}")
    g.expect_drivers({VIRTIO_GPU: "virtio-pci"}, "after Detach")
    check(wait_for(lambda: len(_cards(VIRTIO_GPU)) == 1, 10), f"no card after Detach: {_cards(VIRTIO_GPU)}")
    after = _cards(VIRTIO_GPU)
    g.say(f"{VIRTIO_GPU}: {before[0]} before the VM, {after[0]} after it")
    check(after != before, f"{VIRTIO_GPU} came back as {after[0]} again")
    with _holding(after[0]) as pid:
        reply = g.attach(HYPEMAN, "vm-gpu", ["vgpu0"])
        check(reply.error == "DeviceBusy" and str(pid) in reply.message, f"Attach again: {reply.describe()}")
    registry_matches_kernel(g)


VARIANTS: dict[str, Scenario] = {
    "variant-listed": sc_variant_listed,
    "variant-attach": sc_variant_attach,
    "variant-qemu": sc_variant_qemu,
    "variant-detach": sc_variant_detach,
    "variant-unbind-found": sc_variant_unbind_found,
    "virtio-gpu-held": sc_virtio_gpu_held,
}

VARIANTS_DEPENDS: dict[str, str] = {
    "variant-attach": "variant-listed",
    "variant-qemu": "variant-attach",
    "variant-detach": "variant-attach",
    "variant-unbind-found": "variant-detach",
    "virtio-gpu-held": "variant-listed",
}
