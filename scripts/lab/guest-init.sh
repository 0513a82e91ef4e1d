#!/bin/sh
# PID 1 of the LIO test guest (scripts/lio-guest copies it to /sbin/pathagent-init in the rootfs; the
# initramfs switch_roots to it). No systemd, no udev. It sets up the bare minimum and starts the control
# daemon (scripts/lab/guestd.py, from the 9p share of the project checkout); when the daemon exits (or is
# asked to power off) the guest powers off, which ends qemu.
#
# Deliberately NOT done here: loading target_core_*, iscsi_target_mod or rbd, mounting configfs, writing
# the dbroot. The LIO plugin under test does that lazily itself, and must be tested doing it.
#
# Kernel command line knobs:
#   pa.hostname=NAME  pa.ip=ADDR/PREFIX  pa.gw=ADDR  pa.share=/abs/path/of/the/checkout
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
say() { echo "pathagent-init: $*" > /dev/console; }
# PID 1 must outlive the power-off it asks for (if it exits first the kernel panics, "Attempted to kill init!"):
# once seen when the sleep after the sysrq could not be executed (exit 126) while the system went down
off() { sync; say "power off"; echo o > /proc/sysrq-trigger; while :; do sleep 1 2>/dev/null || :; done; }

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock
say "up $(cut -d' ' -f1 /proc/uptime) s"

knob() {  # knob NAME: its value on the kernel command line
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
  done
}
host=$(knob pa.hostname); addr=$(knob pa.ip); gw=$(knob pa.gw); share=$(knob pa.share)

# virtio devices only: net, console (the control port), rng, plus whatever else is on the virtio bus
modprobe -qa virtio_net virtio_console virtio_rng
cat /sys/bus/virtio/devices/*/modalias 2>/dev/null | sort -u | xargs -r modprobe -qa 2>/dev/null

if [ -n "$host" ]; then
  hostname "$host"
  echo "$host" > /etc/hostname
  printf '127.0.0.1\tlocalhost\n%s\t%s\n' "${addr%/*}" "$host" > /etc/hosts
fi
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up
[ -z "$addr" ] || ip addr add "$addr" dev eth0
[ -z "$gw" ] || ip route add default via "$gw" dev eth0

o=trans=virtio,version=9p2000.L,msize=524288
mkdir -p /mnt/ctl
mount -t 9p -o "$o" ctl /mnt/ctl || { say "cannot mount the ctl share"; off; }
if [ -z "$share" ]; then say "no pa.share on the kernel command line"; off; fi
mkdir -p "$share"
mount -t 9p -o "$o" share "$share" || { say "cannot mount the project share on $share"; off; }

py="$share/.venv/bin/python"
[ -x "$py" ] || py=/usr/bin/python3
say "starting guestd ($py) at $(cut -d' ' -f1 /proc/uptime) s"
cd /
PYTHONUNBUFFERED=1 "$py" "$share/scripts/lab/guestd.py" --ready /run/guestd.ready \
  </dev/null >/mnt/ctl/guestd.log 2>&1 &
pid=$!
i=0
while [ ! -e /run/guestd.ready ] && kill -0 "$pid" 2>/dev/null && [ $i -lt 1200 ]; do
  sleep 0.05; i=$((i + 1))
done
if [ -e /run/guestd.ready ]; then
  up=$(cut -d' ' -f1 /proc/uptime)
  echo "$up" > /mnt/ctl/ready.tmp && mv /mnt/ctl/ready.tmp /mnt/ctl/ready
  say "ready at $up s"
else
  say "guestd did not come up:"; tail -n 20 /mnt/ctl/guestd.log > /dev/console
fi
# PID 1's wait also reaps orphans re-parented to it.
wait "$pid"
rc=$?
say "guestd exited (rc $rc)"
off
