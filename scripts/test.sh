#!/usr/bin/env bash
# Runs every test of the project. On a fresh machine it first installs what the tests need
# (Debian packages, guest kernels, third-party backends); reruns reuse the cache in build/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n=== %s ===\n' "$*"; }

step "style"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --bins --locked --release

step "unit and end-to-end tests (simulated hypervisor, real bridge and backend processes)"
# The end-to-end tests drive the release binaries: the same ones the demo and rigs run.
HVV_BIN_DIR="$PWD/target/release" cargo test --workspace --locked --release

for rig in tests/rig/*/ci.sh; do
    [ -x "$rig" ] || continue
    step "real-guest rig: $rig"
    "$rig"
done
step "all tests passed"
