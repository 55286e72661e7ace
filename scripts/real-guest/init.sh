#!/bin/sh
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the real-guest initramfs (built by scripts/real-guest/setup.sh).
# Mounts the pseudo file systems, loads virtio_balloon.ko and hands the
# console over to the guest agent.
#
# Kernel command line options read here:
#   realguest.insmod=0   do not load the balloon module (a test can load it
#                        later with `sh insmod /lib/modules/$(uname -r)/...`)
#   realguest.printk=N   console log level while the agent runs (default 1,
#                        so that kernel messages do not clutter the console;
#                        the agent's `dmesg` command reads the whole log)

PATH=/bin:/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || echo "@@INIT warning: devtmpfs not mounted"
mount -t tmpfs tmpfs /tmp

# Prints the value of realguest.$1= from the kernel command line.
cmdline_opt() {
    read -r cmdline </proc/cmdline
    set -f
    for word in $cmdline; do
        case "$word" in
        "realguest.$1="*)
            set +f
            echo "${word#*=}"
            return 0
            ;;
        esac
    done
    set +f
    return 0
}

kver=$(uname -r)
echo "@@INIT kernel $kver"

if [ "$(cmdline_opt insmod)" = 0 ]; then
    echo "@@INIT insmod skipped (realguest.insmod=0)"
else
    # One module path per line, relative to /lib/modules/$kver, in load order.
    while read -r mod; do
        [ -n "$mod" ] || continue
        name=${mod##*/}
        name=${name%.ko}
        if insmod "/lib/modules/$kver/$mod"; then
            echo "@@INIT module $name loaded"
        else
            echo "@@INIT module $name FAILED to load (insmod exit $?)"
        fi
    done </etc/real-guest/modules
fi

level=$(cmdline_opt printk)
echo "${level:-1}" >/proc/sys/kernel/printk

exec /bin/guest-agent
