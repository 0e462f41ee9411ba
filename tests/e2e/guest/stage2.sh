#!/bin/bash
# PID 1 in the guest's real root (bookworm overlay), reached by switch_root from init.sh. Mounts what a
# system without systemd lacks, bind-mounts the kernel's modules from the cache share, loads the native
# drivers by modalias (there is no udev), mounts the NVMe disk, runs /out/run.sh (written by guest.py for
# this boot) and reports its exit status through isa-debug-exit.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

report() {
    local code=$1
    sync
    printf "\\$(printf %03o "$code")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc status=none
    echo o > /proc/sysrq-trigger
    sleep 30
}

step() { echo "e2e: $*"; }

mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
ln -sf /proc/self/fd /dev/fd 2>/dev/null
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

kdir=
exec_init=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e.kdir=*) kdir=${arg#e2e.kdir=} ;;
        e2e.exec=*) exec_init=${arg#e2e.exec=} ;;
    esac
done
kver=$(uname -r)
mkdir -p "/lib/modules/$kver"
mount --bind "/mnt/hostroot/$kdir/lib/modules/$kver" "/lib/modules/$kver" || {
    echo "e2e: cannot bind the modules of $kver"
    report 121
}
hostname vfiod-e2e
ip link set lo up 2>/dev/null

step "kernel $kver ($(cat /proc/version))"
# No udev: load every native driver the devices ask for (vfio-pci is not among them).
modprobe -qa $(sort -u /sys/bus/pci/devices/*/modalias) ext4
# The data disk is the only NVMe namespace (the SR-IOV controller has none). Its name follows the NVMe
# subsystem's instance, which 6.12's asynchronous probe may give to the other controller first
# (nvme1n1 there, nvme0n1 on 6.1): take whichever namespace appears, waiting up to 60 s under TCG.
disk=
for _ in $(seq 300); do
    disk=$(ls /dev/nvme*n1 2>/dev/null | head -n 1)
    [ -n "$disk" ] && break
    sleep 0.2
done
mkdir -p /mnt/data
if [ -n "$disk" ] && mount -t ext4 "$disk" /mnt/data; then
    step "mounted $disk on /mnt/data"
else
    step "could not mount the data disk (${disk:-no NVMe namespace})"
fi
for dev in /sys/bus/pci/devices/*; do
    drv=-
    [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
    grp=-
    [ -e "$dev/iommu_group" ] && grp=$(basename "$(readlink "$dev/iommu_group")")
    step "$(basename "$dev") class $(cat "$dev/class") $(cat "$dev/vendor"):$(cat "$dev/device") group $grp driver $drv"
done

if [ -n "$exec_init" ]; then
    # A boot under a real init: run.sh only prepares the root, then the init takes over as PID 1 and
    # the scenarios report by themselves.
    step "preparing with /out/run.sh, then exec $exec_init"
    bash /out/run.sh 2>&1 | tee /out/run.log
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { step "preparation failed ($rc)"; report 122; }
    umount /tmp 2>/dev/null
    exec "$exec_init"
fi

step "running /out/run.sh"
started=$(date +%s%N)
bash /out/run.sh 2>&1 | tee /out/run.log
rc=${PIPESTATUS[0]}
step "run.sh exited with $rc after $(( ($(date +%s%N) - started) / 1000000 )) ms"
dmesg > /out/dmesg.log 2>/dev/null
report "$rc"
