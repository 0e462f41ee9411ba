"""vfiod: a root-owned D-Bus helper that hands PCI devices to unprivileged VM managers through VFIO."""

__version__ = "0.1.0"
