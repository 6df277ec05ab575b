#!/usr/bin/env bash
# The mutation check of the fuzz-style property tests (docs/reliability.md, "Fuzzing"): breaks
# the transport, blk and config code on purpose, one mutation at a time, and runs the fuzz test
# that should notice. A mutation the test fails on is "caught"; one it passes is "missed".
#
# Usage: scripts/mutation-check.sh [--list] [NAME...]   (default: every mutation)
#   MUTATION_REV        the commit to mutate (default HEAD; uncommitted changes are not used)
#   MUTATION_TARGET_DIR cargo's target directory (default target/mutation, kept between runs)
#   HVV_FUZZ_ITERS etc. are passed to the tests unchanged (default: their CI-sized runs).
#
# Each mutation is applied to a scratch git worktree of MUTATION_REV, never to this checkout,
# and the worktree is removed on exit. A mutation whose text no longer appears in the source is
# reported as "stale" (update it here), one that does not compile as "broken". Exits 0 when every
# mutation meant to be caught was caught and every equivalent one (a change that cannot alter
# behaviour) was missed; 1 otherwise. Not part of scripts/test.sh: it rebuilds the mutated crate
# once per mutation, some minutes each.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
repo=$PWD
rev=$(git rev-parse --verify "${MUTATION_REV:-HEAD}^{commit}")
target_dir=${MUTATION_TARGET_DIR:-$repo/target/mutation}

# name | expect (caught or equivalent) | package | test | file | text | replacement
# The text must occur exactly once in the file. "\n" in text and replacement is a newline.
mutations=(
    # Both guards go: either alone stops a notify before DRIVER_OK (a queue is started only by
    # activation), so removing one is an equivalent change.
    "notify-before-activation|caught|hvisor-bridge|fuzz_transport|bridge/src/transport.rs|let runnable = self.activated && self.status & NEEDS_RESET == 0;\n        let target = u16::try_from(queue).ok().filter(\|&index\| {\n            self.queues\n                .get(usize::from(index))\n                .is_some_and(\|state\| state.started && state.config.ready)|let runnable = self.status & NEEDS_RESET == 0;\n        let target = u16::try_from(queue).ok().filter(\|&index\| {\n            self.queues\n                .get(usize::from(index))\n                .is_some_and(\|state\| state.config.ready)"
    "features-ok-without-version-1|caught|hvisor-bridge|fuzz_transport|bridge/src/transport.rs|            && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0\n|"
    "reset-keeps-activation|caught|hvisor-bridge|fuzz_transport|bridge/src/transport.rs|        self.line_asserted = false;\n        self.activated = false;\n|        self.line_asserted = false;\n"
    "driver-area-unaligned|caught|hvisor-bridge|fuzz_transport|bridge/src/transport.rs|(\"driver area\", config.driver, DRIVER_AREA_ALIGN)|(\"driver area\", config.driver, 1)"
    "read-unmasked|equivalent|hvisor-bridge|fuzz_transport|bridge/src/transport.rs|        value & width_mask(size)\n    }|        value\n    }"
    "status-in-incomplete-chain|caught|vhost-user-blk|fuzz_requests|backends/blk/src/blk.rs|if last.has_next() \|\| !last.is_write_only()|if !last.is_write_only()"
    "capacity-off-by-one-sector|caught|vhost-user-blk|fuzz_requests|backends/blk/src/blk.rs|if end > self.storage.capacity() {|if end > self.storage.capacity() + SECTOR_SIZE {"
    "status-byte-counted-as-data|caught|vhost-user-blk|fuzz_requests|backends/blk/src/blk.rs|let len = if index == last { len - 1 } else { len };|let len = if index == last { len } else { len };"
    "get-id-untruncated|equivalent|vhost-user-blk|fuzz_requests|backends/blk/src/blk.rs|                let len = writable.len.min(SERIAL_LEN);\n                Ok(writable.write_from(&self.serial[..len]))|                Ok(writable.write_from(&self.serial))"
    "device-overlap-unchecked|caught|hvisor-bridge|fuzz_config|bridge/src/config.rs|            if ranges_overlap(a.addr, a.len, b.addr, b.len) {|            if false \&\& ranges_overlap(a.addr, a.len, b.addr, b.len) {"
    "zero-size-window|caught|hvisor-bridge|fuzz_config|bridge/src/config.rs|if window.size == 0 \|\| window.base.checked_add(window.size).is_none() {|if window.base.checked_add(window.size).is_none() {"
)

# Splits a mutation line on unescaped '|' and unescapes '\|' and '\&'.
fields() {
    python3 - "$1" <<'EOF'
import re, sys
parts = re.split(r"(?<!\\)\|", sys.argv[1])
for part in parts:
    print(part.replace("\\|", "|").replace("\\&", "&"))
EOF
}

if [ "${1:-}" = --list ]; then
    for m in "${mutations[@]}"; do
        mapfile -t f < <(fields "$m")
        printf '%-32s %-10s %s --test %s (%s)\n' "${f[0]}" "${f[1]}" "${f[2]}" "${f[3]}" "${f[4]}"
    done
    exit 0
fi
wanted=("$@")

scratch=$(mktemp -d)
logs=$(mktemp -d)
cleanup() {
    git -C "$repo" worktree remove --force "$scratch/tree" >/dev/null 2>&1 || true
    rm -rf "$scratch" "$logs"
}
trap cleanup EXIT
git worktree add --quiet --detach "$scratch/tree" "$rev"
echo "mutation-check: $(git log -1 --format='%h %s' "$rev"), target dir $target_dir"

results=()
bad=0
for m in "${mutations[@]}"; do
    mapfile -t f < <(fields "$m")
    name=${f[0]} expect=${f[1]} package=${f[2]} test=${f[3]} file=${f[4]}
    if [ "${#wanted[@]}" -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$name"; then
        continue
    fi
    echo
    echo "=== $name: $file, $package --test $test ==="
    if ! python3 - "$scratch/tree/$file" "${f[5]}" "${f[6]}" <<'EOF'; then
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
text = open(path, encoding="utf-8").read()
if text.count(old) != 1:
    sys.exit(f"the mutation's text occurs {text.count(old)} times, not once")
open(path, "w", encoding="utf-8").write(text.replace(old, new))
EOF
        results+=("stale    $name (expected $expect)")
        bad=1
        continue
    fi
    git -C "$scratch/tree" --no-pager diff --stat
    log=$logs/$name.log
    run() {
        (cd "$scratch/tree" && CARGO_TARGET_DIR=$target_dir \
            cargo test --profile fuzz --locked -p "$package" --test "$test" "$@")
    }
    if ! run --no-run >"$log" 2>&1; then
        outcome=broken
    elif run -- --test-threads=1 >>"$log" 2>&1; then
        outcome=missed
    else
        outcome=caught
    fi
    git -C "$scratch/tree" checkout --quiet -- "$file"
    how=$(grep -m1 -E "panicked at|made no progress" "$log" | cut -c1-150 || true)
    echo "$outcome${how:+: $how}"
    case "$expect/$outcome" in
    caught/caught | equivalent/missed) verdict=ok ;;
    *) verdict=UNEXPECTED; bad=1 ;;
    esac
    results+=("$(printf '%-10s %-7s %-32s (expected %s)' "$verdict" "$outcome" "$name" "$expect")")
done

echo
echo "=== mutation-check summary ($(git rev-parse --short "$rev")) ==="
printf '%s\n' "${results[@]}"
exit "$bad"
