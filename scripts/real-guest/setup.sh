#!/usr/bin/env bash
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Prepares the guest side of the real-guest tests: installs Debian's
# User-Mode Linux kernel and a static busybox, then builds an initramfs
# holding busybox, the UML kernel's virtio_balloon.ko (and whatever it
# depends on), /init (init.sh) and the guest agent (agent.c).
#
# Output (default <repo>/target/real-guest, override with REAL_GUEST_DIR):
#   initrd.gz   the initramfs
#   env         KEY=VALUE lines: UML_LINUX, UML_KERNEL_VERSION, INITRD, ...
#   stamp       hash of the inputs; the build is skipped while it matches
#
# Idempotent: a second run with nothing changed only checks and prints.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${REAL_GUEST_DIR:-$repo/target/real-guest}
packages=(user-mode-linux busybox-static)
busybox=/bin/busybox
module=kernel/drivers/virtio/virtio_balloon.ko

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# --- packages ---------------------------------------------------------------

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != installed ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} > 0)); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to install ${missing[*]}"
        sudo=(sudo)
    fi
    echo "setup.sh: installing ${missing[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

command -v gcc >/dev/null || die "gcc is needed to build the guest agent"

# --- the UML kernel ---------------------------------------------------------

uml=$(command -v linux.uml || true)
[[ -n $uml ]] || die "linux.uml not found after installing user-mode-linux"
kver=$("$uml" --version </dev/null)
kver=${kver//[[:space:]]/}
[[ -n $kver ]] || die "$uml --version printed nothing"
moddir=/usr/lib/uml/modules/$kver
[[ -f $moddir/$module ]] || die "$moddir/$module not found (is $uml from user-mode-linux?)"
[[ -x $busybox ]] || die "$busybox not found"
if readelf -l "$busybox" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$busybox is not static (install busybox-static)"
fi

# Modules to load, dependencies first (modules.dep lists a module's
# dependencies, nearest first, so load them in reverse order).
dep_line=$(grep -E "^${module//./\\.}:" "$moddir/modules.dep" || true)
[[ -n $dep_line ]] || die "$module missing from $moddir/modules.dep"
read -r -a deps <<<"${dep_line#*:}"
load_order=()
for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
    load_order+=("${deps[i]}")
done
load_order+=("$module")

# --- skip the build when nothing changed ---------------------------------------

inputs=("$here/agent.c" "$here/init.sh" "$here/setup.sh" "$busybox" "$uml")
for mod in "${load_order[@]}"; do
    inputs+=("$moddir/$mod")
done
stamp=$({
    echo "$kver $out"
    sha256sum "${inputs[@]}"
} | sha256sum | cut -d' ' -f1)

initrd=$out/initrd.gz
envfile=$out/env
if [[ -f $initrd && -f $envfile && -f $out/stamp && $(<"$out/stamp") == "$stamp" ]]; then
    echo "setup.sh: $initrd is up to date (kernel $kver)"
    cat "$envfile"
    exit 0
fi

# --- build the initramfs ------------------------------------------------------

mkdir -p "$out"
stage=$(mktemp -d "${TMPDIR:-/tmp}/real-guest.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,etc/real-guest,"lib/modules/$kver"}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    case $applet in
    busybox | */*) ;;
    *) ln -s busybox "$stage/bin/$applet" ;;
    esac
done

gcc -O2 -static -Wall -Wextra -o "$stage/bin/guest-agent" "$here/agent.c"
install -m 0755 "$here/init.sh" "$stage/init"

for mod in "${load_order[@]}"; do
    mkdir -p "$stage/lib/modules/$kver/$(dirname "$mod")"
    cp "$moddir/$mod" "$stage/lib/modules/$kver/$mod"
done
printf '%s\n' "${load_order[@]}" >"$stage/etc/real-guest/modules"
echo "$kver" >"$stage/etc/real-guest/kernel-version"

# Writes one newc cpio header and name, padded to 4 bytes (no file data).
newc_entry() { # name mode rdevmajor rdevminor
    local name=$1 mode=$2 major=$3 minor=$4
    local namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    local pad=$(((4 - (110 + namesize) % 4) % 4))
    if ((pad > 0)); then
        head -c "$pad" /dev/zero
    fi
}

cpio=$stage.cpio
trap 'rm -rf -- "$stage" "$cpio"' EXIT
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0) >"$cpio" 2>/dev/null
# The kernel opens /dev/console for /init before anything is mounted, so the
# archive needs that node; a second archive adds it without needing mknod.
{
    newc_entry dev/console $((8#020600)) 5 1
    newc_entry TRAILER!!! 0 0 0
} >>"$cpio"
gzip -9n <"$cpio" >"$initrd.tmp"
mv -f "$initrd.tmp" "$initrd"

cat >"$envfile.tmp" <<EOF
UML_LINUX=$uml
UML_KERNEL_VERSION=$kver
UML_MODULES_DIR=$moddir
INITRD=$initrd
BALLOON_MODULE=/lib/modules/$kver/$module
GUEST_MODULES=${load_order[*]}
AGENT_PROTOCOL=1
EOF
mv -f "$envfile.tmp" "$envfile"
echo "$stamp" >"$out/stamp"

echo "setup.sh: built $initrd ($(du -k "$initrd" | cut -f1) KiB) for UML kernel $kver"
echo "setup.sh: modules: ${load_order[*]}"
echo "setup.sh: agent: $(du -k "$stage/bin/guest-agent" | cut -f1) KiB static binary"
cat "$envfile"
