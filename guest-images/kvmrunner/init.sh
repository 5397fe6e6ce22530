#!/bin/sh
# /init of the KVM-runner stand-in (guest-images/kvmrunner/build.py): Linux inside Bochs that acts
# like an Intel KVM runner.  It loads kvm_intel with nested=1, brings up eth0 (Bochs' e1000 on
# slirp; the host forwards a loopback port to sshd here), starts sshd and keeps a root shell on
# the serial console.  Every step prints "kvmrunner: <step> at <uptime>" so a watcher can time it.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs -o mode=1777 tmp /tmp
/bin/busybox mount -t tmpfs -o mode=755 run /run
mkdir -p /run/sshd /dev/pts
mount -t devpts devpts /dev/pts
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
up() { cut -d' ' -f1 /proc/uptime; }
echo "kvmrunner: init at $(up)"

# The KVM modules in dependency order, each line "<file> [parameters]" (kvm-intel.ko nested=1).
while read -r m args; do
    # shellcheck disable=SC2086 # the parameters are separate words
    insmod "/lib/modules/kvm/$m" $args || echo "kvmrunner: insmod $m failed"
done </lib/modules/kvm/order
p=/sys/module/kvm_intel/parameters
echo "kvmrunner: kvm loaded at $(up): nested=$(cat $p/nested) ept=$(cat $p/ept) vpid=$(cat $p/vpid) unrestricted_guest=$(cat $p/unrestricted_guest) dev_kvm=$([ -c /dev/kvm ] && echo yes || echo no)"

insmod /lib/modules/e1000.ko
ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
/usr/sbin/sshd -E /tmp/sshd.log
echo "kvmrunner: sshd started at $(up)"
echo "kvmrunner: ready ($(uname -r))"
# A root shell on the console (ttyS0, Bochs' COM1); a new one if it exits.
while true; do setsid cttyhack sh; done
