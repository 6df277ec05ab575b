#!/usr/bin/env bash
# Prepares the x86 QEMU TCG real-guest rig: host packages, a Debian guest kernel as an uncompressed
# PVH vmlinux, and a busybox initramfs whose /init runs the tests named on the kernel command line.
#
# Usage: setup.sh [--uml] [--refresh]
#   --uml      also install user-mode-linux (the second real vhost-user frontend, see uml-blk-smoke.sh)
#   --refresh  ask apt for the current kernel ABI again instead of reusing the cached kernel
#
# Idempotent and non-interactive; needs root for apt. Outputs go to $RIG_BUILD_DIR
# (default: build/rig-x86 in the repository).
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

want_uml=false
refresh=false
for arg in "$@"; do
    case $arg in
    --uml) want_uml=true ;;
    --refresh) refresh=true ;;
    *) rig_die "unknown argument: $arg (usage: setup.sh [--uml] [--refresh])" ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $codename ]] || rig_die "cannot read VERSION_CODENAME from /etc/os-release"
apt_updated=false

# apt and dpkg may be locked by another job on the same machine: wait for the lock instead of failing.
apt_retry() {
    local attempt
    for attempt in $(seq 1 6); do
        if "$@" >&2; then return 0; fi
        rig_log "apt command failed (attempt $attempt), retrying in 10 s: $*"
        sleep 10
    done
    rig_die "apt command kept failing: $*"
}
apt_update_once() {
    $apt_updated && return 0
    apt_retry apt-get -q -o DPkg::Lock::Timeout=300 update
    apt_updated=true
}
apt_install() {
    apt_update_once
    apt_retry apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@"
}
installed_version() { dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$1" 2>/dev/null | sed -n 's/^ii *//p' || true; }

# The archive mirror this machine already uses, read from its apt sources at run time.
debian_mirror_uri() {
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$codename" '
        BEGIN { RS = ""; FS = "\n" }
        {
            uri = ""; hit = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); uri = u[1] }
                if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) hit = 1 }
            }
            if (hit && uri != "") { print uri; exit }
        }')
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk -v suite="$codename" '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [[ -n $uri ]] || rig_die "no apt source for suite $codename found"
    printf '%s\n' "$uri"
}

ensure_backports_source() {
    local suite=$codename-backports
    if cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -qE "(^|[[:space:]])$suite([[:space:]]|$)"; then
        return 0
    fi
    local uri
    uri=$(debian_mirror_uri)
    rig_log "adding $suite ($uri) to /etc/apt/sources.list.d/$suite.sources"
    cat >"/etc/apt/sources.list.d/$suite.sources" <<EOF
Types: deb
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=false
}

install_host_packages() {
    local qemu_version missing=()
    qemu_version=$(installed_version qemu-system-x86)
    # Bookworm's own QEMU 7.2 would remove the preinstalled qemu-utils 10 (qemu-storage-daemon):
    # take QEMU from backports there.
    if [[ -z $qemu_version ]] || dpkg --compare-versions "$qemu_version" lt 1:8; then
        if [[ $codename == bookworm ]]; then
            ensure_backports_source
            apt_install -t "$codename-backports" qemu-system-x86 qemu-utils
        else
            apt_install qemu-system-x86 qemu-utils
        fi
    fi
    local pkg
    for pkg in busybox-static fio xz-utils util-linux; do
        [[ -n $(installed_version "$pkg") ]] || missing+=("$pkg")
    done
    if $want_uml && [[ -z $(installed_version user-mode-linux) ]]; then missing+=(user-mode-linux); fi
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# Sets KVER to the current ABI name of Debian's kernel (it changes with security updates); cached.
resolve_guest_kernel() {
    local cached=$RIG_BUILD_DIR/kernel-release
    if [[ -s $cached ]] && ! $refresh; then
        KVER=$(cat "$cached")
        return
    fi
    apt_update_once
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ $pkg =~ ^linux-image-[0-9][A-Za-z0-9.+-]*$ ]] || rig_die "cannot resolve the linux-image-amd64 dependency"
    KVER=${pkg#linux-image-}
    printf '%s\n' "$KVER" >"$cached"
}

# Downloads the kernel .deb and extracts only the image, config and the virtio-related modules.
fetch_guest_kernel() {
    local kver=$1 kroot=$RIG_BUILD_DIR/kernel-$1
    if [[ -f $kroot/.complete ]]; then
        return
    fi
    rm -rf "$kroot" && mkdir -p "$kroot" "$RIG_BUILD_DIR/deb"
    local deb
    deb=$(find "$RIG_BUILD_DIR/deb" -name "linux-image-${kver}_*_amd64.deb" | head -n 1)
    if [[ -z $deb ]]; then
        apt_update_once
        (cd "$RIG_BUILD_DIR/deb" && apt_retry apt-get -q -o APT::Sandbox::User=root download "linux-image-$kver")
        deb=$(find "$RIG_BUILD_DIR/deb" -name "linux-image-${kver}_*_amd64.deb" | head -n 1)
    fi
    [[ -n $deb ]] || rig_die "download of linux-image-$kver failed"
    local m=./lib/modules/$kver
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" --wildcards \
        "./boot/vmlinuz-$kver" "./boot/config-$kver" "$m/modules.builtin" "$m/modules.order" \
        "$m/kernel/drivers/virtio/*" "$m/kernel/drivers/block/virtio_blk.ko*" \
        "$m/kernel/drivers/net/virtio_net.ko*" "$m/kernel/drivers/net/net_failover.ko*" \
        "$m/kernel/net/core/failover.ko*" "$m/kernel/drivers/char/virtio_console.ko*" \
        "$m/kernel/drivers/char/hw_random/virtio-rng.ko*" "$m/kernel/net/vmw_vsock/*" "$m/kernel/fs/fuse/*"
    touch "$kroot/.complete"
}

build_vmlinux() {
    local kver=$1 bzimage=$RIG_BUILD_DIR/kernel-$1/boot/vmlinuz-$1
    if [[ -f $RIG_KERNEL && $RIG_KERNEL -nt $bzimage && $(cat "$RIG_BUILD_DIR/vmlinux.release" 2>/dev/null) == "$kver" ]]; then
        return
    fi
    "$RIG_SRC_DIR/extract-vmlinux.sh" "$bzimage" "$RIG_KERNEL.tmp"
    mv "$RIG_KERNEL.tmp" "$RIG_KERNEL"
    printf '%s\n' "$kver" >"$RIG_BUILD_DIR/vmlinux.release"
}

# Copies a host binary and the shared libraries it loads, at the same paths, into the staging tree.
copy_with_libs() {
    local staging=$1 bin=$2 dest=$3 lib
    install -D -m 755 "$bin" "$staging/$dest"
    for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [[ -e $staging$lib ]] || install -D -m 755 "$(readlink -f "$lib")" "$staging$lib"
    done
}

build_initramfs() {
    local kver=$1 kroot=$RIG_BUILD_DIR/kernel-$1
    local stamp=$RIG_BUILD_DIR/initramfs.inputs
    local inputs
    inputs=$(printf '%s\n' "$kver" "$(md5sum "$RIG_SRC_DIR/init.sh" "$RIG_SRC_DIR/setup.sh" | cut -d' ' -f1)" \
        "$(installed_version fio)" "$(installed_version busybox-static)" "$(installed_version util-linux)")
    if [[ -f $RIG_INITRAMFS && $(cat "$stamp" 2>/dev/null) == "$inputs" ]]; then
        return
    fi
    local st=$RIG_BUILD_DIR/initramfs.d
    rm -rf "$st" && mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,rig/bin,lib/modules}
    install -m 755 /bin/busybox "$st/bin/busybox"
    ln -s busybox "$st/bin/sh"
    install -m 755 "$RIG_SRC_DIR/init.sh" "$st/init"
    # The kernel opens /dev/console before /init runs; without the node the init has no output.
    mknod -m 600 "$st/dev/console" c 5 1
    cp -a "$kroot/lib/modules/$kver" "$st/lib/modules/"
    find "$st/lib/modules" -name '*.ko.xz' -exec xz -d {} +
    find "$st/lib/modules" -name '*.ko.zst' -exec zstd -q --rm -d {} +
    busybox depmod -b "$st" "$kver"
    # Tools busybox lacks: fio for the benchmark and mmap writes, util-linux for BLKZEROOUT and fallocate.
    copy_with_libs "$st" "$(command -v fio)" rig/bin/fio
    copy_with_libs "$st" "$(command -v blkdiscard)" rig/bin/blkdiscard
    copy_with_libs "$st" "$(command -v fallocate)" rig/bin/fallocate
    # Left uncompressed: decompressing 90 MB under TCG costs more than a second per boot.
    (cd "$st" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) >"$RIG_INITRAMFS.tmp"
    mv "$RIG_INITRAMFS.tmp" "$RIG_INITRAMFS"
    rm -rf "$st"
    printf '%s\n' "$inputs" >"$stamp"
}

# Debian's UML 6.1 cannot restore FPU state on hosts with a larger XSAVE area (AVX-512, AMX):
# uml-blk-smoke.sh preloads this shim (see uml-xstate-shim.c).
build_uml_shim() {
    local src=$RIG_SRC_DIR/uml-xstate-shim.c out=$RIG_BUILD_DIR/uml-xstate-shim.so
    [[ -f $out && $out -nt $src ]] && return
    command -v cc >/dev/null || apt_install gcc libc6-dev
    cc -O2 -Wall -shared -fPIC -o "$out.tmp" "$src" -ldl
    mv "$out.tmp" "$out"
}

main() {
    local start
    start=$(rig_now)
    [[ $(id -u) == 0 ]] || rig_die "setup.sh needs root (apt-get, mknod)"
    mkdir -p "$RIG_BUILD_DIR"
    install_host_packages
    resolve_guest_kernel
    fetch_guest_kernel "$KVER"
    build_vmlinux "$KVER"
    build_initramfs "$KVER"
    if $want_uml; then build_uml_shim; fi
    rig_log "ready in $(rig_elapsed "$start") s: kernel $KVER, $RIG_KERNEL, $RIG_INITRAMFS ($(du -h "$RIG_INITRAMFS" | cut -f1))"
    rig_log "$(qemu-system-x86_64 --version | head -n 1); $(qemu-storage-daemon --version | head -n 1)"
}

main
