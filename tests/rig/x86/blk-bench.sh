#!/usr/bin/env bash
# Block benchmark under a real guest: the same QEMU (TCG) command line, the same guest and the same
# tmpfs image, with guest fio against
#   (a) ours     the project's vhost-user-blk ($BLK_BACKEND, default target/release/vhost-user-blk,
#                extra arguments from $BLK_BACKEND_ARGS)
#   ours-uring   the same with --io-engine io_uring (not in the default targets)
#   (b) qsd      qemu-storage-daemon's vhost-user-blk export
#   (c) builtin  QEMU's own virtio-blk-pci on the same file
# and prints IOPS and MiB/s per job, the ratios a/b and a/c (and io_uring/sync for ours-uring), and
# each daemon's peak RSS (VmHWM).
#
# Environment: BENCH_RUNTIME (seconds per job, default 8), BENCH_TARGETS (default "ours qsd builtin"),
# BENCH_QUEUES (default 1; the guest gets as many vCPUs), RIG_KEEP=1 keeps the run directory.
# Under TCG the guest CPU is emulated: compare the columns with each other, not with hardware.
set -uo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

runtime=${BENCH_RUNTIME:-8}
targets=${BENCH_TARGETS:-ours qsd builtin}
queues=${BENCH_QUEUES:-1}
BLK_BACKEND=${BLK_BACKEND:-$REPO_ROOT/target/release/vhost-user-blk}
IMAGE_MIB=256
# NAME:FIO_RW:BLOCK_SIZE:IODEPTH
JOBS=(randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 randwrite-4k-qd32:randwrite:4k:32
    seqread-1m-qd8:read:1m:8 seqwrite-1m-qd8:write:1m:8)

if [[ " $targets " == *" ours"* && ! -x $BLK_BACKEND ]]; then
    rig_die "$BLK_BACKEND not found: cargo build --release -p vhost-user-blk (or BENCH_TARGETS=\"qsd builtin\")"
fi
rig_setup

declare -A IOPS MIBPS RSS
DAEMON_PID=""

cleanup() {
    [[ $BASHPID == "$MAIN_PID" ]] || return 0
    [[ -n $DAEMON_PID ]] && kill -KILL "$DAEMON_PID" 2>/dev/null
    if [[ ${RIG_KEEP:-0} == 1 ]]; then rig_log "run directory kept: $RIG_RUN"; else rm -rf "$RIG_RUN"; fi
}

start_daemon() {
    local target=$1 sock=$RIG_RUN/$1.sock
    case $target in
    ours | ours-uring)
        local engine=sync
        [[ $target == ours-uring ]] && engine=io_uring
        # shellcheck disable=SC2086 # BLK_BACKEND_ARGS is a list of words
        "$BLK_BACKEND" -s "$sock" --image "$IMAGE" --num-queues "$queues" --io-engine "$engine" \
            ${BLK_BACKEND_ARGS:-} >"$RIG_RUN/$target.log" 2>&1 &
        ;;
    qsd)
        qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$IMAGE,cache.direct=off" \
            --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
            >"$RIG_RUN/$target.log" 2>&1 &
        ;;
    esac
    DAEMON_PID=$!
    local tries=0
    until [[ -S $sock ]]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null || ((tries++ > 100)); then
            cat "$RIG_RUN/$target.log" >&2
            rig_die "$target did not create its socket"
        fi
        sleep 0.1
    done
}

stop_daemon() {
    local target=$1
    RSS[$target]=$(awk '/^VmHWM:/ { printf "%d MiB", $2 / 1024 }' "/proc/$DAEMON_PID/status")
    kill -TERM "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=""
}

run_target() {
    local target=$1 device job_list
    case $target in
    ours | ours-uring | qsd)
        start_daemon "$target"
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
    rig_log "$target: ${#JOBS[@]} jobs x ${runtime}+1 s"
    rig_boot "bench-$target" $((${#JOBS[@]} * (runtime + 10) + 120)) "$queues" \
        "rig.tests=bench rig.runtime=$runtime rig.jobs=$job_list" "${device[@]}"
    [[ -n $DAEMON_PID ]] && stop_daemon "$target"
    rig_log "$target: boot + jobs ${RIG_BOOT_SECONDS} s (qemu rc $RIG_BOOT_RC)"

    local spec name rw result dir
    for spec in "${JOBS[@]}"; do
        IFS=: read -r name rw _ <<<"$spec"
        result=$(sed -n "s/^RIG: result bench name=$name //p" "$RIG_BOOT_LOG")
        dir="read"
        [[ $rw == *write ]] && dir="write"
        if [[ -n $result && $(rig_field "$result" rc) == 0 ]]; then
            IOPS[$target,$name]=$(rig_field "$result" ${dir}_iops)
            MIBPS[$target,$name]=$(awk -v k="$(rig_field "$result" ${dir}_kibps)" 'BEGIN { printf "%.1f", k / 1024 }')
        else
            rig_log "$target $name: no result (see $RIG_BOOT_LOG)"
        fi
    done
}

ratio() {
    awk -v a="${IOPS[$1,$3]:-}" -v b="${IOPS[$2,$3]:-}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else printf "-" }'
}

print_table() {
    local t spec name
    printf '\n%-18s' "job"
    for t in $targets; do printf ' %20s' "$t IOPS / MiB/s"; done
    [[ " $targets " == *" ours "* && " $targets " == *" qsd "* ]] && printf ' %8s' "a/b"
    [[ " $targets " == *" ours "* && " $targets " == *" builtin "* ]] && printf ' %8s' "a/c"
    [[ " $targets " == *" ours "* && " $targets " == *" ours-uring "* ]] && printf ' %8s' "uring/a"
    printf '\n'
    for spec in "${JOBS[@]}"; do
        name=${spec%%:*}
        printf '%-18s' "$name"
        for t in $targets; do printf ' %20s' "${IOPS[$t,$name]:--} / ${MIBPS[$t,$name]:--}"; done
        [[ " $targets " == *" ours "* && " $targets " == *" qsd "* ]] && printf ' %8s' "$(ratio ours qsd "$name")"
        [[ " $targets " == *" ours "* && " $targets " == *" builtin "* ]] && printf ' %8s' "$(ratio ours builtin "$name")"
        [[ " $targets " == *" ours "* && " $targets " == *" ours-uring "* ]] && printf ' %8s' "$(ratio ours-uring ours "$name")"
        printf '\n'
    done
    printf '\npeak RSS (VmHWM):'
    for t in $targets; do [[ -n ${RSS[$t]:-} ]] && printf ' %s %s;' "$t" "${RSS[$t]}"; done
    printf '\n(ratios are IOPS ratios; a = ours, b = qsd, c = builtin; %s queue(s), %s s per job, TCG guest)\n' \
        "$queues" "$runtime"
}

main() {
    local start target
    start=$(rig_now)
    MAIN_PID=$BASHPID
    rig_make_run_dir
    trap cleanup EXIT
    IMAGE=$RIG_RUN/bench.img
    head -c $((IMAGE_MIB * MIB)) /dev/urandom >"$IMAGE"
    for target in $targets; do run_target "$target"; done
    print_table
    rig_log "total $(rig_elapsed "$start") s"
    # Every job of every target must have produced a figure.
    local spec missing=0
    for target in $targets; do
        for spec in "${JOBS[@]}"; do [[ -n ${IOPS[$target,${spec%%:*}]:-} ]] || missing=$((missing + 1)); done
    done
    ((missing == 0)) || rig_die "$missing job result(s) missing"
}

MIB=1048576
main
