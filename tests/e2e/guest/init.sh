#!/bin/sh
# The initramfs's /init (static busybox). Mounts the cache share read-only over 9p, stacks an overlay with a
# tmpfs upper layer on the cached bookworm tree, mounts the writable `out` share, and switch_roots into the
# init named by e2e.init= (tests/e2e/guest/stage2.sh, or /lib/systemd/systemd).
# Kernel command line: e2e.root=<rootfs dir in the share>  e2e.init=<path in the new root>
/bin/busybox --install -s /bin
export PATH=/bin

# Report a failure through isa-debug-exit (QEMU exits with code*2+1), then power off.
fail() {
    echo "e2e-init: FAILED: $*"
    code=${E2E_FAIL_CODE:-120}
    printf "\\$(printf %03o "$code")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
    echo o > /proc/sysrq-trigger
    sleep 30
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r m; do
    insmod "/modules/$m" || echo "e2e-init: insmod $m failed"
done < /modules/order

ROOTDIR=
INIT=/out/guest/stage2.sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e.root=*) ROOTDIR=${arg#e2e.root=} ;;
        e2e.init=*) INIT=${arg#e2e.init=} ;;
    esac
done
[ -n "$ROOTDIR" ] || fail "no e2e.root= on the kernel command line"

opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "ro,$opts,cache=loose" hostroot /share || fail "cannot mount the hostroot share"
[ -d "/share/$ROOTDIR" ] || fail "/share/$ROOTDIR is missing"
mount -t tmpfs -o mode=0755 upper /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o "lowerdir=/share/$ROOTDIR,upperdir=/rw/upper,workdir=/rw/work" overlay /newroot \
    || fail "cannot mount the overlay root"
mkdir -p /newroot/mnt/hostroot /newroot/out
# The share stays visible in the new root, so the guest sees which PCI function carries its root.
mount --move /share /newroot/mnt/hostroot || fail "cannot move the hostroot share"
mount -t 9p -o "rw,$opts,cache=none" out /newroot/out || fail "cannot mount the out share"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$INIT"
