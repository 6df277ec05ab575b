#!/bin/bash
# Installs and prepares everything the arm64 EL2 trap rig needs. Idempotent: a second run only
# checks and rebuilds what changed.
#
#   - host packages from Debian: qemu-system-arm (from <codename>-backports, to match the qemu 10
#     common packages), the aarch64 cross gcc + binutils, dtc, kmod, cpio, iproute2;
#   - a stock Debian arm64 kernel (6.1) and busybox-static, downloaded through a private arm64-only
#     APT configuration (adding a foreign architecture to the host's dpkg is not needed);
#   - the kernel Image, the guest's modules (guest/modules and their dependencies), the guest
#     helper (rigbench) and the guest initramfs.
#
# Environment: RIG_BUILD (default: <repo>/build/rig-arm64), RIG_KERNEL_PKG (default:
# linux-image-arm64, the meta package whose dependency names the kernel ABI).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
BUILD=${RIG_BUILD:-$REPO/build/rig-arm64}
CACHE=$BUILD/cache
KERNEL_META=${RIG_KERNEL_PKG:-linux-image-arm64}
export DEBIAN_FRONTEND=noninteractive

log() { echo "[rig-setup] $*" >&2; }
die() { echo "[rig-setup] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages)"
mkdir -p "$CACHE"

# shellcheck disable=SC2034 # read by lib/apt.sh
RIG_APT_TAG=rig-setup
# shellcheck source-path=SCRIPTDIR source=../lib/apt.sh
. "$RIG_DIR/../lib/apt.sh"

# ---- 1. host packages ----------------------------------------------------------------------
rig_apt_install_tools -b qemu-system-aarch64:qemu-system-arm
rig_apt_install_tools aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu \
    dtc:device-tree-compiler depmod:kmod cpio:cpio xz:xz-utils make:make python3:python3 ip:iproute2

# ---- 2. arm64 kernel + busybox through a private arm64-only APT configuration ----------------
APT64=$CACHE/apt64
DEBS=$CACHE/debs
KSTAMP=$CACHE/kernel.stamp
# The stamp names what was extracted: a changed module list (guest/modules) or kernel meta
# package fetches and extracts again; an unchanged one never touches the network.
WANT_STAMP="$KERNEL_META $(grep -v '^#' "$RIG_DIR/guest/modules" | md5sum | cut -d' ' -f1)"
if [ "$(cat "$KSTAMP" 2>/dev/null)" != "$WANT_STAMP" ]; then
    log "fetching the arm64 kernel and busybox-static (private arm64 APT config in $APT64)"
    export APT_CONFIG
    APT_CONFIG=$(rig_apt_private "$APT64" arm64)
    rig_apt_retry update
    mkdir -p "$DEBS"
    # The meta package's candidate (not backports) names the current ABI, e.g. linux-image-6.1.0-56-arm64.
    KPKG=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind $KERNEL_META"
    log "kernel package: $KPKG"
    rm -f "$DEBS"/*.deb
    (cd "$DEBS" && rig_apt_retry download "$KPKG" busybox-static)
    unset APT_CONFIG

    KROOT=$CACHE/kernel
    rm -rf "$KROOT" "$CACHE/busybox"
    mkdir -p "$KROOT" "$CACHE/busybox"
    KDEB=$(ls "$DEBS/${KPKG}"_*.deb)
    # The package ships no modules.dep (depmod makes it at install): unpack all modules into a
    # scratch tree, run depmod there, and keep only the listed modules and what they need.
    dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$KROOT" --wildcards './boot/vmlinuz-*' './boot/config-*'
    KVER=$(basename "$(ls "$KROOT"/boot/vmlinuz-*)" | sed 's/^vmlinuz-//')
    SCRATCH=$CACHE/modules.tmp
    rm -rf "$SCRATCH"
    mkdir -p "$SCRATCH"
    dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$SCRATCH" --wildcards "./lib/modules/$KVER/*"
    depmod -b "$SCRATCH" "$KVER"
    MODDIR=lib/modules/$KVER
    mkdir -p "$KROOT/$MODDIR"
    cp "$SCRATCH/$MODDIR/modules.dep" "$KROOT/$MODDIR/"
    MODS=$("$RIG_DIR/guest/moddeps.py" "$RIG_DIR/guest/modules" "$KROOT/$MODDIR/modules.dep")
    # modules.dep names .ko files; the package may hold them compressed (.ko.xz).
    for m in $MODS; do
        f=$SCRATCH/$MODDIR/$m
        [ -f "$f" ] || f=$f.xz
        [ -f "$f" ] || die "module $m is not in $KPKG"
        mkdir -p "$(dirname "$KROOT/$MODDIR/$m")"
        cp "$f" "$(dirname "$KROOT/$MODDIR/$m")/"
    done
    rm -rf "$SCRATCH"
    log "extracted $(echo "$MODS" | wc -w) modules: $(echo "$MODS" | xargs -n1 basename | tr '\n' ' ')"
    dpkg-deb --fsys-tarfile "$DEBS"/busybox-static_*.deb | tar -x -C "$CACHE/busybox" './bin/busybox'
    cp "$KROOT/boot/vmlinuz-$KVER" "$CACHE/Image"
    echo "$KVER" > "$CACHE/kver"
    rm -f "$DEBS"/*.deb # extracted; the stamp keeps them from being fetched again
    echo "$WANT_STAMP" > "$KSTAMP"
fi
KVER=$(cat "$CACHE/kver")

# ---- 3. guest benchmark helper + initramfs (rebuilt when their sources change) -----------------
RIGBENCH=$BUILD/rigbench
if [ ! -f "$RIGBENCH" ] || [ "$RIG_DIR/guest/rigbench.c" -nt "$RIGBENCH" ]; then
    log "building the guest benchmark helper"
    aarch64-linux-gnu-gcc -static -nostdlib -nostartfiles -ffreestanding -fno-stack-protector -fno-pic -no-pie \
        -O2 -Wall -Wextra -Werror -Wl,--build-id=none -o "$RIGBENCH" "$RIG_DIR/guest/rigbench.c"
fi
INITRD=$BUILD/initrd.cpio.gz
if [ ! -f "$INITRD" ] || [ "$RIG_DIR/guest/init" -nt "$INITRD" ] || [ "$RIG_DIR/guest/mkinitrd.sh" -nt "$INITRD" ] \
    || [ "$RIG_DIR/guest/moddeps.py" -nt "$INITRD" ] || [ "$KSTAMP" -nt "$INITRD" ] || [ "$RIGBENCH" -nt "$INITRD" ]; then
    log "building the initramfs"
    "$RIG_DIR/guest/mkinitrd.sh" "$CACHE/kernel" "$KVER" "$CACHE/busybox/bin/busybox" "$RIGBENCH" "$INITRD"
fi

log "ready: kernel $KVER, $(qemu-system-aarch64 --version | head -1)"
log "  Image  $CACHE/Image"
log "  initrd $INITRD"
