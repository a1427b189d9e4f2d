#!/bin/sh
# FireRunner initramfs /init (busybox sh). Loads the virtio/ext4/overlay
# modules, mounts the read-only root (label frroot) under a tmpfs overlay,
# copies the guest agent in and switch_roots to it as PID 1.
# Kernel cmdline knobs: firerunner.overlay_size=<tmpfs size, default 50%>,
# firerunner.debug=1 (drop to a shell on failure instead of rebooting).
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

overlay_size=50%
debug=0
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	firerunner.overlay_size=*) overlay_size=${arg#*=} ;;
	firerunner.debug=1) debug=1 ;;
	esac
done

fail() {
	echo "FIRERUNNER-INIT: error: $*"
	if [ "$debug" = 1 ]; then exec sh; fi
	sync
	# reboot -> the VMM exits (reboot=t + -no-reboot on QEMU, reboot=k on Firecracker)
	reboot -f
}

while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$mod" 2>/dev/null || echo "FIRERUNNER-INIT: insmod $mod failed"
done </etc/modules.order

root=
i=0
while [ $i -lt 200 ]; do
	root=$(findfs LABEL=frroot 2>/dev/null) && [ -n "$root" ] && break
	i=$((i + 1))
	sleep 0.05
done
[ -n "$root" ] || fail "no disk labelled frroot"

mkdir -p /mnt/lower /mnt/rw /mnt/root
mount -t ext4 -o ro,noload "$root" /mnt/lower || fail "mount $root"
mount -t tmpfs -o "size=$overlay_size,mode=0755" tmpfs /mnt/rw || fail "mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /mnt/root || fail "mount overlay"

# The agent ships in the initramfs, so a new agent needs no rootfs rebuild.
cp /firerunner-agent /mnt/root/sbin/firerunner-agent || fail "install agent"
chmod 0755 /mnt/root/sbin/firerunner-agent

# Hand the already-mounted /dev, /proc, /sys over to the agent.
for d in dev proc sys; do mount --move "/$d" "/mnt/root/$d" || fail "move /$d"; done
exec switch_root /mnt/root /sbin/firerunner-agent
