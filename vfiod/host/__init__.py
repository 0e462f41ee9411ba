"""The bottom layer: every access to sysfs, /dev and /proc, and the kernel simulator."""
