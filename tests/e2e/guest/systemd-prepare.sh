#!/bin/bash
# Run by stage2.sh before it execs /lib/systemd/systemd (boot with e2e.exec=): installs the project's
# .deb into the clean root as an admin would, adds the test users, a vfiod config mapping the QEMU devices'
# vendor (1234) to a fake persistence daemon, that daemon's unit, and the unit that runs the scenarios
# once the system is up (it reports through isa-debug-exit): the runner's suite $E2E_SUITE (default
# `systemd`). Nothing of vfiod is started here.
set -euo pipefail
step() { echo "e2e-prepare: $*"; }

step "dpkg -i $(ls /out/pkg/*.deb)"
dpkg -i /out/pkg/*.deb
useradd -m -g hypeman -s /bin/bash hypeman
useradd -m -g hypeman -s /bin/bash hypeman2
useradd -m -U -s /bin/bash stranger

mkdir -p /etc/vfiod
cat > /etc/vfiod/vfiod.toml <<'TOML'
# e2e: the QEMU VGA's vendor is held like NVIDIA's would be
[persistence_units]
"1234" = ["fake-persistenced.service"]
[metrics]
interval = 1
TOML
# what prometheus-node-exporter's package makes: vfiod's metrics textfile goes there (through the unit's
# ReadWritePaths=, under ProtectSystem=strict)
mkdir -p /var/lib/prometheus/node-exporter

cat > /etc/systemd/system/fake-persistenced.service <<'UNIT'
[Unit]
Description=Fake persistence daemon for the vfiod e2e suite (holds a file open)

[Service]
ExecStart=/bin/sh -c 'exec 3<>/run/fake-persistenced.lock; echo "fake-persistenced $$$$ holds /run/fake-persistenced.lock"; exec sleep infinity'

[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/vfiod-e2e.service <<'UNIT'
[Unit]
Description=vfiod e2e scenarios (reports through isa-debug-exit)
After=multi-user.target

[Service]
Type=simple
Environment=PYTHONPATH=/out/src PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 -m tests.e2e.guest_runner @SUITE@ --out /out --report-exit
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT

sed -i "s/@SUITE@/${E2E_SUITE:-systemd}/" /etc/systemd/system/vfiod-e2e.service

# The minbase root has no udev, which on a real host applies the kernel's DEVMODE 0666 to /dev/vfio/vfio
# after systemd-tmpfiles-setup-dev created the kmod static node 0600; stand in for it.
cat > /etc/systemd/system/e2e-vfio-node.service <<'UNIT'
[Unit]
After=systemd-tmpfiles-setup-dev.service modprobe@vfio_pci.service
Before=vfiod.service vfiod-e2e.service
[Service]
Type=oneshot
ExecStart=/bin/chmod 0666 /dev/vfio/vfio
[Install]
WantedBy=multi-user.target
UNIT

wants=/etc/systemd/system/multi-user.target.wants
mkdir -p "$wants"
ln -sf /etc/systemd/system/e2e-vfio-node.service "$wants/"
ln -sf /etc/systemd/system/fake-persistenced.service "$wants/"
ln -sf /etc/systemd/system/vfiod-e2e.service "$wants/"
# Nothing logs in on the consoles and no timers run during the test.
for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
            e2scrub_all.timer fstrim.timer dpkg-db-backup.timer e2scrub_reap.service; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
step "ready for systemd"
