# Helpers for zone0's shell in the real-hvisor rig, sourced once by drive.py. Every fact the
# driver checks is printed as one "@Z0 ...@" line (zone1's replies are relayed as "@Z1 ...@").
# Long waits here are bounded by Z1_TIMEOUT (seconds without output from zone1).
Z1_TIMEOUT=${Z1_TIMEOUT:-300}
RIG=/rig
# shellcheck disable=SC2034 # read by the functions below
BRIDGE_LOG=/tmp/daemon.log

z0mark() { echo "@Z0 $*@"; }

# daemon_start ours|hvisor-tool CONFIG: the virtio daemon in the background. Its log goes to
# BRIDGE_LOG and to the console (so the driver sees "serving N devices" or an error as it is
# written); its pid goes to /tmp/daemon.pid and is printed as @Z0 DAEMON-PID@, its exit status
# as @Z0 DAEMON-EXIT@. The driver reads the pid from the file: the marker is written just as the
# daemon's INIT_VIRTIO makes hvisor log on the same UART, and the two interleave byte by byte.
# `wait` in the subshell only: the daemon is stopped with a plain kill of its own pid, never a
# signal to the process group (that would reach the backends it spawned directly).
daemon_start() {
    kind=$1 cfg=$2
    : > "$BRIDGE_LOG"
    rm -f /tmp/bridge.pid /tmp/daemon.pid
    if [ "$kind" = ours ]; then
        # BRIDGE_ARGS: extra options (bench.sh --bridge-args), split into words on purpose.
        # shellcheck disable=SC2086
        set -- --config "$cfg" --runtime-dir /tmp/bridge ${BRIDGE_ARGS:-}
        # The readiness file, where this build of the bridge has it.
        if "$RIG/bin/hvisor-vhost-bridge" --help 2>&1 | grep -q -- --pid-file; then
            set -- "$@" --pid-file /tmp/bridge.pid
            z0mark "DAEMON-PIDFILE yes"
        fi
        (
            RUST_LOG=${RUST_LOG:-info} "$RIG/bin/hvisor-vhost-bridge" "$@" &
            echo $! > /tmp/daemon.pid
            echo "@Z0 DAEMON-PID $!@"
            wait $!
            echo "@Z0 DAEMON-EXIT rc=$?@"
        ) 2>&1 | tee -a "$BRIDGE_LOG" &
    else
        # hvisor-tool's daemon logs to syslog: a syslogd writes it to BRIDGE_LOG.
        pidof syslogd > /dev/null || syslogd -O "$BRIDGE_LOG"
        (
            "$RIG/tool/hvisor" virtio start "$cfg" &
            echo $! > /tmp/daemon.pid
            echo "@Z0 DAEMON-PID $!@"
            wait $!
            echo "@Z0 DAEMON-EXIT rc=$?@"
        ) 2>&1 | tee -a /tmp/daemon.out &
    fi
}

# The console pty of zone1: the link the bridge makes for a console without "socket", or the
# pty hvisor-tool's daemon names in its log.
z1_pty() {
    for l in /tmp/bridge/zone1-console-*.pty; do
        [ -e "$l" ] && { readlink -f "$l"; return 0; }
    done
    sed -n 's/.*char device redirected to \(\/dev\/pts\/[0-9]*\).*/\1/p' "$BRIDGE_LOG" | tail -n1 | grep .
}

# z1_open: fd 4 on zone1's console pty for the rest of the run, raw (the slave's termios live as
# long as one descriptor stays open).
z1_open() {
    pty=$(z1_pty) || { z0mark "no zone1 console pty"; return 1; }
    exec 4<> "$pty"
    stty raw -echo <&4
    z0mark "z1 console $pty"
}

# z1_read END: relay zone1's lines until one holds END (ret 0), or Z1_TIMEOUT seconds pass
# without a line or the pty closes (ret 1). Sets Z1_LAST to the line that held END.
z1_read() {
    # shellcheck disable=SC3045 # busybox ash has read -t
    while IFS= read -r -t "$Z1_TIMEOUT" line <&4; do
        line=$(printf '%s' "$line" | tr -d '\r')
        echo "z1| $line"
        case "$line" in *"$1"*)
            Z1_LAST=$line
            return 0
            ;;
        esac
    done
    z0mark "z1 console closed, or silent for ${Z1_TIMEOUT}s, waiting for $1"
    return 1
}

# z1 COMMAND...: run one command line in zone1; returns its status. Each gets an id, so that a
# late reply to an earlier command is never taken for this one's; the leading newline ends any
# partial line a failed transfer left behind.
Z1_ID=0
z1() {
    Z1_ID=$((Z1_ID + 1))
    printf '\n%s %s\n' "$Z1_ID" "$*" >&4
    z1_read "@Z1 DONE $Z1_ID rc=" || return 1
    rc=${Z1_LAST##*rc=}
    return "${rc%%@*}"
}

# console_from_z1 BYTES: zone1 sends BYTES random bytes after a header with their md5.
console_from_z1() {
    Z1_ID=$((Z1_ID + 1))
    printf '\n%s bulk_tx %s\n' "$Z1_ID" "$1" >&4
    z1_read "@Z1 bulk-tx " || return 1
    timeout "$Z1_TIMEOUT" head -c "$1" <&4 > /tmp/hvc.rx
    z0mark "console-from-z1 got_bytes=$(wc -c < /tmp/hvc.rx) got_md5=$(md5sum < /tmp/hvc.rx | cut -d' ' -f1)"
    rm -f /tmp/hvc.rx
    z1_read "@Z1 DONE $Z1_ID rc="
}

# console_to_z1 BYTES: zone0 sends BYTES random bytes; zone1 prints their md5.
console_to_z1() {
    head -c "$1" /dev/urandom > /tmp/hvc.tx
    z0mark "console-to-z1 sent_bytes=$(wc -c < /tmp/hvc.tx) sent_md5=$(md5sum < /tmp/hvc.tx | cut -d' ' -f1)"
    Z1_ID=$((Z1_ID + 1))
    printf '\n%s bulk_rx %s %s\n' "$Z1_ID" "$1" "$Z1_TIMEOUT" >&4
    z1_read "@Z1 bulk-rx ready" || return 1
    timeout "$Z1_TIMEOUT" cat /tmp/hvc.tx >&4
    rm -f /tmp/hvc.tx
    z1_read "@Z1 DONE $Z1_ID rc="
}

# net_listen PORT_RX PORT_TX MIB: zone0's ends of the TCP transfers (busybox nc runs a script
# on the accepted socket): PORT_RX reads exactly MIB MiB from zone1 into /tmp/net.rx and closes,
# PORT_TX sends MIB MiB of random bytes and closes.
net_listen() {
    head -c "$(($3 << 20))" /dev/urandom > /tmp/net.tx
    z0mark "net-tx-file md5=$(md5sum < /tmp/net.tx | cut -d' ' -f1)"
    printf '#!/bin/sh\nexec head -c %s > /tmp/net.rx\n' "$(($3 << 20))" > /tmp/net-recv.sh
    printf '#!/bin/sh\nexec cat /tmp/net.tx\n' > /tmp/net-send.sh
    chmod 755 /tmp/net-recv.sh /tmp/net-send.sh
    nc -l -p "$1" -e /tmp/net-recv.sh &
    nc -l -p "$2" -e /tmp/net-send.sh &
}

# procs_of NAME...: pid:name of every process running one of these programs.
procs_of() {
    for p in /proc/[0-9]*; do
        exe=$(readlink "$p/exe" 2> /dev/null) || continue
        for n in "$@"; do
            case "$exe" in */"$n") echo "${p#/proc/}:$n" ;; esac
        done
    done
}

# log_wait REGEX SECONDS: hvisor-tool's daemon says it is serving only in its syslog file; wait
# for the line there (the file has no other reader to wake us).
log_wait() {
    n=0
    until grep -q "$1" "$BRIDGE_LOG"; do
        n=$((n + 1))
        [ "$n" -le $(($2 * 10)) ] || { z0mark "log-wait timeout: $1"; return 1; }
        sleep 0.1
    done
    z0mark "log-wait ok: $1"
}

# tree_stat PID: a line for PID and for every process below it (the daemon and the backends it
# spawned), from one read of every /proc/N/stat: its name, its user+system clock ticks and its
# minor page faults, each with its reaped children's.
tree_stat() {
    cat /proc/[0-9]*/stat 2> /dev/null | awk -v root="$1" '
        { ppid[$1] = $4; comm[$1] = substr($2, 2, length($2) - 2)
          ticks[$1] = $14 + $15 + $16 + $17; faults[$1] = $10 + $11 }
        END {
            tree[root] = 1
            do {
                more = 0
                for (p in ppid) if (!(p in tree) && (ppid[p] in tree)) { tree[p] = 1; more = 1 }
            } while (more)
            for (p in tree) if (p in ticks) print comm[p], ticks[p], faults[p]
        }'
}

# cpu_ticks PID: user+system clock ticks of PID's tree, in all and by process name.
cpu_ticks() {
    tree_stat "$1" | awk '{ n++; sum += $2; by = by $1 ":" $2 "," }
        END { printf "@Z0 cpu ticks=%d procs=%d by=%s@\n", sum, n, by }'
}

# minor_faults PID: minor page faults of PID's tree. A daemon that maps and unmaps memory per
# request shows here; on arm64 each unmap is a broadcast TLB invalidation, which under QEMU TCG
# stops every vCPU of the machine, zone1's included.
minor_faults() {
    tree_stat "$1" | awk '{ sum += $3 } END { printf "@Z0 minor faults=%d@\n", sum }'
}

# bridge_status: our bridge's status document (devices and loop counters), on one line.
bridge_status() {
    "$RIG/bin/hvisor-vhost-bridge" status --socket /tmp/bridge/status.sock --json > /tmp/status.json || return 1
    echo "@Z0 status-json $(tr -d '\n' < /tmp/status.json) status-end@"
}

# console_bench BYTES: zone1 sends BYTES random bytes (bench's console row); zone0 reads until
# they all came or none came for a second (a daemon that drops bytes), then their count and md5.
console_bench() {
    Z1_ID=$((Z1_ID + 1))
    printf '\n%s bulk_tx_timed %s\n' "$Z1_ID" "$1" >&4
    z1_read "@Z1 bulk-tx " || return 1
    rigload recv "$1" 1000 60000 <&4 > /tmp/hvc.rx
    z0mark "console-bench got_bytes=$(wc -c < /tmp/hvc.rx) got_md5=$(md5sum < /tmp/hvc.rx | cut -d' ' -f1)"
    rm -f /tmp/hvc.rx
    z1_read "@Z1 DONE $Z1_ID rc="
}

# console_bench_rx BYTES: zone0 sends BYTES random bytes (bench's zone0 -> zone1 row); zone1's
# rigload reads them, times them from its first byte to its last and stops a little after the
# last when some were lost; zone1 then prints their count and md5.
console_bench_rx() {
    head -c "$1" /dev/urandom > /tmp/hvc.tx
    z0mark "console-bench-rx sent_bytes=$(wc -c < /tmp/hvc.tx) sent_md5=$(md5sum < /tmp/hvc.tx | cut -d' ' -f1)"
    Z1_ID=$((Z1_ID + 1))
    printf '\n%s bulk_rx_timed %s\n' "$Z1_ID" "$1" >&4
    z1_read "@Z1 bulk-rx ready" || return 1
    timeout "$Z1_TIMEOUT" cat /tmp/hvc.tx >&4
    rm -f /tmp/hvc.tx
    z1_read "@Z1 DONE $Z1_ID rc="
}
