"""The simulated machines' well-known functions and drivers, named once for every suite."""

from __future__ import annotations

from vfiod.host.pciaddr import DriverName, PciAddress

# workstation-l4
L4 = PciAddress.parse("0000:a2:00.0")  # the NVIDIA L4 (nvidia), IOMMU group 7 with its HDMI audio
L4_AUDIO = PciAddress.parse("0000:a2:00.1")  # snd_hda_intel
IGPU = PciAddress.parse("0000:00:02.0")  # the boot VGA with the console on it: host-critical
NIC = PciAddress.parse("0000:00:1f.6")  # the NIC of the default route: host-critical

VFIO = DriverName.parse("vfio-pci")
NVIDIA = DriverName.parse("nvidia")
HDA = DriverName.parse("snd_hda_intel")
