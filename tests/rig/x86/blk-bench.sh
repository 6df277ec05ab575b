#!/usr/bin/env bash
# Block benchmark under a real guest: the same QEMU (TCG) command line, the same guest and the same
# tmpfs image, with guest fio against
#   (a) ours     the project's vhost-user-blk ($BLK_BACKEND, default target/release/vhost-user-blk,
#                extra arguments from $BLK_BACKEND_ARGS)
#   ours-uring   the same with --io-engine io_uring (not in the default targets)
#   ours-nocoalesce  the same with --coalesce-us 0: no completion-interrupt coalescing, as the
#                backend was before it had any (not in the default targets)
#   (b) qsd      qemu-storage-daemon's vhost-user-blk export
#   (c) builtin  QEMU's own virtio-blk-pci on the same file
# in rounds: every round boots each target once, back to back, so that load from elsewhere on the
# machine hits them alike; the first target of a round moves by one each round (the first boot
# after the random writes shares the machine with their writeback). Each boot prints its IOPS
# and MiB/s per job; at the end bench_report.py prints the IOPS table: median [min–max] over the
# rounds per target, and the median [min–max] of the per-round ratios a/b and a/c (and
# io_uring/sync for ours-uring, ours/ours-nocoalesce), followed by each daemon's peak RSS
# (VmHWM, largest of the rounds).
#
# Usage: blk-bench.sh [--rounds N] [--runtime S]
#   --rounds N   rounds (default 5)
#   --runtime S  seconds per fio job (default $BENCH_RUNTIME, else 8)
# Environment: BENCH_TARGETS (default "ours qsd builtin"), BENCH_QUEUES (default 1; the guest gets
# as many vCPUs), RIG_KEEP=1 keeps the run directory.
# Under TCG the guest CPU is emulated: compare the columns with each other, not with hardware.
# Speed is printed, never asserted; the script fails only when a job produced no figure.
set -uo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

rounds=5
runtime=${BENCH_RUNTIME:-8}
while (($#)); do
    case $1 in
    --rounds) rounds=${2:-} && shift ;;
    --runtime) runtime=${2:-} && shift ;;
    *) rig_die "usage: blk-bench.sh [--rounds N] [--runtime S]" ;;
    esac
    shift
done
[[ $rounds =~ ^[1-9][0-9]*$ && $runtime =~ ^[1-9][0-9]*$ ]] || rig_die "--rounds and --runtime take positive integers"
targets=${BENCH_TARGETS:-ours qsd builtin}
queues=${BENCH_QUEUES:-1}
BLK_BACKEND=${BLK_BACKEND:-$REPO_ROOT/target/release/vhost-user-blk}
IMAGE_MIB=256
# NAME:FIO_RW:BLOCK_SIZE:IODEPTH, as the guest's init.sh takes them
JOBS=(randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 randwrite-4k-qd32:randwrite:4k:32
    seqread-1m-qd8:read:1m:8 seqwrite-1m-qd8:write:1m:8)
# The rows of the table
declare -A ROW=([randread-4k-qd1]="randread 4k QD1" [randread-4k-qd32]="randread 4k QD32"
    [randwrite-4k-qd32]="randwrite 4k QD32" [seqread-1m-qd8]="seqread 1M QD8" [seqwrite-1m-qd8]="seqwrite 1M QD8")

if [[ " $targets " == *" ours"* && ! -x $BLK_BACKEND ]]; then
    rig_die "$BLK_BACKEND not found: cargo build --release -p vhost-user-blk (or BENCH_TARGETS=\"qsd builtin\")"
fi
rig_setup

declare -A RSS
DAEMON_PID=""

cleanup() {
    [[ $BASHPID == "$MAIN_PID" ]] || return 0
    [[ -n $DAEMON_PID ]] && kill -KILL "$DAEMON_PID" 2>/dev/null
    if [[ ${RIG_KEEP:-0} == 1 ]]; then rig_log "run directory kept: $RIG_RUN"; else rm -rf "$RIG_RUN"; fi
}

# start_daemon TARGET ROUND
start_daemon() {
    local target=$1 sock=$RIG_RUN/$1.sock log=$RIG_RUN/$1-r$2.log
    rm -f "$sock"
    case $target in
    ours | ours-uring | ours-nocoalesce)
        local engine=sync extra=()
        [[ $target == ours-uring ]] && engine=io_uring
        [[ $target == ours-nocoalesce ]] && extra=(--coalesce-us 0)
        # shellcheck disable=SC2086 # BLK_BACKEND_ARGS is a list of words
        "$BLK_BACKEND" -s "$sock" --image "$IMAGE" --num-queues "$queues" --io-engine "$engine" \
            ${BLK_BACKEND_ARGS:-} "${extra[@]}" >"$log" 2>&1 &
        ;;
    qsd)
        qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$IMAGE,cache.direct=off" \
            --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
            >"$log" 2>&1 &
        ;;
    esac
    DAEMON_PID=$!
    # No event tells when the socket is listening: poll for it, bounded.
    local tries=0
    until [[ -S $sock ]]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null || ((tries++ > 100)); then
            cat "$log" >&2
            rig_die "$target did not create its socket"
        fi
        sleep 0.1
    done
}

stop_daemon() {
    local target=$1 rss
    rss=$(awk '/^VmHWM:/ { printf "%d", $2 / 1024 }' "/proc/$DAEMON_PID/status")
    ((rss > ${RSS[$target]:-0})) && RSS[$target]=$rss
    kill -TERM "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=""
}

# run_target TARGET ROUND: one boot; appends its IOPS per job to $RESULTS.
run_target() {
    local target=$1 round=$2 device job_list attempt
    case $target in
    ours | ours-uring | ours-nocoalesce | qsd)
        device=(-chardev "socket,id=c0,path=$RIG_RUN/$target.sock" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
        ;;
    builtin)
        device=(-blockdev "driver=file,node-name=d0,filename=$IMAGE,cache.direct=off"
            -device "virtio-blk-pci,drive=d0,num-queues=$queues")
        ;;
    *) rig_die "unknown target $target" ;;
    esac
    job_list=$(
        IFS=,
        echo "${JOBS[*]}"
    )
    for attempt in 1 2; do
        [[ $target == builtin ]] || start_daemon "$target" "$round"
        rig_log "round $round/$rounds, $target: ${#JOBS[@]} jobs x ${runtime}+1 s"
        rig_boot "bench-$target-r$round" $((${#JOBS[@]} * (runtime + 10) + 120)) "$queues" \
            "rig.tests=bench rig.runtime=$runtime rig.jobs=$job_list" "${device[@]}"
        [[ -n $DAEMON_PID ]] && stop_daemon "$target"
        rig_log "round $round/$rounds, $target: boot + jobs ${RIG_BOOT_SECONDS} s (qemu rc $RIG_BOOT_RC)"
        # A baseline that hangs (qemu-storage-daemon did once at QD32 writes under TCG) is shown
        # and booted once more: the table compares against it, it is not under test. A hang of
        # ours is never retried.
        [[ $RIG_BOOT_RC == 124 && ($target == qsd || $target == builtin) && $attempt == 1 ]] || break
        rig_log "round $round/$rounds, $target: the baseline hung; the end of its boot log:"
        tail -n 20 "$RIG_BOOT_LOG" >&2
        rig_log "round $round/$rounds, $target: booting it once more"
    done

    local spec name rw result dir iops mibps
    for spec in "${JOBS[@]}"; do
        IFS=: read -r name rw _ <<<"$spec"
        result=$(sed -n "s/^RIG: result bench name=$name //p" "$RIG_BOOT_LOG")
        dir="read"
        [[ $rw == *write ]] && dir="write"
        if [[ -n $result && $(rig_field "$result" rc) == 0 ]]; then
            iops=$(rig_field "$result" ${dir}_iops)
            mibps=$(awk -v k="$(rig_field "$result" ${dir}_kibps)" 'BEGIN { printf "%.1f", k / 1024 }')
            rig_log "round $round/$rounds, $target: $name $iops IOPS, $mibps MiB/s"
            printf '%s\t%s\t%s\t%s\n' "$round" "$target" "${ROW[$name]}" "$iops" >>"$RESULTS"
        else
            rig_log "round $round/$rounds, $target: $name no result (see $RIG_BOOT_LOG)"
        fi
    done
}

main() {
    local start round target order sides ratios=() t
    start=$(rig_now)
    MAIN_PID=$BASHPID
    rig_make_run_dir
    trap cleanup EXIT
    IMAGE=$RIG_RUN/bench.img
    RESULTS=$RIG_RUN/results.tsv
    : >"$RESULTS"
    head -c $((IMAGE_MIB * MIB)) /dev/urandom >"$IMAGE"
    read -ra order <<<"$targets"
    sides=$(
        IFS=,
        echo "${order[*]}"
    )
    for round in $(seq 1 "$rounds"); do
        for target in "${order[@]}"; do run_target "$target" "$round"; done
        order=("${order[@]:1}" "${order[0]}")
    done
    rig_log "total $(rig_elapsed "$start") s"

    [[ " $targets " == *" ours "* && " $targets " == *" qsd "* ]] && ratios+=(--ratio ours/qsd)
    [[ " $targets " == *" ours "* && " $targets " == *" builtin "* ]] && ratios+=(--ratio ours/builtin)
    [[ " $targets " == *" ours "* && " $targets " == *" ours-uring "* ]] && ratios+=(--ratio ours-uring/ours)
    [[ " $targets " == *" ours "* && " $targets " == *" ours-nocoalesce "* ]] && ratios+=(--ratio ours/ours-nocoalesce)
    echo
    echo "blk-bench.sh: fio --direct=1 --ioengine=libaio, $runtime s per job, $queues queue(s) and vCPU(s), TCG guest"
    echo
    # Every job of every target must have produced a figure: bench_report.py fails otherwise.
    python3 "$RIG_SRC_DIR/bench_report.py" "$RESULTS" --rounds "$rounds" --sides "$sides" \
        --row-title "job (IOPS)" "${ratios[@]}"
    local rc=$?
    printf 'peak RSS (VmHWM, largest of the rounds):'
    for t in $targets; do [[ -n ${RSS[$t]:-} ]] && printf ' %s %s MiB;' "$t" "${RSS[$t]}"; done
    printf '\n'
    return "$rc"
}

MIB=1048576
main
