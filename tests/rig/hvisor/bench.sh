#!/bin/bash
# Benchmark on the real-hvisor rig: our bridge and backends against hvisor-tool's own daemon
# (`hvisor virtio start`). Both boot the same hvisor, zone0 and zone1 (kernel, initramfs, device
# tree, `hvisor zone start` config), with hvisor-tool's module and CLI, and zone1's devices
# reduced to what both daemons serve: blk on an image in zone0's tmpfs, the console, and net on
# zone0's TAP (unless --net-mib 0). Only the zone0 daemon differs. Boots run in interleaved
# pairs (run.sh --test bench); in each, zone1's load program (rigload.c, built here static for
# aarch64) times direct I/O with zone1's own clock, and zone0 reads the CPU time of the daemon
# and its children between phases.
# bench_report.py prints medians [min–max] over the pairs.
#
# usage: bench.sh [--pairs N] [--mib N] [--rand N] [--qd N] [--qd-rand N] [--console-bytes N]
#                 [--net-mib N] [--pings N] [--module M] [--bridge-args "OPTIONS"] [--keep]
#   --pairs          boot pairs, interleaved (default 3)
#   --mib            MiB of the sequential write and read, 1 MiB blocks; the random requests
#                    fall in the same first MiB (default 32)
#   --rand           4 KiB random O_DIRECT reads at queue depth 1, and as many writes
#                    (default 1000)
#   --qd             the deep queue's depth: native AIO from one thread in zone1 (default 32)
#   --qd-rand        4 KiB random O_DIRECT reads at that depth, and as many writes (default 4000)
#   --console-bytes  console transfer, zone1 -> zone0 and then zone0 -> zone1 (default 262144)
#   --net-mib        MiB of TCP each way over zone0's TAP, zone1 -> zone0 then zone0 -> zone1
#                    (default 2); 0 leaves zone1 without net and the table without net rows
#   --pings          pings zone1 -> zone0, 50 ms apart, for the mean round trip (default 100)
#   --module         hvisor-tool commit of hvisor.ko and the CLI (default b17d9dd)
#   --bridge-args    extra options for our bridge, e.g. "--spin-us 0"
#   --versus "OPTS"  A/B of two bridge configurations: the baseline side of each pair is our
#                    bridge with OPTS ("" for its defaults) instead of hvisor-tool's daemon
#   --keep           keep the run directories (serial logs)
# Environment: as run.sh (RIG_NO_CARGO=1 skips the cross-build, RIG_TIMEOUT, RIG_BUILD, ...).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
PAIRS=3
MIB=32
RAND=1000
QD=32
QD_RAND=4000
CONSOLE=262144
NET_MIB=2
PINGS=100
MODULE=b17d9dd
BRIDGE_ARGS=""
VERSUS=""
VERSUS_SET=0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) PAIRS=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --rand) RAND=$2; shift 2 ;;
    --qd) QD=$2; shift 2 ;;
    --qd-rand) QD_RAND=$2; shift 2 ;;
    --console-bytes) CONSOLE=$2; shift 2 ;;
    --net-mib) NET_MIB=$2; shift 2 ;;
    --pings) PINGS=$2; shift 2 ;;
    --module) MODULE=$2; shift 2 ;;
    --bridge-args) BRIDGE_ARGS=$2; shift 2 ;;
    --versus) VERSUS=$2; VERSUS_SET=1; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for n in "$PAIRS" "$MIB" "$RAND" "$QD" "$QD_RAND" "$CONSOLE" "$PINGS"; do
    case "$n" in '' | *[!0-9]* | 0) echo "bench.sh: counts and sizes are positive integers" >&2; exit 2 ;; esac
done
case "$NET_MIB" in '' | *[!0-9]*) echo "bench.sh: --net-mib is an integer (0: no net)" >&2; exit 2 ;; esac
# The image is run.sh's 64 MiB disk.
[ "$MIB" -le 64 ] || { echo "bench.sh: --mib is at most 64" >&2; exit 2; }

mkdir -p "$BUILD/runs"
WORK=$(mktemp -d "$BUILD/runs/bench.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then echo "[bench] run directories kept: $WORK" >&2; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

aarch64-linux-gnu-gcc -static -O2 -Wall -Wextra -Werror -o "$WORK/rigload" "$RIG_DIR/rigload.c"

export RIG_LOAD_BIN=$WORK/rigload RIG_BENCH_MIB=$MIB RIG_BENCH_RAND=$RAND RIG_BENCH_QD=$QD \
    RIG_BENCH_QD_RAND=$QD_RAND RIG_BENCH_CONSOLE=$CONSOLE RIG_BENCH_NET_MIB=$NET_MIB RIG_BENCH_PINGS=$PINGS
run() { # run NAME DAEMON [ENV...]
    local name=$1 daemon=$2
    shift 2
    echo "[bench] $(date -u +%H:%M:%S) boot $name: run.sh --module $MODULE --daemon $daemon --test bench" >&2
    if ! env "$@" RIG_RUN_DIR="$WORK/$name" "$RIG_DIR/run.sh" --module "$MODULE" --daemon "$daemon" \
        --test bench --keep > "$WORK/$name.out" 2>&1; then
        cat "$WORK/$name.out" >&2
        echo "[bench] FAILED: the $name boot" >&2
        exit 1
    fi
}
# Interleaved, so that load from elsewhere on the machine hits both sides alike. Only the first
# boot may run cargo (unless RIG_NO_CARGO=1 is set already).
for r in $(seq 1 "$PAIRS"); do
    if [ "$r" = 1 ]; then
        run "ours-$r" ours RIG_BRIDGE_ARGS="$BRIDGE_ARGS"
    else
        run "ours-$r" ours RIG_BRIDGE_ARGS="$BRIDGE_ARGS" RIG_NO_CARGO=1
    fi
    if [ "$VERSUS_SET" = 1 ]; then
        run "tool-$r" ours RIG_BRIDGE_ARGS="$VERSUS" RIG_NO_CARGO=1
    else
        run "tool-$r" hvisor-tool
    fi
done
versus=()
[ "$VERSUS_SET" = 1 ] && versus=("--versus=$VERSUS")
python3 "$RIG_DIR/bench_report.py" --work "$WORK" --pairs "$PAIRS" --mib "$MIB" --rand "$RAND" \
    --qd "$QD" --qd-rand "$QD_RAND" --console-bytes "$CONSOLE" --net-mib "$NET_MIB" --pings "$PINGS" \
    --module "$MODULE" "--bridge-args=$BRIDGE_ARGS" "${versus[@]}"
