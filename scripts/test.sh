#!/usr/bin/env bash
# Runs every test of the project. On a fresh machine it first installs what the tests need:
# Debian packages, the third-party vhost-user backends (built once with cargo install and
# cached under build/thirdparty), and the real-guest rigs' kernels and tools (cached under
# build/rig-*). Non-interactive; needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive

step() { printf '\n=== %s ===\n' "$*"; }

step "packages"
missing=()
for pkg in iproute2 qemu-utils; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "style"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-msrv.sh
scripts/check-licenses.py
scripts/check-units.sh

step "build"
cargo build --workspace --bins --locked --release

step "third-party backends"
tests/thirdparty/install.sh

# The fuzz-style property tests run in their own step below, with overflow checks.
fuzz_tests=(transport_survives_arbitrary_register_traffic config_parser_survives_arbitrary_json
    blk_requests_survive_arbitrary_descriptor_chains)
skip_fuzz=()
for test in "${fuzz_tests[@]}"; do skip_fuzz+=(--skip "$test"); done

step "unit, property and end-to-end tests (simulated hypervisor, real processes)"
# The end-to-end tests drive the release binaries: the same ones the demo and the rigs run.
HVV_BIN_DIR="$PWD/target/release" cargo test --workspace --locked --release --no-fail-fast \
    -- "${skip_fuzz[@]}"

step "fuzz-style property tests (release speed, overflow checks and debug assertions on)"
# The fuzz profile (Cargo.toml) makes an arithmetic overflow on hostile input a failure
# instead of a silent wrap.
cargo test --locked --profile fuzz -p hvisor-bridge --test fuzz_transport --test fuzz_config
cargo test --locked --profile fuzz -p vhost-user-blk --test fuzz_requests

step "unit tests as aarch64 binaries (qemu-aarch64 user mode)"
scripts/test-aarch64.sh

for rig in tests/rig/*/ci.sh; do
    step "real-guest rig: $rig"
    "$rig"
done
step "all tests passed"
