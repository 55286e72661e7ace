#!/bin/sh
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the initramfs scripts/real-guest/qemu.sh builds for its QEMU guest.
# Loads the modules listed in /modules (dependencies first), dirties and frees
# dirty_mb= MiB (kernel command line, default 256) through a tmpfs so that the
# page allocator holds many free high-order blocks, prints "@@IDLE" and then
# /proc/buddyinfo once a second between "@@BUDDY begin <uptime>" and
# "@@BUDDY end" lines, followed by "@@MEM <MemTotal kB> <MemFree kB>", which
# the host reads from the serial console.
#
# The freed memory holds 0xff bytes (fill=ones, the default), not zeros: a zero
# page travels as a header only in QEMU's migration stream and in the daemon's
# copy, which would hide what free page hints save. fill=zero writes zeros.

PATH=/bin:/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

dirty_mb=256
fill=ones
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
    dirty_mb=*) dirty_mb=${word#dirty_mb=} ;;
    fill=*) fill=${word#fill=} ;;
    esac
done

# Prints "<MemTotal kB> <MemFree kB>".
meminfo() {
    awk '/^MemTotal:/ { t = $2 } /^MemFree:/ { f = $2 } END { print t, f }' /proc/meminfo
}

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

echo "@@INIT MemFree before: $(grep MemFree /proc/meminfo) (uptime $(cut -d' ' -f1 /proc/uptime) s)"
mkdir -p /scratch
mount -t tmpfs -o size=$((dirty_mb + 32))m tmpfs /scratch
if [ "$fill" = zero ]; then
    dd if=/dev/zero of=/scratch/fill bs=1M count="$dirty_mb" 2>/dev/null
else
    # 0xff bytes: a 1 MiB piece from tr (slow per byte under TCG), doubled to
    # 16 MiB, then copied with cat.
    tr '\000' '\377' </dev/zero | head -c 1048576 >/scratch/p1
    cat /scratch/p1 /scratch/p1 >/scratch/p2
    cat /scratch/p2 /scratch/p2 >/scratch/p4
    cat /scratch/p4 /scratch/p4 >/scratch/p8
    cat /scratch/p8 /scratch/p8 >/scratch/p16
    i=0
    while [ $i -lt $((dirty_mb / 16)) ]; do
        cat /scratch/p16
        i=$((i + 1))
    done >/scratch/fill
    i=0
    while [ $i -lt $((dirty_mb % 16)) ]; do
        cat /scratch/p1
        i=$((i + 1))
    done >>/scratch/fill
fi
echo "@@INIT dirtied $dirty_mb MiB ($fill, $(stat -c %s /scratch/fill) bytes): $(grep MemFree /proc/meminfo) (uptime $(cut -d' ' -f1 /proc/uptime) s)"
rm -f /scratch/fill /scratch/p1 /scratch/p2 /scratch/p4 /scratch/p8 /scratch/p16
umount /scratch
echo "@@INIT freed it again: $(grep MemFree /proc/meminfo)"
echo "@@MEM $(meminfo)"
echo "@@IDLE"

while :; do
    read -r up _ </proc/uptime
    echo "@@BUDDY begin $up"
    cat /proc/buddyinfo
    echo "@@BUDDY end"
    echo "@@MEM $(meminfo)"
    sleep 1
done
