#!/usr/bin/env bash
# The demo.
#
# By default: the real hvisor (qemu-gicv3) boots under QEMU TCG with Debian's arm64 Linux as
# root Linux (zone0), which loads hvisor-tool's hvisor.ko and runs hvisor-vhost-bridge with
# our backends, cross-built for aarch64. `hvisor zone start` then boots a second Linux
# (zone1) whose stock virtio drivers use the disk, console and network the bridge serves.
# It streams zone0's serial console and prints each check zone1 makes (verified O_DIRECT
# writes and read-backs, 1 MiB each way over the console, ping and TCP, a driver rebind, a
# zone shutdown the bridge notices). The first run installs QEMU and the cross toolchain and
# builds hvisor, hvisor.ko and our aarch64 binaries (about 4 to 7 minutes on 2 cores).
#
# --el2: the arm64 EL2-stub rig instead: one Debian arm64 guest under a small EL2 stub that
#        plays hvisor's part, with the bridge on the x86 host (about 30 s to set up).
# --sim: the simulated-zone demo (no QEMU): the simulated hypervisor, the bridge and
#        vhost-user-blk on a fresh image, with a verified write, flush and read-back. It is
#        also the last fallback where neither rig can be set up.
set -euo pipefail
cd "$(dirname "$0")/.."

sim_demo() {
    cargo build --release --locked --workspace --bins --quiet
    exec target/release/hvisor-vhost-demo "$@"
}

el2_demo() {
    if ! tests/rig/arm64/setup.sh; then
        echo "demo: the arm64 EL2 rig could not be set up here; running the simulated-zone demo" >&2
        sim_demo "$@"
    fi
    exec tests/rig/arm64/run.sh --test all "$@"
}

case "${1:-}" in
--sim) shift; sim_demo "$@" ;;
--el2) shift; el2_demo "$@" ;;
esac
if ! tests/rig/hvisor/setup.sh; then
    echo "demo: the real-hvisor rig could not be set up here; running the arm64 EL2 rig" >&2
    el2_demo "$@"
fi
exec tests/rig/hvisor/run.sh --verbose "$@"
