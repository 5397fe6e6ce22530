#!/bin/sh
# /init of the lab-host initramfs: mount, bring up eth0 (QEMU user networking), start sshd, wait.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs -o mode=1777 tmp /tmp
/bin/busybox mount -t tmpfs -o mode=755 run /run
mkdir -p /run/sshd /dev/pts
mount -t devpts devpts /dev/pts
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
for m in /lib/modules/*.ko; do insmod "$m"; done
ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
/usr/sbin/sshd -E /tmp/sshd.log
echo "labhost: sshd started ($(uname -r))"
while true; do sleep 3600; done
