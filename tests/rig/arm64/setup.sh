#!/bin/bash
# Installs and prepares everything the arm64 EL2 trap rig needs. Idempotent: a second run only
# checks and rebuilds what changed.
#
#   - host packages from Debian: qemu-system-arm (from <codename>-backports, to match the qemu 10
#     common packages), the aarch64 cross gcc + binutils, dtc, kmod, cpio, iproute2;
#   - a stock Debian arm64 kernel (6.1) and busybox-static, downloaded through a private arm64-only
#     APT configuration (adding a foreign architecture to the host's dpkg is not needed);
#   - the kernel Image, the virtio modules, the guest benchmark helper and the guest initramfs.
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

# shellcheck source=/dev/null
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || die "cannot tell the Debian codename from /etc/os-release"

# The Debian mirror this machine already uses, read at run time (deb822 first, then one-line).
mirror_uri() {
    local f uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$CODENAME" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites = " " $i " " }
                }
                if (uris != "" && suites ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v suite="$CODENAME" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "no Debian mirror for $CODENAME found in the APT sources"
    echo "$uri"
}

has_backports() {
    grep -rqs -- "$CODENAME-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

apt_retry() {
    # Another apt/dpkg process may hold the lock for a while.
    local n
    for n in $(seq 1 30); do
        if apt-get -o DPkg::Lock::Timeout=60 "$@"; then return 0; fi
        log "apt-get $1 failed (try $n), retrying in 10 s"
        sleep 10
    done
    die "apt-get $* kept failing"
}

MIRROR=$(mirror_uri)
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        apt_retry update -q
        APT_UPDATED=1
    fi
}

# ---- 1. host packages ----------------------------------------------------------------------
if ! has_backports; then
    log "adding $CODENAME-backports ($MIRROR) to the APT sources"
    cat > "/etc/apt/sources.list.d/$CODENAME-backports.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $CODENAME-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=0
fi

# command -> Debian package that provides it
HOST_TOOLS="qemu-system-aarch64:qemu-system-arm aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu
    aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu dtc:device-tree-compiler depmod:kmod cpio:cpio
    xz:xz-utils make:make python3:python3 ip:iproute2"
missing=""
for t in $HOST_TOOLS; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing="$missing ${t#*:}"
done
if [ -n "$missing" ]; then
    log "installing host packages:$missing"
    apt_update_once
    case " $missing " in
    *" qemu-system-arm "*) apt_retry install -y -q --no-install-recommends -t "$CODENAME-backports" qemu-system-arm ;;
    esac
    others=$(echo "$missing" | tr ' ' '\n' | grep -v '^qemu-system-arm$' | tr '\n' ' ')
    if [ -n "${others// /}" ]; then
        # shellcheck disable=SC2086
        apt_retry install -y -q --no-install-recommends $others
    fi
fi
for t in $HOST_TOOLS; do
    command -v "${t%%:*}" >/dev/null 2>&1 || die "${t%%:*} still missing after installing ${t#*:}"
done

# ---- 2. arm64 kernel + busybox through a private arm64-only APT configuration ----------------
APT64=$CACHE/apt64
DEBS=$CACHE/debs
KSTAMP=$CACHE/kernel.stamp
if [ ! -f "$KSTAMP" ]; then
    log "fetching the arm64 kernel and busybox-static (private arm64 APT config in $APT64)"
    mkdir -p "$APT64/state/lists/partial" "$APT64/cache/archives/partial" "$APT64/sources" "$DEBS"
    touch "$APT64/status"
    cp /etc/apt/sources.list.d/*.sources "$APT64/sources/" 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$APT64/sources/host.list"
    if ! grep -rqs -- "$CODENAME-backports" "$APT64/sources"; then
        printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$MIRROR" "$CODENAME" > "$APT64/sources/backports.sources"
    fi
    cat > "$APT64/apt.conf" <<EOF
Dir::State "$APT64/state";
Dir::State::status "$APT64/status";
Dir::Cache "$APT64/cache";
Dir::Etc::sourceparts "$APT64/sources";
Dir::Etc::sourcelist "/dev/null";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Sandbox::User "root";
EOF
    export APT_CONFIG=$APT64/apt.conf
    apt_retry update -q
    # The meta package's candidate (not backports) names the current ABI, e.g. linux-image-6.1.0-56-arm64.
    KPKG=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind $KERNEL_META"
    log "kernel package: $KPKG"
    rm -f "$DEBS"/*.deb
    (cd "$DEBS" && apt_retry download "$KPKG" busybox-static)
    unset APT_CONFIG

    KROOT=$CACHE/kernel
    rm -rf "$KROOT" "$CACHE/busybox"
    mkdir -p "$KROOT" "$CACHE/busybox"
    dpkg-deb --fsys-tarfile "$DEBS/${KPKG}"_*.deb | tar -x -C "$KROOT" --wildcards \
        './boot/vmlinuz-*' './boot/config-*' '*/virtio_mmio.ko*' '*/virtio_blk.ko*' '*/virtio_net.ko*' \
        '*/net_failover.ko*' '*/failover.ko*' '*/virtio_console.ko*'
    dpkg-deb --fsys-tarfile "$DEBS"/busybox-static_*.deb | tar -x -C "$CACHE/busybox" './bin/busybox'
    KVER=$(basename "$(ls "$KROOT"/boot/vmlinuz-*)" | sed 's/^vmlinuz-//')
    cp "$KROOT/boot/vmlinuz-$KVER" "$CACHE/Image"
    echo "$KVER" > "$CACHE/kver"
    rm -f "$DEBS"/*.deb # extracted; the stamp keeps them from being fetched again
    touch "$KSTAMP"
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
    || [ "$KSTAMP" -nt "$INITRD" ] || [ "$RIGBENCH" -nt "$INITRD" ]; then
    log "building the initramfs"
    "$RIG_DIR/guest/mkinitrd.sh" "$CACHE/kernel" "$KVER" "$CACHE/busybox/bin/busybox" "$RIGBENCH" "$INITRD"
fi

log "ready: kernel $KVER, $(qemu-system-aarch64 --version | head -1)"
log "  Image  $CACHE/Image"
log "  initrd $INITRD"
