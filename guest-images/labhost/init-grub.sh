#!/bin/sh
# /init of the GRUB-booted lab host (guest-images/labhost/grub_disk.py): the kexec lab host's /init
# plus the disk.  It loads the AHCI/ext4 modules in dependency order, mounts the ext2 /boot
# partition (GRUB's grub.cfg, grubenv and custom.cfg live there), and turns busybox `reboot`
# (which, without -f, signals PID 1 with TERM) into a clean unmount and a real reset.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs -o mode=1777 tmp /tmp
/bin/busybox mount -t tmpfs -o mode=755 run /run
mkdir -p /run/sshd /dev/pts /boot
mount -t devpts devpts /dev/pts
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
# The base image's e1000 module is in /lib/modules; the disk stack is listed in load order.
for m in /lib/modules/*.ko; do insmod "$m"; done
while read -r m; do insmod "/lib/modules/disk/$m" || echo "labhost: insmod $m failed"; done </lib/modules/disk/order

# grubenv must reach the disk before a reset: sync and unmount, then reboot(2) / poweroff(2).
down() {
    echo "labhost: $1: unmounting /boot"
    sync
    umount /boot 2>/dev/null || mount -o remount,ro /boot
    "$1" -f
}
trap 'down reboot' TERM
trap 'down poweroff' USR2
trap 'down halt' USR1

ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
i=0
while [ ! -b /dev/sda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext2 /dev/sda1 /boot; then
    echo "labhost: /boot mounted from /dev/sda1"
else
    echo "labhost: cannot mount /dev/sda1 on /boot"
fi
/usr/sbin/sshd -E /tmp/sshd.log
echo "labhost: sshd started ($(uname -r))"
# A trapped signal interrupts `wait`, not a foreground `sleep`: sleep in the background.
while true; do sleep 3600 & wait $!; done
