#!/usr/bin/env bash
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs one free page hint round between a real Linux guest under QEMU and the
# vhost-user-balloon daemon. Manual tool, not part of CI.
#
# Usage: scripts/real-guest/qemu.sh [build|guest|run|all]...   (default: all)
#
#   build  QEMU from Debian's source package (bookworm-backports, 10.0.x), with
#          the generic vhost-user-device made user-creatable (upstream marks it
#          `user_creatable = false`; the patch is applied with sed to the
#          unpacked source, nothing of QEMU is kept in this repository).
#          Only qemu-system-x86_64 is built, for TCG, with the few devices the
#          run needs (~1300 ninja steps, under nice -n 19 with -j2). Measured:
#          3 minutes from download to binary on an idle-ish two-core machine;
#          about 25 minutes were seen on a busy one.
#          Installs build dependencies from the system's sources, and meson
#          1.7 from bookworm-backports (bookworm's 1.0 is too old for QEMU 10).
#   guest  Debian's bookworm cloud kernel (vmlinuz) and an initramfs holding a
#          static busybox, virtio_balloon.ko with its dependencies, and
#          qemu-guest-init.sh as /init (dirties and frees some memory, then
#          prints /proc/buddyinfo every second).
#   run    Installs seabios and qemu-system-data (firmware and the
#          linuxboot option ROM, passed with -L), starts
#          target/release/vhost-user-balloon (build it first with
#          `cargo build --release -p vhost-user-balloon`), boots the guest with
#          `-device vhost-user-device-pci,virtio-id=5,...`, waits for the guest
#          to be idle, runs one hint round over the control socket and prints
#          its figures, finishes the round and shuts everything down.
#
# Every step skips what is already there; remove the cache (or a part of it) to
# redo it. Needs root for apt-get (packages are installed from the system's
# own sources; bookworm-backports is only read through a private apt state
# directory, so the system's apt configuration is not changed).
#
# Environment:
#   QEMU_CACHE      cache directory (default ~/.cache/virtio-balloon-qemu)
#   JOBS            parallel build jobs (default 2)
#   NICE            niceness of the build (default 19)
#   GUEST_MEM_MB    guest memory (default 1024)
#   DIRTY_MB        MiB the guest dirties and frees before the round (default 512)
#   ROUND_TIMEOUT_S how long to wait for the guest to complete the round (default 120)
#   BOOT_TIMEOUT_S  how long to wait for the guest to be idle (default 300)

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${QEMU_CACHE:-$HOME/.cache/virtio-balloon-qemu}
jobs=${JOBS:-2}
niceness=${NICE:-19}
guest_mem_mb=${GUEST_MEM_MB:-1024}
dirty_mb=${DIRTY_MB:-512}
round_timeout_s=${ROUND_TIMEOUT_S:-120}
boot_timeout_s=${BOOT_TIMEOUT_S:-300}

qemu_bin=$cache/qemu-build/qemu-system-x86_64
kernel=$cache/guest/vmlinuz
initrd=$cache/guest/initrd.gz

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'qemu.sh: error: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

export DEBIAN_FRONTEND=noninteractive

# Installs the named packages that are missing, from the system's sources.
need_packages() {
    local missing=() p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing ${missing[*]} (apt-get, system sources)"
    apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
}

# A private apt state with bookworm-backports (deb and deb-src) from the mirror the
# system already uses. Sets the array `apt_bp` to the options selecting it.
apt_bp=()
backports_apt() {
    ((${#apt_bp[@]})) && return 0
    local dir=$cache/apt uri
    mkdir -p "$dir/lists/partial" "$dir/parts"
    uri=$(sed -n 's|^URIs: *\([^ ]*/debian\)/*$|\1|p' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 1p)
    [[ -n $uri ]] || uri=$(sed -n 's|^deb \(\[[^]]*\] \)\{0,1\}\(https\{0,1\}://[^ ]*/debian\)/* .*|\2|p' /etc/apt/sources.list 2>/dev/null | sed -n 1p)
    [[ -n $uri ]] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    cat >"$dir/parts/backports.sources" <<EOF
Types: deb deb-src
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_bp=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$dir/parts"
        -o "Dir::State::Lists=$dir/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
        -o APT::Sandbox::User=root)
    if [[ ! -f $dir/updated ]] || (($(date +%s) - $(stat -c %Y "$dir/updated") > 86400)); then
        say "reading bookworm-backports from $uri (private lists in $dir/lists)"
        apt-get "${apt_bp[@]}" update -qq || die "apt-get update of bookworm-backports ($uri) failed"
        touch "$dir/updated"
    fi
}

# --- build ------------------------------------------------------------------

phase_build() {
    if [[ -x $qemu_bin ]]; then
        say "build: $qemu_bin is there ($("$qemu_bin" --version | head -n1))"
        return 0
    fi
    local t0
    t0=$(now)
    need_packages build-essential ninja-build pkgconf libglib2.0-dev zlib1g-dev libfdt-dev \
        python3-venv python3-pip xz-utils dpkg-dev
    backports_apt

    # meson: QEMU 10 needs a newer one than bookworm's 1.0.
    if ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson 2>/dev/null || echo 0)" ge 1.5; then
        local mver
        mver=$(apt-cache "${apt_bp[@]}" madison meson | awk '/bpo12/ && !v { v = $3 } END { print v }')
        [[ -n $mver ]] || die "no meson in bookworm-backports"
        say "installing meson $mver from bookworm-backports"
        mkdir -p "$cache/debs"
        (cd "$cache/debs" && apt-get "${apt_bp[@]}" download "meson=$mver" >/dev/null) ||
            die "downloading meson $mver failed"
        apt-get install -y -qq "$cache"/debs/meson_*.deb >/dev/null || die "installing meson failed"
    fi

    # Debian's QEMU source package (only the upstream tarball is used).
    local src=$cache/src qver orig
    mkdir -p "$src"
    orig=$(find "$src" -maxdepth 1 -name 'qemu_*.orig.tar.xz' -print -quit)
    if [[ -z $orig ]]; then
        qver=$(apt-cache "${apt_bp[@]}" showsrc qemu | awk '/^Version:/ && /bpo12/ && !v { v = $2 } END { print v }')
        [[ -n $qver ]] || die "no qemu source package in bookworm-backports"
        say "downloading Debian's qemu $qver source package"
        # Only the upstream tarball is needed: carry on if apt fetched it (its hash is
        # checked against the Sources index) even when the .dsc or the Debian
        # tarball cannot be fetched (seen with a mirror proxy answering 404).
        (cd "$src" && apt-get "${apt_bp[@]}" source --download-only "qemu=$qver" >/dev/null) ||
            say "warning: apt-get source qemu=$qver reported errors (above); checking for the orig tarball"
        orig=$(find "$src" -maxdepth 1 -name 'qemu_*.orig.tar.xz' -print -quit)
        [[ -n $orig ]] || die "apt-get source qemu=$qver did not fetch the orig tarball"
    fi
    local tree=$src/qemu
    if [[ ! -f $tree/.unpacked ]]; then
        say "unpacking $(basename "$orig")"
        rm -rf "$tree" && mkdir -p "$tree"
        tar -xf "$orig" -C "$tree" --strip-components=1
        touch "$tree/.unpacked"
    fi

    # The patch: let -device create the generic vhost-user devices.
    local f
    for f in hw/virtio/vhost-user-device.c hw/virtio/vhost-user-device-pci.c; do
        grep -q 'user_creatable = false' "$tree/$f" ||
            grep -q 'user_creatable = true' "$tree/$f" || die "$f: no user_creatable line to patch"
        sed -i 's/user_creatable = false/user_creatable = true/' "$tree/$f"
    done
    say "patched: $(grep -l 'user_creatable = true' "$tree"/hw/virtio/vhost-user-device*.c | xargs -n1 basename | tr '\n' ' ')"

    # The +ds tarball has neither bundled wheels nor firmware blobs.
    if ! compgen -G "$tree/python/wheels/pycotap-*.whl" >/dev/null; then
        say "fetching the pycotap wheel QEMU's configure wants (pip download)"
        mkdir -p "$tree/python/wheels"
        pip3 download -q --no-deps --only-binary=:all: -d "$tree/python/wheels" pycotap==1.3.1 ||
            die "pip download pycotap==1.3.1 failed"
    fi
    sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$tree/meson.build"

    # Only what the run needs: the i440fx PC and virtio-pci. The generic
    # vhost-user-device(-pci) has no Kconfig symbol: hw/virtio/meson.build builds
    # it whenever vhost-user is enabled.
    cat >"$tree/configs/devices/x86_64-softmmu/vub.mak" <<'EOF'
CONFIG_I440FX=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_BALLOON=y
EOF

    local build=$cache/qemu-build
    if [[ ! -f $build/build.ninja ]]; then
        say "configuring (log: $cache/configure.log)"
        rm -rf "$build" && mkdir -p "$build"
        (cd "$build" && nice -n "$niceness" "$tree/configure" --python=/usr/bin/python3 \
            --target-list=x86_64-softmmu --without-default-features --without-default-devices \
            --with-devices-x86_64=vub --enable-vhost-user --disable-docs --disable-install-blobs \
            >"$cache/configure.log" 2>&1) || {
            tail -n 30 "$cache/configure.log" >&2
            die "configure failed (see $cache/configure.log)"
        }
    fi
    say "building qemu-system-x86_64: nice -n $niceness ninja -j$jobs (log: $cache/build.log)"
    (cd "$build" && nice -n "$niceness" ninja -j"$jobs" qemu-system-x86_64 >"$cache/build.log" 2>&1) || {
        tail -n 30 "$cache/build.log" >&2
        die "the build failed (see $cache/build.log)"
    }
    say "build: done in $(elapsed "$t0" "$(now)") s: $("$qemu_bin" --version | head -n1)"
}

# --- guest ------------------------------------------------------------------

# Prints the module's dependencies (names), read from the .ko itself.
mod_depends() {
    local f=$1 tmp
    case $f in
    *.xz)
        tmp=$(mktemp)
        xz -dc "$f" >"$tmp"
        modinfo -F depends "$tmp" | tr ',' '\n'
        rm -f "$tmp"
        ;;
    *) modinfo -F depends "$f" | tr ',' '\n' ;;
    esac
}

phase_guest() {
    if [[ -f $kernel && -f $initrd && $initrd -nt $here/qemu-guest-init.sh ]]; then
        say "guest: $kernel and $initrd are there"
        return 0
    fi
    need_packages busybox-static cpio kmod xz-utils
    local g=$cache/guest deb
    mkdir -p "$g"
    deb=$(find "$g" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*.deb' -print -quit)
    if [[ -z $deb ]]; then
        # The metapackage names the versioned kernel package.
        local pkg
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ && !v { v = $2 } END { print v }')
        [[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
        say "downloading $pkg (Debian's bookworm cloud kernel)"
        (cd "$g" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
        deb=$(find "$g" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*.deb' -print -quit)
    fi
    if [[ ! -d $g/pkg/boot ]]; then
        rm -rf "$g/pkg"
        dpkg -x "$deb" "$g/pkg"
    fi
    local kver
    kver=$(basename "$(find "$g/pkg/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)")
    cp "$g/pkg/boot/vmlinuz-$kver" "$kernel"

    # virtio_balloon and its dependencies, dependencies first.
    local moddir=$g/pkg/lib/modules/$kver order=() seen=" "
    add_module() {
        local name=$1 f d
        [[ $seen == *" $name "* ]] && return 0
        seen+="$name "
        f=$(find "$moddir/kernel" -name "$name.ko" -o -name "$name.ko.xz" -o -name "${name//_/-}.ko" -o -name "${name//_/-}.ko.xz" | sed -n 1p)
        if [[ -z $f ]]; then
            grep -qE "/$name\.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
            die "module $name not found for $kver (and not built in)"
        fi
        for d in $(mod_depends "$f"); do add_module "$d"; done
        order+=("$f")
    }
    add_module virtio_balloon
    # virtio_pci drives the device; it is not a symbol dependency of the balloon.
    add_module virtio_pci

    local root=$g/root f name
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for name in $("$root/bin/busybox" --list); do
        [[ $name == busybox ]] || ln -s busybox "$root/bin/$name"
    done
    : >"$root/modules"
    for f in "${order[@]}"; do
        name=$(basename "$f")
        if [[ $name == *.xz ]]; then
            xz -dc "$f" >"$root/lib/modules/${name%.xz}"
            name=${name%.xz}
        else
            cp "$f" "$root/lib/modules/$name"
        fi
        echo "$name" >>"$root/modules"
    done
    install -m 755 "$here/qemu-guest-init.sh" "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9 >"$initrd")
    say "guest: kernel $kver, modules: $(tr '\n' ' ' <"$root/modules")"
    say "guest: $kernel ($(du -h "$kernel" | cut -f1)), $initrd ($(du -h "$initrd" | cut -f1))"
}

# --- run --------------------------------------------------------------------

# The processes `run` starts; stopped on exit.
daemon_pid=""
qemu_pid=""
cleanup() {
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    qemu_pid=""
    daemon_pid=""
}

# Sends one JSON request line to the control socket and prints the answer line.
ctl() {
    python3 - "$control" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(900)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode())
EOF
}

# Prints the value at a dotted path (e.g. metrics.hint.bytes_accepted) of a JSON object.
jget() {
    python3 -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print(json.dumps(v) if isinstance(v, (dict, list)) else v)' "$1" "$2"
}

# Free order-10 blocks summed over the zones of the last buddyinfo block before
# the marker line number $1 (0: the last block in the log).
order10() {
    awk -v upto="$1" '
        { sub(/\r$/, "") }
        /@@BUDDY begin/ { if (upto == 0 || NR < upto) { sum = 0; n = 0; t = $3; inblk = 1 } else inblk = 0; next }
        /@@BUDDY end/ { if (inblk) { done_sum = sum; done_t = t } inblk = 0; next }
        inblk && /Node/ { sum += $NF; n++ }
        END { printf "%s (%d MiB; guest uptime %s s)\n", done_sum, done_sum * 4, done_t }' "$serial"
}

phase_run() {
    local daemon=$repo/target/release/vhost-user-balloon
    [[ -x $daemon ]] || die "no $daemon: cargo build --release -p vhost-user-balloon"
    [[ -x $qemu_bin ]] || die "no $qemu_bin: run '$0 build' first"
    [[ -f $kernel && -f $initrd ]] || die "no guest: run '$0 guest' first"
    need_packages seabios qemu-system-data

    local run
    run=$(mktemp -d "${TMPDIR:-/tmp}/vub-qemu.XXXXXX")
    local sock=$run/vub.sock
    control=$run/control.sock
    serial=$run/serial.log
    trap cleanup EXIT

    say "run directory: $run"
    local dcmd=("$daemon" --socket "$sock" --control "$control")
    say "starting the daemon: ${dcmd[*]}"
    "${dcmd[@]}" >"$run/daemon.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 100); do
        [[ -S $sock && -S $control ]] && break
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$run/daemon.log" >&2; die "the daemon exited"; }
        sleep 0.1
    done
    [[ -S $sock ]] || die "the daemon did not create $sock"

    # The generic vhost-user-device-pci: virtio-id 5 is the balloon; five queues
    # (inflate, deflate, stats, free page, reporting: the daemon offers every
    # feature, and Linux numbers only the queues of negotiated features);
    # config_size 16 covers num_pages, actual, free_page_hint_cmd_id and
    # poison_val. The backend maps guest memory, hence the shared memfd.
    # shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
    local qcmd=("$qemu_bin" -L /usr/share/seabios -L /usr/share/qemu
        -machine pc,accel=tcg,memory-backend=mem -cpu max -smp 1 -m "${guest_mem_mb}M"
        -object "memory-backend-memfd,id=mem,size=${guest_mem_mb}M,share=on"
        -nodefaults -display none -vga none
        -chardev "file,id=con,path=$serial" -serial chardev:con
        -chardev "socket,id=vub,path=$sock"
        -device vhost-user-device-pci,chardev=vub,virtio-id=5,num_vqs=5,vq_size=256,config_size=16
        -kernel "$kernel" -initrd "$initrd"
        -append "console=ttyS0 quiet dirty_mb=$dirty_mb")
    say "starting QEMU: ${qcmd[*]}"
    local t_boot
    t_boot=$(now)
    "${qcmd[@]}" >"$run/qemu.log" 2>&1 &
    qemu_pid=$!

    say "waiting for the guest to be idle (serial console: $serial)"
    while ! grep -q '@@IDLE' "$serial" 2>/dev/null; do
        kill -0 "$qemu_pid" 2>/dev/null || { cat "$run/qemu.log" >&2; die "QEMU exited"; }
        grep -q '@@FAIL' "$serial" 2>/dev/null && { cat "$serial" >&2; die "the guest init failed"; }
        (($(date +%s) - ${t_boot%.*} < boot_timeout_s)) || { cat "$serial" >&2; die "the guest was not idle within ${boot_timeout_s}s"; }
        sleep 0.5
    done
    local t_idle
    t_idle=$(now)
    grep '@@INIT' "$serial" | sed 's/^/    guest: /' >&2
    say "guest idle after $(elapsed "$t_boot" "$t_idle") s (QEMU start to @@IDLE)"
    # Let the once-a-second buddyinfo print settle after the dirty/free step.
    sleep 2

    local st
    st=$(ctl '{"cmd":"status"}')
    [[ $(jget "$st" activated) == True ]] || die "the device is not activated: $st"
    say "negotiated features: $(jget "$st" features.names)"
    say "hint state before the round: $(jget "$st" hint)"
    local before_line
    before_line=$(wc -l <"$serial")
    local b_before
    b_before=$(order10 $((before_line + 1)))

    local t0 t1 ans
    say 'control: {"cmd":"start_round"}'
    t0=$(now)
    ans=$(ctl '{"cmd":"start_round"}')
    echo "    $ans" >&2
    say "control: {\"cmd\":\"wait_round\",\"timeout_ms\":$((round_timeout_s * 1000))}"
    ans=$(ctl "{\"cmd\":\"wait_round\",\"timeout_ms\":$((round_timeout_s * 1000))}")
    t1=$(now)
    echo "    $ans" >&2
    st=$(ctl '{"cmd":"status"}')
    # Two more buddyinfo prints while the guest still holds the hinted pages.
    sleep 2.5
    local during_line b_during
    during_line=$(wc -l <"$serial")
    b_during=$(order10 $((during_line + 1)))

    say 'control: {"cmd":"finish_round"}'
    ans=$(ctl '{"cmd":"finish_round"}')
    echo "    $ans" >&2
    # The driver frees the hinted blocks from a work item; under TCG that can take
    # a few console prints. Wait (up to 15 s) for the count to be back.
    local b_after
    for _ in $(seq 15); do
        sleep 1
        b_after=$(order10 0)
        ((${b_after%% *} >= ${b_before%% *})) && break
    done

    echo
    echo "hint round figures"
    echo "  guest boot to idle:            $(elapsed "$t_boot" "$t_idle") s (TCG, ${guest_mem_mb} MiB, dirtied/freed ${dirty_mb} MiB)"
    echo "  start_round to completion:     $(elapsed "$t0" "$t1") s"
    echo "  round complete:                $(jget "$st" hint.round_complete) (state $(jget "$st" hint.state), cmd_id $(jget "$st" hint.cmd_id))"
    echo "  hints accepted:                $(jget "$st" metrics.hint.hints_accepted)"
    echo "  bytes accepted:                $(jget "$st" metrics.hint.bytes_accepted)"
    echo "  rounds stopped by guest:       $(jget "$st" metrics.hint.rounds_stopped_by_guest)"
    echo "  guest free order-10 blocks:    before $b_before"
    echo "                                 during $b_during"
    echo "                                 after finish_round $b_after"
    echo "  order-10 blocks the driver held during the round: $((${b_before%% *} - ${b_during%% *}))" \
        "(vs. $(jget "$st" metrics.hint.hints_accepted) hints accepted)"
    echo "  hint metrics:                  $(jget "$st" metrics.hint)"
    echo

    say "shutting down: QEMU, then the daemon"
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    ctl '{"cmd":"shutdown"}' >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    cleanup
    say "logs kept in $run (serial.log, daemon.log, qemu.log)"
}

# --- main -------------------------------------------------------------------

(($#)) || set -- all
for phase in "$@"; do
    case $phase in
    build) phase_build ;;
    guest) phase_guest ;;
    run) phase_run ;;
    all) phase_build && phase_guest && phase_run ;;
    -h | --help) sed -n '5,/^$/s/^# \{0,1\}//p' "$0" && exit 0 ;;
    *) die "unknown phase '$phase' (build, guest, run or all)" ;;
    esac
done
