#!/usr/bin/env bash
# Copyright 2026 The virtio-balloon maintainers.
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs one free page hint round between a real Linux guest under QEMU and the
# vhost-user-balloon daemon. Manual tool, not part of CI.
#
# Usage: scripts/real-guest/qemu.sh [build|guest|run|compare|all]...   (default: all)
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
#          qemu-guest-init.sh as /init (fills some memory with 0xff bytes and
#          frees it, then prints /proc/buddyinfo and MemTotal/MemFree every
#          second).
#   run    Installs seabios and qemu-system-data (firmware and the
#          linuxboot option ROM, passed with -L), starts
#          target/release/vhost-user-balloon (build it first with
#          `cargo build --release -p vhost-user-balloon`), boots the guest with
#          `-device vhost-user-device-pci,virtio-id=5,...`, waits for the guest
#          to be idle, runs one hint round over the control socket and prints
#          its figures, finishes the round and shuts everything down.
#   compare  QEMU's own migration side by side with the daemon's copy, each run
#          on a fresh guest (the same kernel and init; the init fills dirty_mb
#          MiB with 0xff bytes, not zeros, and frees it) and time-boxed:
#          qemu:on/off   QEMU's virtio-balloon-pci (free-page-hint=on with an
#                        iothread, or off), QMP `migrate` to file:, figures
#                        from `query-migrate` and the file's size;
#          daemon:on/off the daemon's `migrate` copy (`"hints":true/false`)
#                        through vhost-user-device-pci, stopping and resuming
#                        the guest over QMP when it asks (waiting_for_stop).
#          Prints one markdown table row per run (also appended to
#          results.md in the compare directory). Each run's directory keeps
#          the command lines, serial.log, the QEMU/daemon logs, and
#          progress.log (query-migrate about once a second) or timeline.log
#          (the stop/resume steps, and whether the resumed guest got its
#          hinted blocks back). Needs `build`, `guest` and the daemon, as
#          `run` does.
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
#   DAEMON          the daemon binary for run and compare (default
#                   target/release/vhost-user-balloon)
# For compare:
#   COMPARE_RUNS    the runs, in order (default "qemu:on qemu:on qemu:on qemu:off
#                   qemu:off daemon:on daemon:on daemon:on daemon:off daemon:off")
#   COMPARE_MEM_MB  guest memory (default 2048)
#   COMPARE_DIRTY_MB MiB the guest fills and frees (default 1600)
#   COMPARE_FILL    what it fills them with: ones (0xff bytes, the default) or zero
#   COMPARE_DIR     where the run logs, migration files and results.md go (default
#                   a new directory vub-compare.XXXXXX under TMPDIR or /tmp); each
#                   migration file is removed once measured unless KEEP_FILES=1
#   QEMU_MAX_BW     QEMU's migration max-bandwidth in bytes/s (default: QEMU's own,
#                   128 MiB/s); the daemon's copy has no rate limit
#   DAEMON_ARGS     more daemon flags for compare (default --no-reporting: QEMU's
#                   balloon does not report free pages either, and pages reported
#                   to the daemon come back as holes, which read as zeros)
#   DAEMON_MAX_ITER the daemon's max_iterations (default: the daemon's, 30)
#   DAEMON_HINT_WAIT_MS the daemon's hint_wait_ms with hints (default: the daemon's, 10 s)
#   RUN_TIMEOUT_S   time box of one run, boot included (default 600): QEMU and the
#                   daemon run under timeout(1), and every run ends with both killed

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
daemon=${DAEMON:-$repo/target/release/vhost-user-balloon}

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

# --- compare ----------------------------------------------------------------

# Sends one QMP command (name, optional JSON arguments) to the socket $qmp_sock and
# prints its "return" as JSON; fails with QEMU's error.
qmp() {
    python3 - "$qmp_sock" "$1" "${2:-}" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
f = s.makefile("rw")
def call(name, args=None):
    msg = {"execute": name}
    if args:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            sys.exit("QMP: connection closed")
        ans = json.loads(line)
        if "event" in ans:
            continue
        if "error" in ans:
            sys.exit("QMP %s: %s" % (name, ans["error"].get("desc")))
        return ans.get("return")
f.readline()  # greeting
call("qmp_capabilities")
print(json.dumps(call(sys.argv[2], json.loads(sys.argv[3]) if sys.argv[3] else None)))
EOF
}

# Prints "<MiB the guest holds (MemTotal - MemFree)>" from the last @@MEM line of $serial.
guest_holds_mib() {
    awk '{ sub(/\r$/, "") } /^@@MEM / { t = $2; f = $3 } END { if (t) printf "%d", (t - f) / 1024; else print "?" }' "$serial"
}

# Free order-10 blocks: "<last block before line $1> <fewest in a block from line $1 on>",
# the driver holding what it hinted shows as the difference.
order10_dip() {
    awk -v from="$1" '
        { sub(/\r$/, "") }
        /@@BUDDY begin/ { sum = 0; inblk = 1; next }
        /@@BUDDY end/ {
            if (inblk) { if (NR < from) before = sum; else if (min == "" || sum < min) min = sum }
            inblk = 0; next
        }
        inblk && /Node/ { sum += $NF }
        END { if (min == "") min = before; printf "%d %d", before, min }' "$serial"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }

# Waits for @@IDLE on $serial (QEMU started at $1), then two more console prints.
wait_idle() {
    local t0=$1
    while ! grep -aq '@@IDLE' "$serial" 2>/dev/null; do
        kill -0 "$qemu_pid" 2>/dev/null || { cat "$run/qemu.log" >&2; return 1; }
        grep -aq '@@FAIL' "$serial" 2>/dev/null && { cat "$serial" >&2; return 1; }
        (($(date +%s) - ${t0%.*} < boot_timeout_s)) || { say "the guest was not idle within ${boot_timeout_s}s"; return 1; }
        sleep 0.5
    done
    sleep 2.5
}

# Stops QEMU (QMP quit, then its pid) and the daemon.
end_run() {
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        qmp quit >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            kill -0 "$qemu_pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        ctl '{"cmd":"shutdown"}' >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    cleanup
}

# Boots the compare guest; $1: "qemu" (QEMU's balloon, hints $2) or "daemon".
start_guest() {
    local runner=$1 hints=$2 dev
    # shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
    if [[ $runner == qemu ]]; then
        dev=(-object iothread,id=io0 -device "virtio-balloon-pci,free-page-hint=$hints,iothread=io0")
    else
        # Four queues without free page reporting (see `run`).
        local vqs=5
        [[ " ${daemon_args[*]} " == *" --no-reporting "* ]] && vqs=4
        dev=(-chardev "socket,id=vub,path=$run/vub.sock"
            -device "vhost-user-device-pci,chardev=vub,virtio-id=5,num_vqs=$vqs,vq_size=256,config_size=16")
    fi
    # shellcheck disable=SC2054
    local qcmd=(timeout -k 10 "$run_timeout_s" "$qemu_bin" -L /usr/share/seabios -L /usr/share/qemu
        -machine pc,accel=tcg,memory-backend=mem -cpu max -smp 1 -m "${cmp_mem_mb}M"
        -object "memory-backend-memfd,id=mem,size=${cmp_mem_mb}M,share=on"
        -nodefaults -display none -vga none
        -chardev "file,id=con,path=$serial" -serial chardev:con
        -qmp "unix:$qmp_sock,server=on,wait=off"
        "${dev[@]}"
        -kernel "$kernel" -initrd "$initrd"
        -append "console=ttyS0 quiet dirty_mb=$cmp_dirty_mb fill=$cmp_fill")
    echo "${qcmd[*]}" >"$run/qemu.cmd"
    "${qcmd[@]}" >"$run/qemu.log" 2>&1 &
    qemu_pid=$!
}

# One run of QEMU's own migration; prints its table row.
compare_qemu() {
    local n=$1 hints=$2 t0 holds dip mig ans st
    t0=$(now)
    start_guest qemu "$hints"
    wait_idle "$t0" || return 1
    holds=$(guest_holds_mib)
    local from
    from=$(wc -l <"$serial")
    if [[ -n $qemu_max_bw ]]; then
        qmp migrate-set-parameters "{\"max-bandwidth\":$qemu_max_bw}" >/dev/null
    fi
    mig=$cmp_dir/qemu-$n.mig
    rm -f "$mig"
    say "run $n: QEMU's migration, free-page-hint=$hints, guest holds $holds MiB: migrate file:$mig"
    local t_mig
    t_mig=$(now)
    qmp migrate "{\"uri\":\"file:$mig\"}" >/dev/null
    # progress.log: seconds since migrate, status, ram.transferred, normal, duplicate,
    # remaining, dirty-sync-count, and the guest's free order-10 blocks (last print).
    while :; do
        ans=$(qmp query-migrate)
        st=$(jget "$ans" status)
        python3 -c '
import json, sys
a = json.loads(sys.argv[1]); r = a.get("ram", {})
print(sys.argv[2], a.get("status"), *(r.get(k) for k in ("transferred", "normal", "duplicate", "remaining", "dirty-sync-count")), sys.argv[3])' \
            "$ans" "$(elapsed "$t_mig" "$(now)")" "$(order10 0 | cut -d' ' -f1)" >>"$run/progress.log"
        [[ $st == completed || $st == failed || $st == cancelled ]] && break
        (($(date +%s) - ${t0%.*} < run_timeout_s)) || { say "run $n: migration not done in time"; st=timeout; break; }
        sleep 0.2
    done
    echo "$ans" >"$run/query-migrate.json"
    sleep 1.2
    dip=$(order10_dip "$from")
    local size=0
    [[ -f $mig ]] && size=$(stat -c %s "$mig")
    [[ ${KEEP_FILES:-0} == 1 ]] || rm -f "$mig"
    end_run
    [[ $st == completed ]] || { say "run $n: migration $st: $ans"; return 1; }
    # runner | hints | guest | holds | transferred | file | pages sent (zero) | passes | hinted blocks | total | downtime
    printf '| %s | QEMU virtio-balloon-pci | %s | %s | %s | %s | %s | %s (%s) | %s syncs | %s | %s | %s |\n' \
        "$n" "$hints" "$cmp_mem_mb" "$holds" "$(mib "$(jget "$ans" ram.transferred)")" "$(mib "$size")" \
        "$(jget "$ans" ram.normal)" "$(jget "$ans" ram.duplicate)" "$(jget "$ans" ram.dirty-sync-count)" \
        "$((${dip%% *} - ${dip##* }))" "$(jget "$ans" total-time)" "$(jget "$ans" downtime)"
}

# One run of the daemon's migrate copy; prints its table row.
compare_daemon() {
    local n=$1 hints=$2 t0 holds dip mig ans st req t_stop="" paused=0
    local hints_json=false
    [[ $hints == on ]] && hints_json=true
    local dcmd=(timeout -k 10 "$run_timeout_s" "$daemon" --socket "$run/vub.sock" --control "$control"
        "${daemon_args[@]}")
    echo "${dcmd[*]}" >"$run/daemon.cmd"
    "${dcmd[@]}" >"$run/daemon.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 100); do
        [[ -S $run/vub.sock && -S $control ]] && break
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$run/daemon.log" >&2; return 1; }
        sleep 0.1
    done
    t0=$(now)
    start_guest daemon "$hints"
    wait_idle "$t0" || return 1
    holds=$(guest_holds_mib)
    local from
    from=$(wc -l <"$serial")
    mig=$cmp_dir/daemon-$n.mig
    rm -f "$mig"
    req="{\"cmd\":\"migrate\",\"path\":\"$mig\",\"hints\":$hints_json,\"overwrite\":true"
    [[ -n $daemon_max_iter ]] && req+=",\"max_iterations\":$daemon_max_iter"
    [[ $hints == on && -n $daemon_hint_wait_ms ]] && req+=",\"hint_wait_ms\":$daemon_hint_wait_ms"
    req+="}"
    say "run $n: the daemon's migrate, hints $hints, guest holds $holds MiB: $req"
    # timeline.log: seconds since the request of each step seen or taken here.
    local t_req
    t_req=$(now)
    ans=$(ctl "$req")
    [[ $(jget "$ans" ok) == True ]] || { say "run $n: $ans"; end_run; return 1; }
    while :; do
        ans=$(ctl '{"cmd":"copy_wait","timeout_ms":1000}')
        st=$(jget "$ans" state)
        case $st in
        waiting_for_stop)
            echo "$(elapsed "$t_req" "$(now)") waiting_for_stop seen" >>"$run/timeline.log"
            t_stop=$(now)
            qmp stop >/dev/null
            echo "$(elapsed "$t_req" "$(now)") QMP stop answered" >>"$run/timeline.log"
            ctl '{"cmd":"guest_stopped"}' >/dev/null
            echo "$(elapsed "$t_req" "$(now)") guest_stopped answered" >>"$run/timeline.log"
            ;;
        done | failed | idle) break ;;
        esac
        (($(date +%s) - ${t0%.*} < run_timeout_s)) || { say "run $n: copy not done in time"; st=timeout; break; }
    done
    echo "$(elapsed "$t_req" "$(now)") $st seen" >>"$run/timeline.log"
    if [[ -n $t_stop ]]; then
        qmp cont >/dev/null || true
        echo "$(elapsed "$t_req" "$(now)") QMP cont answered" >>"$run/timeline.log"
        paused=$(awk -v a="$t_stop" -v b="$(now)" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
    fi
    echo "$ans" >"$run/copy-status.json"
    sleep 1.2
    dip=$(order10_dip "$from")
    # With hints, the copy ended the round with DONE: the resumed guest frees the blocks
    # it held. Wait (up to 20 s) for its free order-10 count to be back.
    if [[ $hints == on && -n $t_stop ]]; then
        local back="" b
        for _ in $(seq 20); do
            b=$(order10 0 | cut -d' ' -f1)
            ((b >= ${dip%% *})) && { back=$b; break; }
            sleep 1
        done
        echo "$(elapsed "$t_req" "$(now)") free order-10 blocks ${back:-not back (last $b)}, before the copy ${dip%% *}" >>"$run/timeline.log"
    fi
    local size=0
    [[ -f $mig ]] && size=$(stat -c %s "$mig")
    [[ ${KEEP_FILES:-0} == 1 ]] || rm -f "$mig"
    end_run
    [[ $st == done ]] || { say "run $n: copy $st: $ans"; return 1; }
    printf '| %s | daemon (vhost-user) | %s | %s | %s | %s | %s | %s (%s) | %s passes | %s (%s hints) | %.0f | %.0f (paused %s) |\n' \
        "$n" "$hints" "$cmp_mem_mb" "$holds" "$(mib "$(jget "$ans" bytes)")" "$(mib "$size")" \
        "$(jget "$ans" pages_sent)" "$(jget "$ans" zero_pages)" "$(jget "$ans" iterations)" \
        "$((${dip%% *} - ${dip##* }))" "$(jget "$ans" hints_received)" \
        "$(jget "$ans" total_ms)" "$(jget "$ans" downtime_ms)" "$paused"
}

phase_compare() {
    [[ -x $qemu_bin ]] || die "no $qemu_bin: run '$0 build' first"
    [[ -f $kernel && -f $initrd ]] || die "no guest: run '$0 guest' first"
    need_packages seabios qemu-system-data
    cmp_mem_mb=${COMPARE_MEM_MB:-2048}
    cmp_dirty_mb=${COMPARE_DIRTY_MB:-1600}
    cmp_fill=${COMPARE_FILL:-ones}
    [[ $cmp_fill == ones || $cmp_fill == zero ]] || die "COMPARE_FILL is ones or zero"
    qemu_max_bw=${QEMU_MAX_BW:-}
    read -r -a daemon_args <<<"${DAEMON_ARGS---no-reporting}"
    daemon_max_iter=${DAEMON_MAX_ITER:-}
    daemon_hint_wait_ms=${DAEMON_HINT_WAIT_MS:-}
    run_timeout_s=${RUN_TIMEOUT_S:-600}
    local runs=${COMPARE_RUNS:-qemu:on qemu:on qemu:on qemu:off qemu:off daemon:on daemon:on daemon:on daemon:off daemon:off}
    if [[ $runs == *daemon:* ]]; then
        [[ -x $daemon ]] || die "no $daemon: cargo build --release -p vhost-user-balloon"
    fi
    cmp_dir=${COMPARE_DIR:-}
    if [[ -z $cmp_dir ]]; then
        cmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/vub-compare.XXXXXX")
    else
        mkdir -p "$cmp_dir"
    fi
    local results=$cmp_dir/results.md spec n=0 rows=()
    say "compare: ${cmp_mem_mb} MiB guests filling (fill=$cmp_fill) and freeing ${cmp_dirty_mb} MiB; runs: $runs"
    say "compare: logs, files and results.md in $cmp_dir"
    local head='| run | runner | hints | guest MiB | holds MiB | sent MiB | file MiB | pages sent (zero) | passes | order-10 dip | total ms | downtime ms |'
    local sep='| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |'
    for spec in $runs; do
        n=$((n + 1))
        local runner=${spec%%:*} hints=${spec#*:}
        [[ $hints == on || $hints == off ]] || die "run '$spec': hints must be on or off"
        run=$cmp_dir/run-$n-$runner-$hints
        mkdir -p "$run"
        serial=$run/serial.log
        control=$run/control.sock
        qmp_sock=$run/qmp.sock
        [[ $runner == qemu || $runner == daemon ]] || die "run '$spec': the runner is qemu or daemon"
        # A subshell per run (errexit on, not in an || list), which stops its QEMU and
        # daemon however it ends.
        local row="" rc=0
        set +e
        (
            set -e
            trap end_run EXIT
            trap 'exit 130' INT TERM
            "compare_$runner" "$n" "$hints"
        ) >"$run/row"
        rc=$?
        set -e
        ((rc != 130)) || die "interrupted"
        row=$(cat "$run/row")
        [[ -n $row ]] || row="| $n | $runner | $hints | $cmp_mem_mb | failed (exit $rc): see $run | | | | | | | |"
        rows+=("$row")
        ((${#rows[@]} > 1)) || { echo "$head" && echo "$sep"; } >>"$results"
        echo "$row" >>"$results"
        say "$row"
    done
    echo
    echo "$head"
    echo "$sep"
    printf '%s\n' "${rows[@]}"
}

# --- main -------------------------------------------------------------------

(($#)) || set -- all
for phase in "$@"; do
    case $phase in
    build) phase_build ;;
    guest) phase_guest ;;
    run) phase_run ;;
    compare) phase_compare ;;
    all) phase_build && phase_guest && phase_run ;;
    -h | --help) sed -n '5,/^$/s/^# \{0,1\}//p' "$0" && exit 0 ;;
    *) die "unknown phase '$phase' (build, guest, run, compare or all)" ;;
    esac
done
