"""What each vfioctl command says about itself: its one-line summary, its description and its examples
(for `vfioctl --help`, `vfioctl COMMAND --help` and the man page, which a test keeps in step)."""

from __future__ import annotations

# name: (one-line help, description, examples for the epilog)
EXAMPLES: dict[str, tuple[str, str, list[str]]] = {
    "status": (
        "show the host's VFIO readiness (GetHostStatus)",
        "IOMMU, interrupt remapping, vfio-pci, cdev/iommufd, huge pages, GPU slots and the problems found, "
        "each with its fix.",
        ["vfioctl status", "vfioctl status --json | jq .problems"],
    ),
    "check": (
        "pre-flight report: host status plus every PCI device and why it can or cannot be passed through",
        "GetHostStatus and ListAvailable(all) in one report. Exit status 0 whenever the report was produced.",
        ["vfioctl check", "vfioctl --session check --json"],
    ),
    "list-available": (
        "list the host's passthrough candidates (ListAvailable)",
        "Display and 3D controllers (every PCI function with --all), their IOMMU group, driver, whether they "
        "are registered, and the blockers that keep them from passthrough as they stand.",
        ["vfioctl list-available", "vfioctl list-available --all --json"],
    ),
    "list": (
        "list registered devices (ListDevices)",
        "Every registered device with its live driver, state and attachment. --tag keeps only devices "
        "carrying all the given tags.",
        ["vfioctl list", "vfioctl list --tag rack=r12 --tag pool=ml --json"],
    ),
    "show": (
        "show one registered device (GetDevice)",
        "Every field of the Device record.",
        ["vfioctl show l4-gpu", "vfioctl show l4-gpu --json | jq -r .sysfs_path"],
    ),
    "register": (
        "register a PCI device by address (RegisterDevice)",
        "Registering does not touch the device's driver. Without --name the name is pci-dddd-bb-ss-f.",
        ["vfioctl register 0000:a2:00.0 --name l4-gpu", "vfioctl register 0000:a2:00.0 --tag pool=ml"],
    ),
    "unregister": (
        "forget a registered device (UnregisterDevice)",
        "Refused (InUse) while the device is attached.",
        ["vfioctl unregister l4-gpu"],
    ),
    "attach": (
        "bind devices to vfio-pci for an instance and hand it the group node (Attach)",
        "Binds every function or none. Prints the attachments, the cloud-hypervisor --device arguments and "
        "the warnings about what the VMM still needs. Idempotent: repeating it for the same instance returns "
        "the same attachments. --owner-uid and --force need the admin authorization.",
        [
            "vfioctl attach ml-training l4-gpu --include-group",
            "vfioctl attach ml-training gpu0 gpu1 --gpudirect-clique 0",
            "vfioctl attach ml-training l4-gpu --include-group --json | jq -r '.cloud_hypervisor_args[]'",
        ],
    ),
    "detach": (
        "release an instance's devices (Detach)",
        "Without device names, every device of the instance. Each function goes back to the driver it had "
        "before (with --keep-bound it stays on vfio-pci, unattached). Detaching an unknown or already "
        "detached instance succeeds.",
        ["vfioctl detach ml-training", "vfioctl detach ml-training l4-gpu --keep-bound"],
    ),
    "bind": (
        "bind a registered device to vfio-pci without attaching it (Bind; admin)",
        "Succeeds without change if it is already on vfio (AlreadyBound with --exclusive).",
        ["vfioctl bind l4-gpu --include-group", "vfioctl bind l4-gpu --exclusive"],
    ),
    "unbind": (
        "return an unattached device to its native driver (Unbind; admin)",
        "Succeeds without change if it is not on vfio (NotBound with --exclusive).",
        ["vfioctl unbind l4-gpu"],
    ),
    "reconcile": (
        "release attachments of instances that are not running (Reconcile)",
        "Name every instance that is still running: attachments of any other instance are released. Naming "
        "none releases every attachment you own: that needs --all-dead (or a yes on a terminal); try "
        "--dry-run first. Touches only your own attachments; --all-users (admin) takes every user's.",
        [
            "vfioctl reconcile ml-training web-1 --dry-run",
            "vfioctl reconcile ml-training web-1",
            "vfioctl reconcile --all-dead",
        ],
    ),
    "recover": (
        "put stuck or driverless devices back on their drivers, or recover a vGPU parent or GPU "
        "(Recover; admin)",
        "Without a target, every stuck or driverless registered device. A vGPU parent (mtty, a VF's "
        "address): its quarantine is cleared. A physical GPU whose VFs host vGPUs (its address): NVIDIA's "
        "SR-IOV cycle (sriov-manage -d, -e), which destroys every vGPU on it, refused while one is in use.",
        ["vfioctl recover --dry-run", "vfioctl recover l4-gpu", "vfioctl recover 0000:a2:00.0 --dry-run"],
    ),
    "profiles": (
        "list the vGPU profiles this host offers (ListProfiles)",
        "Every mediated-device type of every parent and every NVIDIA vendor-VFIO type, with its framebuffer "
        "size when known and how many instances can be created now.",
        ["vfioctl profiles", "vfioctl profiles --parent mtty --json"],
    ),
    "vgpus": (
        "list the vGPUs on this host (ListVGPUs)",
        "Every mediated device, whether vfiod created it or not (one it did not create is never touched), "
        "with its instance and owner.",
        ["vfioctl vgpus", "vfioctl vgpus --instance ml-training --json"],
    ),
    "attach-vgpu": (
        "create a vGPU of a profile for an instance and hand it over (AttachVGPU)",
        "Picks the physical GPU with the most free framebuffer, creates the mediated device, gives "
        "its group node to you (or --owner-uid, admin) and prints the cloud-hypervisor and QEMU arguments. "
        "Repeating it for the same instance and profile returns the same vGPU; `vfioctl detach INSTANCE` "
        "removes it.",
        ["vfioctl attach-vgpu ml-training 'NVIDIA L40S-4Q'", "vfioctl attach-vgpu vm1 mtty-2 --json"],
    ),
    "open-devices": (
        "start a VMM with the descriptors of an instance's fd-mode devices (OpenDevices)",
        "Asks vfiod for a new /dev/iommu and each device's VFIO cdev (all of the instance's when no DEV is "
        "named), writes their numbers into the command where it says {iommufd}, {fd} (the only device's) or "
        "{fd:KEY} (KEY: a device id, PCI address or mdev uuid), and {sysfs} or {sysfs:KEY} for a device's "
        "sysfs path (other braces are left alone), prints OpenDevices' warnings and replaces itself with the "
        "command, which inherits the descriptors and nothing else of vfioctl. The devices must be attached "
        "with --handoff fd; an mdev needs --allow-mdev, and QEMU its sysfsdev= beside fd=.",
        [
            "vfioctl open-devices vm1 -- qemu-system-x86_64 -object iommufd,id=i0,fd={iommufd} "
            "-device vfio-pci,fd={fd},iommufd=i0 ...",
            "vfioctl open-devices --allow-mdev vm2 -- qemu-system-x86_64 -object iommufd,id=i0,fd={iommufd} "
            "-device vfio-pci,fd={fd},iommufd=i0,sysfsdev={sysfs} ...",
        ],
    ),
    "vfs": (
        "set the number of SR-IOV virtual functions of a physical function (SetVirtualFunctions; admin)",
        "PF is a PCI address or a registered device. The VFs stay driverless unless --autoprobe lets host "
        "drivers take them; they can then be registered and attached like any device. Refused while a VF "
        "that would go away is attached, held or used by the host. Prints the VFs' addresses.",
        ["vfioctl vfs 0000:1c:00.0 4", "vfioctl vfs 0000:1c:00.0 0", "vfioctl vfs cx7-pf 2 --json"],
    ),
    "import-hypeman": (
        "import devices registered by hypeman's own lib/devices (ImportHypeman)",
        "The service reads DIR/devices/*/metadata.json and registers those devices with their ids and names; "
        "a device hypeman had attached becomes a reservation for YOUR uid, so run it as the user hypeman "
        "runs as. Every record not imported is reported with the reason. Needs the admin authorization.",
        ["vfioctl import-hypeman /var/lib/hypeman", "vfioctl import-hypeman /var/lib/hypeman --json"],
    ),
    "monitor": (
        "print device changes as they happen",
        "One line per device added, removed or changed (including kernel bind/unbind seen by the service), "
        "each with a UTC timestamp. Follows the service across restarts. Ctrl-C exits 0.",
        ["vfioctl monitor", "vfioctl monitor --json | jq -c 'select(.event==\"changed\")'"],
    ),
    "metrics": (
        "print the daemon's Prometheus metrics (GetMetrics)",
        "The text exposition vfiod also writes for node_exporter's textfile collector: devices by state, "
        "stuck devices, attachments, GPU and vGPU slots, quarantined parents, persistence holds, calls and "
        "sysfs writes with their durations.",
        ["vfioctl metrics", "vfioctl metrics | grep '^vfiod_devices'"],
    ),
}
