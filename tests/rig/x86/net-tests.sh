#!/usr/bin/env bash
# Real-guest tests of vhost-user-net: QEMU (TCG) as the vhost-user frontend with
# -netdev vhost-user and virtio-net-pci, a stock Debian kernel and its virtio_net driver in the
# guest, our backend on a TAP in a network namespace this script makes. The control run boots
# the same guest with QEMU's built-in -netdev tap (no vhost) on the same TAP.
#
# Usage: net-tests.sh [--mib N] [--only ours|builtin] [--rounds N]
#   --mib N      MiB sent each way over TCP (default 64)
#   --only X     run one of the two boots
#   --rounds N   boot both N times, back to back in each round (ours first in odd rounds, the
#                control first in even ones), every boot checked as below (default 1; the
#                benchmark in docs/performance.md uses 5)
# $NET_BACKEND: the backend binary (default target/release/vhost-user-net); RIG_KEEP=1 keeps the
# run directory.
#
# Each boot: the guest configures 10.77.0.2/24, pings the host side (10.77.0.1 on the TAP,
# inside the namespace only), sends N MiB to a host `busybox nc` listener (md5 checked on the
# host) and receives N MiB from the host (md5 checked in the guest). Prints PASS/FAIL per check,
# then bench_report.py's table of the throughput (median [min-max] over the rounds, and the
# median [min-max] of the per-round ratios), then the final line "N passed, N failed".
# Throughput is printed, never asserted.
set -uo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mib=64
only=""
rounds=1
while (($#)); do
    case $1 in
    --mib) mib=${2:-} && shift ;;
    --only) only=${2:-} && shift ;;
    --rounds) rounds=${2:-} && shift ;;
    *) rig_die "usage: net-tests.sh [--mib N] [--only ours|builtin] [--rounds N]" ;;
    esac
    shift
done
if ! [[ $mib =~ ^[1-9][0-9]*$ ]] || ((mib > 128)); then rig_die "--mib must be 1..128"; fi
[[ -z $only || $only == ours || $only == builtin ]] || rig_die "--only takes ours or builtin"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || rig_die "--rounds takes a positive integer"
NET_BACKEND=${NET_BACKEND:-$REPO_ROOT/target/release/vhost-user-net}
[[ $only == builtin || -x $NET_BACKEND ]] ||
    rig_die "$NET_BACKEND not found: cargo build --release -p vhost-user-net (or set NET_BACKEND)"
[[ $(id -u) == 0 ]] || rig_die "net-tests.sh needs root (network namespace, TAP)"
command -v ip >/dev/null || rig_die "ip (iproute2) missing"
rig_setup

MIB=1048576
NS=hvv-rig-net-$$
TAP=rigtap0
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.2
GUEST_MAC=52:54:00:48:56:01
TX_PORT=5001

rig_make_run_dir
MAIN_PID=$BASHPID
BACKEND_PID=""
LISTENER_PID=""
SENDER_PID=""
HOLD_FD=""

cleanup() {
    [[ $BASHPID == "$MAIN_PID" ]] || return 0
    local pid
    for pid in $BACKEND_PID $LISTENER_PID $SENDER_PID; do
        kill -KILL "$pid" 2>/dev/null
    done
    ip netns del "$NS" 2>/dev/null
    if [[ ${RIG_KEEP:-0} == 1 || $RIG_FAILED -gt 0 ]]; then
        rig_log "logs kept in $RIG_RUN"
    else
        rm -rf "$RIG_RUN"
    fi
}
trap cleanup EXIT

in_ns() { ip netns exec "$NS" "$@"; }

# The namespace with a persistent TAP whose host side is $HOST_IP/24: both runs attach to it.
make_namespace() {
    ip netns add "$NS" || return 1
    in_ns sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$NS" link set lo up &&
        ip -n "$NS" tuntap add dev "$TAP" mode tap vnet_hdr &&
        ip -n "$NS" addr add "$HOST_IP/24" dev "$TAP" &&
        ip -n "$NS" link set "$TAP" up
}

# QEMU runs inside the namespace for both runs, so that the built-in TAP backend finds the TAP
# and both see the same host: rig_boot calls qemu-system-x86_64 through PATH.
make_qemu_wrapper() {
    local real
    real=$(command -v qemu-system-x86_64)
    mkdir -p "$RIG_RUN/bin"
    cat >"$RIG_RUN/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
exec ip netns exec "$NS" "$real" "\$@"
EOF
    chmod +x "$RIG_RUN/bin/qemu-system-x86_64"
}

# start_backend LOG
start_backend() {
    local sock=$RIG_RUN/net.sock log=$1
    rm -f "$sock"
    # Not through a shell function: $! must be the backend (ip netns exec execs it).
    ip netns exec "$NS" "$NET_BACKEND" -s "$sock" --tap "$TAP" >"$log" 2>&1 &
    BACKEND_PID=$!
    # No event tells when the socket is listening: poll for it, bounded.
    local tries=0
    until [[ -S $sock ]]; do
        if ! kill -0 "$BACKEND_PID" 2>/dev/null || ((tries++ > 100)); then
            rig_log "backend did not create $sock; its log:"
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# SIGTERM, SIGKILL after 10 s; returns the backend's exit status.
stop_backend() {
    [[ -n $BACKEND_PID ]] || return 0
    local rc=0 timer finished=""
    kill -TERM "$BACKEND_PID" 2>/dev/null
    sleep 10 &
    timer=$!
    wait -n -p finished "$BACKEND_PID" "$timer" 2>/dev/null
    if [[ $finished == "$timer" ]]; then
        rig_log "backend ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$BACKEND_PID" 2>/dev/null
    else
        kill "$timer" 2>/dev/null
    fi
    wait "$BACKEND_PID" 2>/dev/null || rc=$?
    wait "$timer" 2>/dev/null
    BACKEND_PID=""
    return "$rc"
}

# The host end of the guest-to-host transfer: busybox nc in the namespace, its stdin a FIFO this
# script holds open (so it ends with the guest's stream, not with its own stdin).
start_listener() {
    local name=$1 hold=$RIG_RUN/hold-$1
    rm -f "$hold" "$RIG_RUN/tx-$name.bin"
    mkfifo "$hold"
    ip netns exec "$NS" busybox nc -l -p "$TX_PORT" <"$hold" >"$RIG_RUN/tx-$name.bin" 2>"$RIG_RUN/listener-$name.log" &
    LISTENER_PID=$!
    exec {HOLD_FD}>"$hold"
}

stop_listener() {
    [[ -n $HOLD_FD ]] && exec {HOLD_FD}>&-
    HOLD_FD=""
    [[ -n $LISTENER_PID ]] && { kill "$LISTENER_PID" 2>/dev/null; wait "$LISTENER_PID" 2>/dev/null; }
    LISTENER_PID=""
}

# The guest listens, then asks for the host-to-guest transfer; the connect is retried until its
# listener is up.
rig_host_action() {
    case $1 in
    netrx)
        (
            local _
            for _ in $(seq 1 100); do
                in_ns busybox nc "$GUEST_IP" 5002 <"$RIG_RUN/rx.bin" 2>/dev/null && exit 0
                sleep 0.2
            done
            exit 1
        ) &
        SENDER_PID=$!
        ;;
    *) rig_log "unknown host action $1" ;;
    esac
}

mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f", b / s / 1048576; else print "0" }'; }

RESULTS=$RIG_RUN/results.tsv
: >"$RESULTS"
ROW_TX="TCP guest → host, MiB/s"
ROW_RX="TCP host → guest, MiB/s"

# run SIDE ROUND NAME -netdev... : one boot with the given netdev, NAME labelling its checks and
# files; checks it and appends its throughput to $RESULTS.
run() {
    local side=$1 round=$2 name=$3 mbps
    shift 3
    start_listener "$name"
    rig_boot "$name" 300 1 "rig.tests=net,nettx,netrx rig.disk=0 rig.modules=virtio_pci,virtio_net \
rig.ip=$GUEST_IP/24 rig.peer=$HOST_IP rig.net_mib=$mib" \
        "$@" -device "virtio-net-pci,netdev=n0,mac=$GUEST_MAC"
    [[ -n $SENDER_PID ]] && { wait "$SENDER_PID" 2>/dev/null; SENDER_PID=""; }
    stop_listener

    if grep -q '^RIG: virtio .* device=0x0001 driver=virtio_net' "$RIG_BOOT_LOG"; then
        rig_pass "$name: guest booted, virtio_net bound" "${RIG_BOOT_SECONDS} s"
    else
        rig_fail "$name: guest booted, virtio_net bound" \
            "no virtio_net device (qemu rc $RIG_BOOT_RC, ${RIG_BOOT_SECONDS} s; see $RIG_BOOT_LOG)"
        return 1
    fi

    local net
    net=$(rig_result net)
    rig_log "$name: guest $(rig_field "$net" iface) mac $(rig_field "$net" mac) features $(rig_field "$net" features)"
    rig_expect "$name: guest configures $GUEST_IP and pings $HOST_IP (replies of 3)" \
        "$(rig_field "$net" received)" 3

    local tx sum bytes seconds host_sum
    tx=$(rig_result nettx)
    sum=$(rig_field "$tx" md5)
    bytes=$(rig_field "$tx" bytes)
    seconds=$(rig_field "$tx" seconds)
    host_sum=$(md5sum <"$RIG_RUN/tx-$name.bin" | cut -d' ' -f1)
    if [[ -z $sum ]]; then
        rig_fail "$name: $mib MiB guest -> host over TCP, md5 on the host" "no result from the guest"
    elif [[ $(rig_field "$tx" rc) != 0 ]]; then
        rig_fail "$name: $mib MiB guest -> host over TCP, md5 on the host" "guest nc rc $(rig_field "$tx" rc): $(rig_field "$tx" err)"
    elif [[ $host_sum != "$sum" ]]; then
        rig_fail "$name: $mib MiB guest -> host over TCP, md5 on the host" \
            "host got $(stat -c %s "$RIG_RUN/tx-$name.bin") bytes, md5 $host_sum; guest sent md5 $sum"
    else
        mbps=$(mbps "$bytes" "$seconds")
        printf '%s\t%s\t%s\t%s\n' "$round" "$side" "$ROW_TX" "$mbps" >>"$RESULTS"
        rig_pass "$name: $mib MiB guest -> host over TCP, md5 on the host" "$sum, $mbps MiB/s"
    fi

    local rx
    rx=$(rig_result netrx)
    if [[ -z $rx ]]; then
        rig_fail "$name: $mib MiB host -> guest over TCP, md5 in the guest" "no result from the guest"
    elif [[ $(rig_field "$rx" md5) != "$RX_MD5" || $(rig_field "$rx" bytes) != $((mib * MIB)) ]]; then
        rig_fail "$name: $mib MiB host -> guest over TCP, md5 in the guest" \
            "guest got $(rig_field "$rx" bytes) bytes, md5 $(rig_field "$rx" md5); host sent $RX_MD5"
    else
        mbps=$(mbps "$(rig_field "$rx" bytes)" "$(rig_field "$rx" seconds)")
        printf '%s\t%s\t%s\t%s\n' "$round" "$side" "$ROW_RX" "$mbps" >>"$RESULTS"
        rig_pass "$name: $mib MiB host -> guest over TCP, md5 in the guest" "$RX_MD5, $mbps MiB/s"
    fi
}

# The label of a boot's checks and files: the side, with the round when there are several.
boot_name() { if ((rounds == 1)); then echo "$1"; else echo "$1-r$2"; fi; }

# ours ROUND
ours() {
    local name log
    name=$(boot_name ours "$1")
    log=$RIG_RUN/backend-$name.log
    rig_log "$name: -netdev vhost-user, our vhost-user-net on $TAP in $NS"
    if ! start_backend "$log"; then
        rig_fail "$name: backend start" "see $log"
        return
    fi
    run ours "$1" "$name" -chardev "socket,id=c1,path=$RIG_RUN/net.sock" -netdev vhost-user,chardev=c1,id=n0
    local rc=0
    stop_backend || rc=$?
    rig_expect "$name: backend exits 0 on SIGTERM" "$rc" 0
    # QEMU's virtio-net enables rings (SET_VRING_ENABLE) before SET_FEATURES; vhost 0.18 and
    # vhost-user-backend 0.24 refuse that and end the session (see docs/net.md).
    if grep -q 'inactive feature' "$log"; then
        rig_fail "$name: vhost-user session with QEMU" \
            "the vhost crates refused SET_VRING_ENABLE before SET_FEATURES and closed the connection"
    else
        rig_pass "$name: vhost-user session with QEMU" "no request refused"
    fi
    rig_log "$name: backend counters: $(sed -n 's/.*Frontend disconnected: //p' "$log" | tail -n 1)"
}

# builtin ROUND
builtin() {
    local name
    name=$(boot_name builtin "$1")
    rig_log "$name (control): QEMU's built-in -netdev tap on $TAP, no vhost"
    run builtin "$1" "$name" -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=off"
}

make_namespace || rig_die "cannot set up the network namespace $NS"
make_qemu_wrapper
PATH=$RIG_RUN/bin:$PATH
head -c $((mib * MIB)) /dev/urandom >"$RIG_RUN/rx.bin"
RX_MD5=$(md5sum <"$RIG_RUN/rx.bin" | cut -d' ' -f1)

sides=()
[[ $only == builtin ]] || sides+=(ours)
[[ $only == ours ]] || sides+=(builtin)
columns=$(
    IFS=,
    echo "${sides[*]}"
)
for round in $(seq 1 "$rounds"); do
    for side in "${sides[@]}"; do "$side" "$round"; done
    # The other side first in the next round: neither always boots first.
    sides=("${sides[@]:1}" "${sides[0]}")
done

echo
echo "net-tests.sh: TCP, $mib MiB each way, TCG guest"
echo
ratio=()
[[ -z $only ]] && ratio=(--ratio ours/builtin)
# Prints the figures it has; a missing one is already a FAIL above.
python3 "$RIG_SRC_DIR/bench_report.py" "$RESULTS" --rounds "$rounds" --sides "$columns" \
    --row-title "TCP, $mib MiB" --decimals 1 "${ratio[@]}"
echo
echo "$RIG_PASSED passed, $RIG_FAILED failed"
((RIG_FAILED == 0))
