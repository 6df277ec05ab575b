#!/bin/bash
# Cross-builds the project's four binaries for aarch64 Linux from the current working tree:
# static (they run in a busybox initramfs), stripped, `--locked --release`, with the rustc-web
# toolchain of toolchain.sh, into a target directory of the rig (never the workspace's target/).
# Incremental: cargo rebuilds only what changed; the stripped copies are refreshed every run.
#
# Output: $CROSS_OUT/{hvisor-vhost-bridge,vhost-user-blk,vhost-user-net,vhost-user-console}.
# Environment: RIG_BUILD (default <repo>/build/rig-hvisor), CROSS_PROFILE (the cargo profile:
# default release, built without debug info; scripts/build-board.sh uses board), CROSS_OUT
# (default $RIG_BUILD/out/bin). Needs toolchain.sh to have run.
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
TARGET=aarch64-unknown-linux-gnu
BINS="hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console"
PROFILE=${CROSS_PROFILE:-release}
OUT=${CROSS_OUT:-$BUILD/out/bin}
LOG=$BUILD/logs/cross-build.log

log() { echo "[hvisor-cross] $*" >&2; }
die() {
    echo "[hvisor-cross] error: $*" >&2
    exit 1
}

[ -f "$BUILD/out/env.sh" ] || die "no $BUILD/out/env.sh: run tests/rig/hvisor/toolchain.sh (or setup.sh) first"
# shellcheck source=/dev/null
. "$BUILD/out/env.sh"
command -v aarch64-linux-gnu-gcc >/dev/null || die "aarch64-linux-gnu-gcc missing (Debian gcc-aarch64-linux-gnu)"
[ -e /usr/aarch64-linux-gnu/lib/crti.o ] || die "aarch64 C runtime missing (Debian libc6-dev-arm64-cross)"

mkdir -p "$BUILD/logs" "$OUT"
log "cargo build --profile $PROFILE --locked --target $TARGET (log: $LOG)"
start=$(date +%s)
# RUSTFLAGS only reaches the target's crates when --target is given, so build scripts and proc
# macros stay dynamic host binaries. No debug info: the binaries are stripped anyway.
if ! (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --locked --profile "$PROFILE" \
    --target "$TARGET" --target-dir "$BUILD/target-aarch64" \
    -p hvisor-bridge -p vhost-user-blk -p vhost-user-net -p vhost-user-console --bins) >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    die "cargo build failed (full log: $LOG)"
fi
for b in $BINS; do
    src=$BUILD/target-aarch64/$TARGET/$PROFILE/$b
    [ -f "$src" ] || die "cargo did not produce $src"
    aarch64-linux-gnu-strip -o "$OUT/$b.tmp" "$src"
    mv "$OUT/$b.tmp" "$OUT/$b"
    what=$(file -b "$OUT/$b")
    case $what in
    *"ARM aarch64"*"statically linked"*) ;;
    *) die "$b is not a static aarch64 executable: $what" ;;
    esac
done
log "built $BINS in $(($(date +%s) - start)) s"
