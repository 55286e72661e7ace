#!/bin/sh
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the initramfs scripts/real-guest/qemu.sh builds for its QEMU guest.
# Loads the modules listed in /modules (dependencies first), dirties and frees
# dirty_mb= MiB (kernel command line, default 256) through a tmpfs so that the
# page allocator holds many free high-order blocks, prints "@@IDLE" and then
# /proc/buddyinfo once a second between "@@BUDDY begin <uptime>" and
# "@@BUDDY end" lines, which the host reads from the serial console.

PATH=/bin:/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

dirty_mb=256
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
    dirty_mb=*) dirty_mb=${word#dirty_mb=} ;;
    esac
done

echo "@@INIT kernel $(uname -r)"
while read -r mod; do
    [ -n "$mod" ] || continue
    if insmod "/lib/modules/$mod"; then
        echo "@@INIT loaded $mod"
    else
        echo "@@INIT insmod $mod failed"
        echo "@@FAIL"
    fi
done </modules

# The balloon driver binds to the device from the PCI probe; give it a moment.
bound=
i=0
while [ -z "$bound" ] && [ $i -lt 50 ]; do
    for d in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do
        [ -e "$d" ] && bound=$d
    done
    [ -n "$bound" ] || sleep 0.1
    i=$((i + 1))
done
if [ -n "$bound" ]; then
    echo "@@INIT balloon bound: ${bound##*/} features $(cat "$bound/features")"
else
    echo "@@INIT virtio_balloon is not bound to a device"
    dmesg | tail -n 20
    echo "@@FAIL"
fi

echo "@@INIT MemFree before: $(grep MemFree /proc/meminfo)"
mkdir -p /scratch
mount -t tmpfs -o size=$((dirty_mb + 16))m tmpfs /scratch
dd if=/dev/zero of=/scratch/fill bs=1M count="$dirty_mb" 2>/dev/null
echo "@@INIT dirtied $dirty_mb MiB: $(grep MemFree /proc/meminfo)"
rm -f /scratch/fill
umount /scratch
echo "@@INIT freed it again: $(grep MemFree /proc/meminfo)"
echo "@@IDLE"

while :; do
    read -r up _ </proc/uptime
    echo "@@BUDDY begin $up"
    cat /proc/buddyinfo
    echo "@@BUDDY end"
    sleep 1
done
