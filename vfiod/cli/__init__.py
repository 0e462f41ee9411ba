"""Command-line entry points: the daemon's own `vfiod` and the `vfioctl` client."""
