#!/usr/bin/env bash
# The long fuzz run: every fuzz-style property test under the fuzz profile (release speed with
# overflow checks and debug assertions, see Cargo.toml) for at least 10 M executions
# (HVV_FUZZ_ITERS), from a fresh seed unless HVV_FUZZ_SEED is given. Prints each target's
# executions, time and rate, then a summary; exits non-zero if any target failed.
# A failure prints the seed that replays it alone: HVV_FUZZ_SEED=<seed> HVV_FUZZ_ITERS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

iterations="${HVV_FUZZ_ITERS:-10000000}"
seed="${HVV_FUZZ_SEED:-0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')}"
# package, test binary
targets=(
    "hvisor-bridge fuzz_transport"
    "hvisor-bridge fuzz_config"
    "vhost-user-blk fuzz_requests"
)
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

echo "fuzz-long: $iterations executions per target, seed $seed"
cargo build --profile fuzz --locked --tests -p hvisor-bridge -p vhost-user-blk

summary=()
failed=0
for target in "${targets[@]}"; do
    read -r package test <<<"$target"
    echo
    echo "=== $test ($package) ==="
    start=$(date +%s)
    status=0
    HVV_FUZZ_ITERS="$iterations" HVV_FUZZ_SEED="$seed" \
        cargo test --profile fuzz --locked -p "$package" --test "$test" -- --nocapture --test-threads=1 \
        2>&1 | tee "$logs/$test.log" || status=$?
    wall=$(($(date +%s) - start))
    line=$(grep -m1 -o 'fuzz-summary: .*' "$logs/$test.log" | sed 's/^fuzz-summary: //' || true)
    if [ "$status" -ne 0 ]; then
        failed=1
        summary+=("FAILED  $test after ${wall} s: $(grep -m1 'replay it alone' "$logs/$test.log" || echo 'see the log above')")
    else
        summary+=("ok      $line; wall time ${wall} s")
    fi
done

echo
echo "=== fuzz-long summary (seed $seed) ==="
printf '%s\n' "${summary[@]}"
exit "$failed"
