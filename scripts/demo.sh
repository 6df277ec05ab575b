#!/usr/bin/env bash
# The demo.
#
# By default: a stock Debian arm64 Linux guest (QEMU TCG) boots under an hvisor-like EL2
# stub; every access to its virtio-mmio windows traps into the bridge page, and
# hvisor-vhost-bridge with our vhost-user backends serves them. It prints the guest's own
# view (its virtio devices, a verified write and read-back, a driver rebind) and powers off.
# The first run installs the rig's Debian packages and guest kernel (about 30 s).
#
# --sim: the simulated-zone demo instead (no QEMU): the simulated hypervisor, the bridge and
# vhost-user-blk on a fresh image, with a verified write, flush and read-back. It is also
# the fallback where the rig's packages cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

sim_demo() {
    cargo build --release --locked --workspace --bins --quiet
    exec target/release/hvisor-vhost-demo "$@"
}

if [ "${1:-}" = "--sim" ]; then
    shift
    sim_demo "$@"
fi
if ! tests/rig/arm64/setup.sh; then
    echo "demo: the arm64 rig could not be set up here; running the simulated-zone demo" >&2
    sim_demo "$@"
fi
exec tests/rig/arm64/run.sh --test all "$@"
