#!/usr/bin/env bash
# Runs the unit tests of hsm, bridge, the backends and the front door as aarch64 binaries
# under qemu-aarch64 user mode: the code that ships to boards is tested on the board's
# architecture (its atomics, fences, struct layouts and ioctl numbers), not only on x86_64.
#
# Built with the rig's cross toolchain (tests/rig/hvisor/toolchain.sh: Debian's rustc-web and
# the arm64 standard library), static, so qemu-aarch64 needs no aarch64 libraries. Installs
# qemu-user when missing (needs root). The end-to-end tests (tests/) are not run: they spawn
# processes and drive the simulated hypervisor's fault handling, which user mode does not
# emulate faithfully; the few unit tests that need what user mode lacks are skipped below.
# Environment: RIG_BUILD (the toolchain and build caches, default build/rig-hvisor).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
RIG=$REPO/tests/rig/hvisor
export RIG_BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
TARGET=aarch64-unknown-linux-gnu
CRATES="hvisor-hsm hvisor-bridge vhost-user-blk vhost-user-net vhost-user-console vhost-user-frontdoor"

log() { echo "[test-aarch64] $*" >&2; }

# shellcheck disable=SC2034 # read by lib/apt.sh
RIG_APT_TAG=test-aarch64
# shellcheck source-path=SCRIPTDIR source=../tests/rig/lib/apt.sh
. "$REPO/tests/rig/lib/apt.sh"
rig_apt_install_tools qemu-aarch64:qemu-user
"$RIG/toolchain.sh"

pkgs=()
for c in $CRATES; do pkgs+=(-p "$c"); done
# shellcheck source=/dev/null
. "$RIG_BUILD/out/env.sh"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
log "cargo test --target $TARGET (unit tests of $CRATES) under qemu-aarch64"
# What user mode does not emulate as a kernel does, each skipped by name:
skips=(
    # tgkill to a thread that has exited succeeds, where the kernel's ESRCH is what the
    # simulated hypervisor counts as an undelivered wakeup.
    --skip sim::tests::signal_to_a_gone_thread_is_counted_undelivered
    # io_uring_setup is not implemented (ENOSYS); these run each case on both engines.
    --skip file_storage::tests::direct_io_on_a_real_file
    --skip file_storage::tests::io_uring_errors_are_the_transfers_own
    --skip file_storage::tests::more_iovecs_than_iov_max
    --skip file_storage::tests::read_past_end_of_file_fails
    --skip file_storage::tests::vectored_round_trip
    # The guest has no [vvar] mapping, the test's PFN-mapped memory.
    --skip file_storage::tests::direct_write_from_pfnmap_memory_falls_back_to_the_bounce_buffer
    # More SCM_RIGHTS descriptors than the receiver's buffer holds are not reported as a
    # truncated control message.
    --skip message::tests::too_many_descriptors_are_refused
    # seccomp(2) is not implemented for the guest (ENOSYS): no filter can be installed. The
    # backends go on without one, with a warning, as on a kernel without seccomp.
    --skip seccomp::tests::ioctls_outside_the_list_are_refused_and_listed_ones_pass
)
RUSTFLAGS="-C target-feature=+crt-static" cargo test --locked --no-fail-fast --target "$TARGET" \
    --target-dir "$RIG_BUILD/target-aarch64" "${pkgs[@]}" --lib --bins -- "${skips[@]}" "$@"
