#!/bin/bash
# Prepares everything the real-hvisor rig boots: hvisor 6a3fb78 (board qemu-gicv3) built from the
# pinned source kit, TF-A + U-Boot, Debian's arm64 6.1 kernel and modules, busybox, hvisor-tool's
# kernel module and CLI at both pinned commits (built against that kernel's headers), and the
# project's own binaries cross-built for aarch64. Also installs the host packages the rig needs.
#
# Idempotent, cached and non-interactive: a second run only checks, and rebuilds what changed
# (the project's binaries are rebuilt incrementally every run). Runs as root (APT).
#
# Environment:
#   RIG_BUILD        build directory (default <repo>/build/rig-hvisor); outputs in $RIG_BUILD/out
#   HVISOR_KIT       the source kit (default <repo>/../shared/hvisor-kit); without a kit the
#                    same commits are cloned from GitHub
#   RIG_KERNEL_PKG   kernel meta package naming the ABI (default linux-image-arm64)
#   RIG_REFRESH=1    ask APT for the current kernel and rustc-web versions again
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
export RIG_BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
BUILD=$RIG_BUILD
OUT=$BUILD/out
CACHE=$BUILD/cache
SRC=$BUILD/src
LOGS=$BUILD/logs
KIT=${HVISOR_KIT:-$REPO/../shared/hvisor-kit}
KERNEL_META=${RIG_KERNEL_PKG:-linux-image-arm64}
HVISOR_REV=6a3fb78
BITMAP_REV=03bd9909
TOOL_REVS="7e55b1b b17d9dd"
BOARD_DIR=platform/aarch64/qemu-gicv3
# Modules zone0 and zone1 load from their initramfs (their dependencies are added), as plain .ko.
MODULES="virtio_mmio virtio_blk virtio_console virtio_net failover net_failover tun"
# shellcheck disable=SC2034 # read by lib/apt.sh
RIG_APT_TAG=hvisor-setup
# shellcheck source-path=SCRIPTDIR source=../lib/apt.sh
. "$RIG_DIR/../lib/apt.sh"

T0=$(date +%s)
log() { echo "[hvisor-setup] $*" >&2; }
die() {
    echo "[hvisor-setup] error: $*" >&2
    exit 1
}
# Runs a long command with its output in $LOGS/<name>.log; on failure shows the tail and stops.
run_logged() {
    local name=$1
    shift
    if ! "$@" >"$LOGS/$name.log" 2>&1; then
        tail -n 40 "$LOGS/$name.log" >&2
        die "$name failed (full log: $LOGS/$name.log)"
    fi
}
# Copies into out/ through a temporary name, so a rig booting meanwhile never reads half a file.
install_out() {
    mkdir -p "$(dirname "$2")"
    cp -f "$1" "$2.tmp"
    mv -f "$2.tmp" "$2"
}
sha() { sha256sum "$1" | cut -c1-16; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages)"
mkdir -p "$OUT" "$CACHE" "$SRC" "$LOGS"
# One setup at a time per build directory.
exec 9>"$BUILD/.setup.lock"
if ! flock -n 9; then
    log "another setup.sh is running on $BUILD: waiting for it"
    flock 9
fi

# ---- 1. host packages ---------------------------------------------------------------------------
# qemu 10 from backports: bookworm's 7.2 lacks what the rig relies on (e.g. smmuv3 stage 2).
rig_apt_install_tools -b qemu-system-aarch64:qemu-system-arm qemu-aarch64:qemu-user
rig_apt_install_tools mkimage:u-boot-tools dtc:device-tree-compiler aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
    /usr/aarch64-linux-gnu/lib/crti.o:libc6-dev-arm64-cross cpio:cpio python3:python3 make:make gcc:gcc \
    xz:xz-utils file:file bc:bc patch:patch modinfo:kmod
# The shared libraries the unpacked Rust toolchain loads are installed by toolchain.sh.
log "host packages ok ($(qemu-system-aarch64 --version | head -1))"

# ---- 2. the source kit --------------------------------------------------------------------------
if [ -f "$KIT/SHA256SUMS" ]; then
    (cd "$KIT" && sha256sum --quiet -c SHA256SUMS >&2) || die "$KIT: SHA256SUMS does not match"
    log "kit verified: $KIT"
else
    # No kit (a machine with GitHub access): make the same tarballs from clones of the same commits.
    KIT=$CACHE/kit
    if [ ! -f "$KIT/done" ]; then
        log "no kit at ${HVISOR_KIT:-$REPO/../shared/hvisor-kit}: cloning the pinned commits from GitHub"
        rm -rf "$KIT" && mkdir -p "$KIT/git"
        clone() { # repo rev name [submodules]
            git clone -q "https://github.com/$1" "$KIT/git/$3" && git -C "$KIT/git/$3" checkout -q "$2" &&
                if [ -n "${4:-}" ]; then git -C "$KIT/git/$3" submodule -q update --init; fi &&
                tar -C "$KIT/git" --exclude=.git -czf "$KIT/$3.tar.gz" "$3"
        }
        clone syswonder/hvisor "$HVISOR_REV" "hvisor-$HVISOR_REV" || die "cannot clone hvisor"
        clone rcore-os/bitmap-allocator "$BITMAP_REV" "bitmap-allocator-$BITMAP_REV" || die "cannot clone bitmap-allocator"
        for c in $TOOL_REVS; do
            clone syswonder/hvisor-tool "$c" "hvisor-tool-$c" sub || die "cannot clone hvisor-tool"
        done
        rm -rf "$KIT/git"
        touch "$KIT/done"
    fi
fi

# Extracts a kit tarball into $SRC/<name> when the tarball (or the patch applied to it) changed.
# Returns 0 when it (re-)extracted.
extract() {
    local name=$1 patch=${2:-} want
    want="$(sha "$KIT/$name.tar.gz")${patch:+ $(sha "$patch")}"
    if [ -d "$SRC/$name" ] && [ "$(cat "$SRC/$name.stamp" 2>/dev/null)" = "$want" ]; then return 1; fi
    log "extracting $name${patch:+ and applying $(basename "$patch")}"
    rm -rf "${SRC:?}/$name" "$SRC/$name.stamp"
    tar -xzf "$KIT/$name.tar.gz" -C "$SRC"
    [ -d "$SRC/$name" ] || die "$name.tar.gz does not hold $name/"
    if [ -n "$patch" ]; then
        (cd "$SRC/$name" && patch -s -p1 <"$patch") || die "$(basename "$patch") does not apply"
    fi
    echo "$want" >"$SRC/$name.stamp"
}

# ---- 3. Debian arm64 kernel, its headers, busybox -----------------------------------------------
KSTAMP=$CACHE/kernel.stamp
if [ ! -f "$KSTAMP" ] || [ "${RIG_REFRESH:-0}" = 1 ]; then
    export APT_CONFIG
    APT_CONFIG=$(rig_apt_private "$CACHE/apt" arm64 amd64)
    rig_apt_retry -q update
    KPKG=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind $KERNEL_META"
    KVERSION=$(apt-cache policy "$KPKG" | awk '/Candidate:/ { print $2 }')
    ABI=${KPKG#linux-image-}
    ABI=${ABI%-arm64}
    KBUILD=linux-kbuild-$(echo "$KVERSION" | cut -d. -f1-2)
    log "kernel $KPKG $KVERSION (with its headers and amd64 $KBUILD of the same version)"
    debs=$CACHE/debs-kernel
    rm -rf "$debs" && mkdir -p "$debs"
    (cd "$debs" && rig_apt_retry -q download "$KPKG=$KVERSION" "linux-headers-$ABI-arm64=$KVERSION" \
        "linux-headers-$ABI-common=$KVERSION" "$KBUILD:amd64=$KVERSION" busybox-static)
    unset APT_CONFIG

    # The package has no modules.dep (depmod makes it at install time): unpack it all, follow the
    # wanted modules' `depends` with modinfo, keep those and the Image, drop the rest.
    KROOT=$CACHE/kernel
    rm -rf "$KROOT" "$KROOT.all" && mkdir -p "$KROOT/modules" "$KROOT.all"
    dpkg -x "$(echo "$debs/${KPKG}"_*.deb)" "$KROOT.all"
    KVER=$(basename "$(echo "$KROOT.all"/boot/vmlinuz-*)" | sed 's/^vmlinuz-//')
    cp "$KROOT.all/boot/vmlinuz-$KVER" "$KROOT/Image"
    todo=$MODULES
    while [ -n "${todo// /}" ]; do
        next=""
        for m in $todo; do
            [ -e "$KROOT/modules/$m.ko" ] && continue
            f=$(find "$KROOT.all/lib/modules/$KVER" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) -print -quit)
            if [ -z "$f" ]; then
                grep -qE "/($m|${m//_/-})\.ko" "$KROOT.all/lib/modules/$KVER/modules.builtin" ||
                    die "module $m is neither in $KPKG nor built in"
                continue
            fi
            case $f in
            *.ko.xz) xz -dc "$f" >"$KROOT/modules/$m.ko" ;;
            *.ko) cp "$f" "$KROOT/modules/$m.ko" ;;
            *) die "unexpected module file $f" ;;
            esac
            next="$next $(modinfo -F depends "$KROOT/modules/$m.ko" | tr ',' ' ')"
        done
        todo=$next
    done
    rm -rf "$KROOT.all"

    HROOT=$CACHE/headers
    rm -rf "$HROOT" && mkdir -p "$HROOT"
    for d in "$debs"/linux-headers-*.deb "$debs"/linux-kbuild-*.deb; do dpkg -x "$d" "$HROOT"; done
    KDIR=$HROOT/usr/src/linux-headers-$ABI-arm64
    [ -f "$KDIR/Makefile" ] || die "no $KDIR/Makefile in the headers package"
    # The arm64 headers include the -common tree by absolute path: point them at the extraction.
    sed -i "s#/usr/src/linux-headers-#$HROOT/usr/src/linux-headers-#g" "$KDIR/Makefile"
    rm -rf "$CACHE/busybox" && mkdir -p "$CACHE/busybox"
    dpkg-deb --fsys-tarfile "$debs"/busybox-static_*.deb | tar -x -C "$CACHE/busybox" ./bin/busybox
    rm -rf "$debs"
    printf 'KVER=%s\nKDIR=%s\nKVERSION=%s\n' "$KVER" "$KDIR" "$KVERSION" >"$KSTAMP"
fi
# shellcheck source=/dev/null
. "$KSTAMP"
[ -f "$KDIR/Makefile" ] || die "$KDIR vanished: remove $KSTAMP and run again"

install_out "$CACHE/kernel/Image" "$OUT/Image"
echo "$KVER" >"$OUT/kver"
rm -rf "$OUT/modules.tmp" && cp -r "$CACHE/kernel/modules" "$OUT/modules.tmp"
rm -rf "$OUT/modules" && mv "$OUT/modules.tmp" "$OUT/modules"
install_out "$CACHE/busybox/bin/busybox" "$OUT/busybox"
chmod +x "$OUT/busybox"
log "kernel $KVER ($KVERSION): Image, modules ($(cd "$OUT/modules" && echo *)), busybox"

# ---- 4. the rustc-web toolchain -----------------------------------------------------------------
HAVE_TC=1
if ! "$RIG_DIR/toolchain.sh"; then
    HAVE_TC=0
    log "!!!!!!!! the rustc-web toolchain could not be had: see the errors above !!!!!!!!"
fi

# ---- 5. hvisor ----------------------------------------------------------------------------------
HV=hvisor-$HVISOR_REV
extract "bitmap-allocator-$BITMAP_REV" || true
extract "$HV" "$RIG_DIR/patches/hvisor-$HVISOR_REV-rustc-1.96.patch" || true
install_out "$SRC/$HV/$BOARD_DIR/image/bootloader/u-boot-atf.bin" "$OUT/u-boot-atf.bin"
install_out "$SRC/$HV/$BOARD_DIR/image/dts/zone0.dts" "$OUT/zone0.dts"
if [ "$HAVE_TC" = 1 ]; then
    HV_WANT="$(cat "$SRC/$HV.stamp") $(cat "$BUILD/toolchain/stamp")"
    if [ -f "$OUT/hvisor.bin" ] && [ "$(cat "$OUT/hvisor.bin.stamp" 2>/dev/null)" = "$HV_WANT" ]; then
        log "hvisor.bin up to date"
    else
        log "building hvisor $HVISOR_REV for qemu-gicv3 (about 2 min cold; log: $LOGS/hvisor.log)"
        # TERM: the Makefile colours its summary with tput.
        # shellcheck source=/dev/null
        run_logged hvisor bash -c ". '$OUT/env.sh' && export RUSTC_BOOTSTRAP=1 TERM=dumb &&
            make -C '$SRC/$HV' ARCH=aarch64 BOARD=qemu-gicv3 LOG=info all"
        install_out "$SRC/$HV/target/aarch64-unknown-none/debug/hvisor.bin" "$OUT/hvisor.bin"
        echo "$HV_WANT" >"$OUT/hvisor.bin.stamp"
    fi
elif [ -f "$KIT/hvisor.bin" ]; then
    install_out "$KIT/hvisor.bin" "$OUT/hvisor.bin"
    echo "prebuilt from the kit" >"$OUT/hvisor.bin.stamp"
    log "!!!!!!!! WARNING: out/hvisor.bin is the kit's PREBUILT image, not built from source !!!!!!!!"
else
    die "no toolchain to build hvisor and no prebuilt hvisor.bin in the kit"
fi

# ---- 6. hvisor-tool: kernel module, static CLI, example zone configs ----------------------------
for c in $TOOL_REVS; do
    name=hvisor-tool-$c
    dst=$OUT/hvisor-tool/$c
    want="$(sha "$KIT/$name.tar.gz") $KVERSION"
    if [ -f "$dst/hvisor.ko" ] && [ -f "$dst/hvisor" ] && [ "$(cat "$dst/stamp" 2>/dev/null)" = "$want" ]; then
        log "hvisor-tool $c up to date"
        continue
    fi
    # A fresh tree: kbuild would not notice that the headers changed under the same path.
    rm -f "$SRC/$name.stamp"
    extract "$name"
    log "building hvisor-tool $c: hvisor.ko for $KVER and the static CLI (logs: $LOGS/$name-*.log)"
    # The two commits name the cross compiler differently (see the kit's README).
    run_logged "$name-driver" make -C "$SRC/$name/driver" all ARCH=arm64 KDIR="$KDIR" \
        COMPILE=aarch64-linux-gnu- CROSS_COMPILE=aarch64-linux-gnu-
    run_logged "$name-tools" make -C "$SRC/$name/tools" hvisor ARCH=arm64 LOG=LOG_INFO \
        toolchain=aarch64-linux-gnu CROSS_COMPILE=aarch64-linux-gnu-
    rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
    cp "$SRC/$name/driver/hvisor.ko" "$SRC/$name/tools/hvisor" "$dst.tmp/"
    cp -r "$SRC/$name/examples/qemu-aarch64/with_virtio_blk_console" "$dst.tmp/examples"
    echo "$want" >"$dst.tmp/stamp"
    rm -rf "$dst" && mv "$dst.tmp" "$dst"
done

# ---- 7. the project's binaries ------------------------------------------------------------------
if [ "$HAVE_TC" = 1 ]; then
    "$RIG_DIR/cross-build.sh"
else
    # Stale binaries of an older tree must not pass for this one.
    rm -rf "${OUT:?}/bin" "$OUT/READY"
    die "without the toolchain the project's binaries cannot be built; out/ has everything else, with the kit's PREBUILT hvisor.bin"
fi

# ---- 8. check the outputs -----------------------------------------------------------------------
fail=""
check_file() { # file, then words its `file` description must contain
    local what w f=$1
    what=$(file -b "$f" 2>/dev/null || true)
    shift
    for w in "$@"; do
        [[ $what == *"$w"* ]] || {
            fail="$fail ${f#"$OUT"/}(${what:-missing})"
            return 0
        }
    done
}
check_static() { check_file "$1" "ARM aarch64" "statically linked"; }
for f in hvisor.bin u-boot-atf.bin zone0.dts Image kver busybox env.sh; do
    [ -s "$OUT/$f" ] || fail="$fail $f"
done
check_static "$OUT/busybox"
for c in $TOOL_REVS; do
    check_static "$OUT/hvisor-tool/$c/hvisor"
    check_file "$OUT/hvisor-tool/$c/hvisor.ko" "relocatable, ARM aarch64"
done
for b in hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console; do
    check_static "$OUT/bin/$b"
done
[ -z "$fail" ] || die "missing or wrong outputs in $OUT:$fail"
"$(command -v qemu-aarch64)" "$OUT/bin/hvisor-vhost-bridge" --version >/dev/null ||
    die "$OUT/bin/hvisor-vhost-bridge does not run under qemu-aarch64"
date -u >"$OUT/READY"
log "ready in $(($(date +%s) - T0)) s: outputs in $OUT"
