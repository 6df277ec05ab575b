#!/usr/bin/env bash
# The demo: a simulated hvisor zone, hvisor-vhost-bridge and vhost-user-blk on a fresh
# image; the guest driver writes, flushes, reads back and verifies, and the image file is
# checked from the host.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace --bins --quiet
exec target/release/hvisor-vhost-demo "$@"
