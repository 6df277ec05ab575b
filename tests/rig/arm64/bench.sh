#!/bin/bash
# Benchmark of the arm64 EL2 trap rig. The same guest (kernel, initramfs, RAM, CPU model, QEMU
# machine, the rig config reduced to its disk) boots in pairs: once with its disk served through
# the stage-2 hole, the bridge page, the bridge and our vhost-user-blk; once with QEMU's own
# virtio-blk-device on the same kind of tmpfs image and no hole. The guest (guest/init, test
# "bench") runs direct-I/O dd and register-read loops, each bracketed by the EL2 stub's
# counters; bench_report.py prints MB/s, the ratio, traps per second and where the time goes.
#
# usage: bench.sh [--rounds N] [--mib N] [--count-4k N] [--reads N] [--bridge-args "OPTIONS"] [--keep]
#   --rounds       boot pairs, interleaved; the tables show medians [min-max] (default 3)
#   --mib          MiB for the 1 MiB-block dd steps (default 64)
#   --count-4k     blocks for the 4 KiB dd steps (default 4096 = 16 MiB)
#   --reads        register reads per loop (default 20000)
#   --bridge-args  extra bridge options for the bridge boots, e.g. "--spin-us 1000"
#   --keep         keep the run directories (guest console, host logs)
# Environment: as run.sh (RIG_NO_CARGO=1 skips cargo, RIG_TIMEOUT, RIG_BUILD, ...).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROUNDS=3
MIB=64
COUNT_4K=4096
READS=20000
BRIDGE_ARGS=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --count-4k) COUNT_4K=$2; shift 2 ;;
    --reads) READS=$2; shift 2 ;;
    --bridge-args) BRIDGE_ARGS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for n in "$ROUNDS" "$MIB" "$COUNT_4K" "$READS"; do
    case "$n" in '' | *[!0-9]* | 0) echo "bench.sh: counts and sizes are positive integers" >&2; exit 2 ;; esac
done

SHM=/dev/shm
[ -d "$SHM" ] && [ -w "$SHM" ] || SHM=${TMPDIR:-/tmp}
WORK=$(mktemp -d "$SHM/hvisor-bench.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then echo "[bench] run directories kept: $WORK" >&2; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

# The rig's config with its disk only: the QEMU boot has no net or console either.
CONFIG=$WORK/virtio_cfg_blk.json
python3 - "$RIG_DIR/virtio_cfg.json" "$CONFIG" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
for zone in cfg["zones"]:
    zone["devices"] = [d for d in zone.get("devices", []) if d.get("type") == "blk"]
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF

export RIG_BENCH_MIB=$MIB RIG_BENCH_4K=$COUNT_4K RIG_MMIO_READS=$READS
run() { # run NAME BACKEND [ENV...]
    local name=$1 backend=$2
    shift 2
    echo "[bench] boot $name: run.sh --test bench --backend $backend --config <blk only>" >&2
    if ! env "$@" RIG_RUN_DIR="$WORK/$name" "$RIG_DIR/run.sh" --test bench --backend "$backend" \
        --config "$CONFIG" --keep > "$WORK/$name.out" 2>&1; then
        cat "$WORK/$name.out" >&2
        echo "[bench] FAILED: the $name boot" >&2
        exit 1
    fi
}
# Interleaved, so that load from elsewhere on the machine hits both sides alike. Only the first
# boot runs cargo (unless RIG_NO_CARGO=1 is set already).
for r in $(seq 1 "$ROUNDS"); do
    if [ "$r" = 1 ]; then
        run bridge-1 ours RIG_BRIDGE_ARGS="$BRIDGE_ARGS"
    else
        run "bridge-$r" ours RIG_BRIDGE_ARGS="$BRIDGE_ARGS" RIG_NO_CARGO=1
    fi
    run "qemu-$r" qemu RIG_NO_CARGO=1
done
python3 "$RIG_DIR/bench_report.py" --work "$WORK" --rounds "$ROUNDS" --mib "$MIB" --count-4k "$COUNT_4K" \
    --reads "$READS" --bridge-args "$BRIDGE_ARGS"
