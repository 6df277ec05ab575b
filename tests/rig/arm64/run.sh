#!/bin/bash
# Boots a stock Debian arm64 Linux guest at EL1 under the rig's EL2 stub (QEMU TCG) with its
# virtio-mmio devices served through the bridge page by the (unchanged) hvisor-vhost bridge.
#
# usage: run.sh [--test blk|reset|net|console|bench|probe|all] [--backend ours|qsd|echo|local|qemu]
#               [--smp N] [--config FILE] [--verbose] [--keep]
#   --test     guest tests (comma list allowed); probe = boot and probe only; all = every test
#              the config has a device for (default: blk); bench = the benchmark steps that
#              bench.sh reads. net runs in a network namespace made here (the bridge runs in it
#              and spawns vhost-user-net on its TAP); console talks to vhost-user-console
#              started here with a client socket (peer.py is the host side of both).
#   --backend  ours  = the bridge spawns our vhost-user-blk for "img" devices (default)
#              qsd   = qemu-storage-daemon exports the image as a vhost-user-blk socket
#              echo  = no bridge: the provider answers the ring itself (empty transports)
#              local = no bridge, no ring: the stub answers the windows itself (empty transports)
#              qemu  = baseline: QEMU's own virtio-blk-device on the same image, no stage-2 hole
#   --smp N    guest CPUs (secondaries start through the stub's PSCI CPU_ON interception)
# Environment: BRIDGE, PROVIDER (default: target/release/...), RIG_BUILD (build/cache dir),
#   RIG_RUN_DIR (default: a new directory under /dev/shm), RIG_TIMEOUT (seconds, default 180),
#   RIG_NO_CARGO=1 (do not run cargo build), RIG_BLK_MIB (pattern size, default 32),
#   RIG_DOORBELL=0 (the stub polls for results while idle instead of sleeping on the doorbell),
#   RIG_KICK=0 (no wakeup byte from the stub: the provider's 50 us poll alone wakes the bridge),
#   RIG_FENCED=1 (a StoreLoad barrier before the stub reads need_wakeup; default: none, as in
#   hvisor, so a wakeup can be lost and the guard timeout recovers it), RIG_SYNC_NOTIFY_READS=1
#   (a read at window offset 0x50 waits for the bridge; default: asynchronous, as in hvisor),
#   RIG_PROVIDER_POLL_US (the provider's guard poll with kicks, default 1000), RIG_NET_MIB
#   (default 16), RIG_BRIDGE_ARGS (extra bridge options), CONSOLE_BACKEND (binary),
#   RIG_BENCH_MIB / RIG_BENCH_4K / RIG_MMIO_READS (bench sizes, default 64 / 4096 / 20000).
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
BUILD=${RIG_BUILD:-$REPO/build/rig-arm64}
BRIDGE=${BRIDGE:-$REPO/target/release/hvisor-vhost-bridge}
PROVIDER=${PROVIDER:-$REPO/target/release/hvisor-rig-provider}
CONSOLE_BACKEND=${CONSOLE_BACKEND:-$REPO/target/release/vhost-user-console}
TIMEOUT=${RIG_TIMEOUT:-180}
BLK_MIB=${RIG_BLK_MIB:-32}
BENCH_MIB=${RIG_BENCH_MIB:-64}
NET_MIB=${RIG_NET_MIB:-16}
# The guest's network lives in a network namespace this script makes: these addresses exist
# only there.
NET_GUEST_IP=10.0.2.15/24
NET_HOST_IP=10.0.2.2
NET_PORT=5555

TESTS=blk
BACKEND=ours
SMP=1
CONFIG=$RIG_DIR/virtio_cfg.json
VERBOSE=0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --test) TESTS=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --config) CONFIG=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --verbose) VERBOSE=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$BACKEND" in ours | qsd | echo | local | qemu) ;; *) echo "run.sh: bad --backend $BACKEND" >&2; exit 2 ;; esac
case "$SMP" in [1-8]) ;; *) echo "run.sh: --smp takes 1..8 (the stub's CPU slots)" >&2; exit 2 ;; esac

log() { echo "[rig] $*" >&2; }
fail() { echo "[rig] FAIL: $*" >&2; FAILED=1; }
FAILED=0

"$RIG_DIR/setup.sh"

# ---- host binaries ---------------------------------------------------------------------------
if [ "${RIG_NO_CARGO:-0}" != 1 ]; then
    pkgs=(-p hvisor-vhost-tests --bin hvisor-rig-provider)
    log "cargo build --release ${pkgs[*]}"
    (cd "$REPO" && cargo build --release -q "${pkgs[@]}")
    if [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; then
        (cd "$REPO" && cargo build --release -q -p hvisor-bridge -p vhost-user-blk -p vhost-user-net \
            -p vhost-user-console)
    fi
fi

# ---- run directory: guest RAM on tmpfs, disk image, derived config -----------------------------
# tmpfs keeps the guest RAM file out of the page-cache writeback path.
SHM=/dev/shm
[ -d "$SHM" ] && [ -w "$SHM" ] || SHM=$BUILD
RUN=${RIG_RUN_DIR:-$(mktemp -d "$SHM/hvisor-rig.XXXXXX")}
mkdir -p "$RUN"
PIDS=()
NETNS=""
cleanup() {
    local i pid
    # Newest first: the bridge goes before its backend and before the provider.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # Deleting the namespace also removes the TAP in it.
    [ -z "$NETNS" ] || ip netns del "$NETNS" 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then log "run directory kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

DISK=$RUN/disk.img
DISK_MIB=64
[ "$BENCH_MIB" -gt "$DISK_MIB" ] && DISK_MIB=$BENCH_MIB
[ "$BLK_MIB" -gt "$DISK_MIB" ] && DISK_MIB=$BLK_MIB
truncate -s "${DISK_MIB}M" "$DISK"
# The one config, with this run's backend paths filled in (layout fields are copied as they are).
# The console device gets a socket: run.sh starts its backend with a client socket the test
# attaches to. The net device keeps its "tap": the bridge spawns vhost-user-net on it.
# Prints NET_TAP=<tap> when the config has an enabled net device with one.
NET_TAP=""
eval "$(python3 - "$CONFIG" "$RUN/virtio_cfg.json" "$BACKEND" "$DISK" "$RUN/qsd.sock" "$RUN/console.sock" <<'EOF'
import json, shlex, sys
src, dst, backend, disk, qsd, console = sys.argv[1:]
cfg = json.load(open(src))
for zone in cfg["zones"]:
    for dev in zone.get("devices", []):
        if dev.get("status", "enable") == "disable":
            continue
        if dev.get("type") == "blk":
            dev.pop("img", None)
            dev.pop("socket", None)
            if backend == "qsd":
                dev["socket"] = qsd
            else:
                dev["img"] = disk
        elif dev.get("type") == "console":
            dev["socket"] = console
        elif dev.get("type") == "net" and "tap" in dev:
            print(f"NET_TAP={shlex.quote(dev['tap'])}")
json.dump(cfg, open(dst, "w"), indent=2)
EOF
)"
CFG=$RUN/virtio_cfg.json
eval "$(python3 "$RIG_DIR/gen.py" env "$CFG")"
# The baseline has QEMU's own virtio-blk-device only: the config's devices are not there.
[ "$BACKEND" = qemu ] && RIG_DEVICE_TYPES=blk
has_device() { echo " $RIG_DEVICE_TYPES " | grep -q " $1 "; }

if [ "$TESTS" = all ]; then
    TESTS=""
    for t in $RIG_DEVICE_TYPES; do
        case "$t" in blk) TESTS="$TESTS,blk,reset" ;; *) TESTS="$TESTS,$t" ;; esac
    done
    TESTS=${TESTS#,}
fi
for t in $(echo "$TESTS" | tr ',' ' '); do
    case "$t" in
    blk | reset | probe | bench) ;;
    net | console)
        has_device "$t" || { log "--test $t: the config has no enabled $t device"; exit 2; }
        case "$BACKEND" in ours | qsd) ;; *) log "--test $t needs the bridge (--backend ours or qsd)"; exit 2 ;; esac
        [ "$t" = console ] || [ -n "$NET_TAP" ] || { log "--test net: the net device needs a \"tap\""; exit 2; }
        ;;
    *) log "unknown test $t"; exit 2 ;;
    esac
done
[ "$TESTS" = probe ] && GUEST_TESTS=none || GUEST_TESTS=$TESTS
BOOTARGS="console=ttyAMA0 panic=-1 rig.tests=$GUEST_TESTS rig.blk_mib=$BLK_MIB rig.counter_page=$RIG_COUNTER_PAGE"
BOOTARGS="$BOOTARGS rig.bench_mib=$BENCH_MIB rig.bench_4k=${RIG_BENCH_4K:-4096} rig.mmio_reads=${RIG_MMIO_READS:-20000}"
has_test() { echo ",$TESTS," | grep -q ",$1,"; }
if has_test net; then
    # What the host sends the guest; the guest checks its md5.
    head -c "$((NET_MIB << 20))" /dev/urandom > "$RUN/net.send"
    NET_SEND_MD5=$(md5sum < "$RUN/net.send" | cut -d' ' -f1)
    BOOTARGS="$BOOTARGS rig.ip=$NET_GUEST_IP rig.peer=$NET_HOST_IP rig.port=$NET_PORT rig.net_mib=$NET_MIB"
    BOOTARGS="$BOOTARGS rig.net_rx_md5=$NET_SEND_MD5"
fi

# ---- device tree + stub, both derived from the config ----------------------------------------
GEN=$RUN/gen
mkdir -p "$GEN"
MACHINE="virt,virtualization=on,gic-version=3"
QEMU_COMMON=(-cpu cortex-a57 -smp "$SMP" -m "${RIG_RAM_MIB}M" -display none -monitor none -nic none -no-reboot)
# Two serial ports, so the DT is dumped for the machine that boots: the second one is the
# stub's doorbell (gen.py hides it from the guest).
qemu-system-aarch64 -M "$MACHINE,dumpdtb=$GEN/virt.dtb" "${QEMU_COMMON[@]}" -serial null -serial null > /dev/null
# With a bridge, FINISH_REQ rings the stub through the second UART (the provider writes a byte).
DOORBELL=0
if [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; then DOORBELL=${RIG_DOORBELL:-1}; fi
KERNEL=$BUILD/cache/Image
INITRD=$BUILD/initrd.cpio.gz
KERNEL_SIZE=$(python3 -c 'import struct,sys; print(struct.unpack_from("<Q", open(sys.argv[1],"rb").read(24), 16)[0])' "$KERNEL")
GEN_ARGS=(--virt-dtb "$GEN/virt.dtb" --out "$GEN" --bootargs "$BOOTARGS"
    --initrd-size "$(stat -c %s "$INITRD")" --kernel-size "$KERNEL_SIZE")
[ "$BACKEND" = local ] && GEN_ARGS+=(--local-empty)
[ "$BACKEND" = qemu ] && GEN_ARGS+=(--baseline)
[ "$DOORBELL" = 1 ] && GEN_ARGS+=(--doorbell)
[ "${RIG_KICK:-1}" = 0 ] && GEN_ARGS+=(--no-kick)
[ "${RIG_FENCED:-0}" = 1 ] && GEN_ARGS+=(--fenced)
[ "${RIG_SYNC_NOTIFY_READS:-0}" = 1 ] && GEN_ARGS+=(--sync-notify-reads)
python3 "$RIG_DIR/gen.py" build "$CFG" "${GEN_ARGS[@]}"
make -s -C "$RIG_DIR/stub" O="$GEN"

# ---- host side: provider, backend, bridge -----------------------------------------------------
wait_for() { # wait_for DESCRIPTION SECONDS TEST-COMMAND... ; fails early if a started process died
    local what=$1 secs=$2 n=0 pid
    shift 2
    while ! "$@"; do
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { log "a host process (pid $pid) died while waiting for $what"; return 1; }
        done
        n=$((n + 1))
        [ $n -le $((secs * 20)) ] || { log "timed out waiting for $what"; return 1; }
        sleep 0.05
    done
}

dump_logs() {
    local f
    for f in "$RUN"/*.log; do
        [ -f "$f" ] || continue
        case "$f" in */console.log) continue ;; esac
        echo "----- $(basename "$f") (last 30 lines)" >&2
        tail -n 30 "$f" >&2
    done
}

RAM_FILE=$RUN/guest.ram
if [ "$BACKEND" != local ] && [ "$BACKEND" != qemu ]; then
    PROV_ARGS=(--ram "$RAM_FILE" --config "$CFG" --bridge-gpa "$RIG_BRIDGE_GPA" --ram-base "$RIG_RAM_BASE")
    if [ "$BACKEND" = echo ]; then
        PROV_ARGS+=(--echo-test)
    else
        PROV_ARGS+=(--socket "$RUN/hsm.sock" --ready-file "$RUN/bridge.ready" --doorbell "$RUN/doorbell.sock")
        # With the doorbell, the stub kicks the provider itself when the bridge sleeps (hvisor's
        # wakeup IPI): the watcher's poll is only a guard and can be slow.
        [ "$DOORBELL" = 1 ] && [ "${RIG_KICK:-1}" = 1 ] && PROV_ARGS+=(--poll-us "${RIG_PROVIDER_POLL_US:-1000}")
    fi
    "$PROVIDER" "${PROV_ARGS[@]}" > "$RUN/provider.log" 2>&1 &
    PIDS+=($!)
    wait_for "the guest RAM file" 10 test -f "$RAM_FILE" || { dump_logs; exit 1; }
fi
if [ "$BACKEND" = qsd ]; then
    command -v qemu-storage-daemon > /dev/null || { log "qemu-storage-daemon not found (package qemu-utils)"; exit 1; }
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$DISK,cache.direct=off" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$RUN/qsd.sock,writable=on" \
        > "$RUN/qsd.log" 2>&1 &
    PIDS+=($!)
    wait_for "the qemu-storage-daemon socket" 10 test -S "$RUN/qsd.sock" || { dump_logs; exit 1; }
fi
BRIDGE_NS=()
if { [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; } && has_device console; then
    # Our console backend, with a UNIX client socket for the test's host side.
    [ -x "$CONSOLE_BACKEND" ] || { log "console backend $CONSOLE_BACKEND not found (set CONSOLE_BACKEND=...)"; exit 1; }
    RUST_LOG=${RUST_LOG:-info} "$CONSOLE_BACKEND" --socket-path "$RUN/console.sock" --socket "$RUN/console-client.sock" \
        > "$RUN/console-backend.log" 2>&1 &
    PIDS+=($!)
    wait_for "the console backend socket" 10 test -S "$RUN/console.sock" || { dump_logs; exit 1; }
fi
if { [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; } && [ -n "$NET_TAP" ]; then
    # The TAP lives in a namespace of its own, made here with the host's address; the bridge
    # runs in it, so the vhost-user-net it spawns attaches to that TAP. UNIX sockets are paths
    # and work across namespaces.
    NETNS=hvisor-rig-$$-$RANDOM
    ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" tuntap add dev "$NET_TAP" mode tap
    ip -n "$NETNS" addr add "$NET_HOST_IP/24" dev "$NET_TAP"
    ip -n "$NETNS" link set "$NET_TAP" up
    BRIDGE_NS=(ip netns exec "$NETNS")
    if has_test net; then
        "${BRIDGE_NS[@]}" python3 "$RIG_DIR/peer.py" net --addr "$NET_HOST_IP" --port "$NET_PORT" \
            --expect-bytes "$((NET_MIB << 20))" --send "$RUN/net.send" --result "$RUN/net.result" \
            --timeout "$TIMEOUT" > "$RUN/net-peer.log" 2>&1 &
        PIDS+=($!)
        wait_for "the net peer to listen" 10 grep -q '^listening' "$RUN/net.result" 2>/dev/null || { dump_logs; exit 1; }
    fi
fi
if { [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; } && has_test console; then
    python3 "$RIG_DIR/peer.py" console --socket "$RUN/console-client.sock" --result "$RUN/console.result" \
        --timeout "$TIMEOUT" > "$RUN/console-peer.log" 2>&1 &
    PIDS+=($!)
fi
if [ "$BACKEND" = ours ] || [ "$BACKEND" = qsd ]; then
    [ -x "$BRIDGE" ] || { log "bridge binary $BRIDGE not found (set BRIDGE=...)"; exit 1; }
    wait_for "the provider socket" 10 test -S "$RUN/hsm.sock" || { dump_logs; exit 1; }
    # shellcheck disable=SC2086 # RIG_BRIDGE_ARGS is a list of extra options
    RUST_LOG=${RUST_LOG:-info} "${BRIDGE_NS[@]}" "$BRIDGE" --config "$CFG" --hsm-socket "$RUN/hsm.sock" \
        --runtime-dir "$RUN/bridge" ${RIG_BRIDGE_ARGS:-} > "$RUN/bridge.log" 2>&1 &
    PIDS+=($!)
    wait_for "the bridge to publish its devices" 30 test -f "$RUN/bridge.ready" || { dump_logs; exit 1; }
fi

# ---- the guest ----------------------------------------------------------------------------------
QEMU=(qemu-system-aarch64 -M "$MACHINE,memory-backend=mem" "${QEMU_COMMON[@]}"
    -object "memory-backend-file,id=mem,size=${RIG_RAM_MIB}M,mem-path=$RAM_FILE,share=on"
    -serial stdio
    -kernel "$GEN/stub.elf"
    -device "loader,file=$KERNEL,addr=$RIG_KERNEL_ADDR,force-raw=on"
    -device "loader,file=$INITRD,addr=$RIG_INITRD_ADDR,force-raw=on"
    -device "loader,file=$GEN/rig.dtb,addr=$RIG_DTB_ADDR,force-raw=on")
if [ "$DOORBELL" = 1 ]; then
    wait_for "the doorbell socket" 10 test -S "$RUN/doorbell.sock" || { dump_logs; exit 1; }
    QEMU+=(-chardev "socket,id=doorbell,path=$RUN/doorbell.sock" -serial chardev:doorbell)
else
    QEMU+=(-serial null)
fi
if [ "$BACKEND" = qemu ]; then
    QEMU+=(-global virtio-mmio.force-legacy=false -drive "if=none,file=$DISK,format=raw,id=hd0,cache=writeback"
        -device virtio-blk-device,drive=hd0)
fi
log "booting: tests=$TESTS backend=$BACKEND smp=$SMP ram=${RIG_RAM_MIB}M devices=[$RIG_DEVICE_TYPES] run=$RUN"
children_cpu() { # children_cpu FILE: user+sys seconds of this shell's reaped children so far
    # `times` must run in this shell, not in a command substitution's subshell.
    times > "$1"
    tail -n1 "$1" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); s += p[1] * 60 + p[2] }
        printf "%.2f\n", s }'
}
# CPU seconds (user+sys) of the running host processes and their children: "name seconds" lines.
host_cpu() {
    local pid kid hz
    hz=$(getconf CLK_TCK)
    for pid in "${PIDS[@]}"; do
        for kid in $pid $(pgrep -P "$pid" || true); do
            [ -r "/proc/$kid/stat" ] || continue
            # comm may hold spaces: the fields after the closing parenthesis start at state (3).
            sed 's/^.*) //' "/proc/$kid/stat" | awk -v hz="$hz" -v name="$(cat "/proc/$kid/comm")" \
                '{ printf "%s %.2f\n", name, ($12 + $13) / hz }'
        done
    done
}
children_cpu "$RUN/times0" > "$RUN/cpu0"
T0=$(date +%s.%N)
set +e
if [ "$VERBOSE" = 1 ]; then
    timeout "$TIMEOUT" "${QEMU[@]}" < /dev/null 2>&1 | tee "$RUN/console.log"
    QRC=${PIPESTATUS[0]}
else
    timeout "$TIMEOUT" "${QEMU[@]}" < /dev/null > "$RUN/console.log" 2>&1
    QRC=$?
fi
set -e
T1=$(date +%s.%N)
{
    children_cpu "$RUN/times1" > "$RUN/cpu1"
    echo "qemu $(cat "$RUN/cpu0" "$RUN/cpu1" | tr '\n' ' ' | awk '{printf "%.2f", $2 - $1}')"
    host_cpu
} > "$RUN/cpu.txt"
BOOT_S=$(echo "$T0 $T1" | awk '{printf "%.2f", $2 - $1}')
tr -d '\r' < "$RUN/console.log" > "$RUN/console.txt"

# ---- verdict --------------------------------------------------------------------------------------
marker() { sed -n "s/^RIG: $1//p" "$RUN/console.txt" | head -n1; }
echo "===== guest view ($BOOT_S s boot to power-off, qemu rc $QRC)"
echo "host CPU seconds (user+sys): $(tr '\n' ' ' < "$RUN/cpu.txt" | sed 's/ $//; s/\([0-9]\) /\1, /g')"
grep -a '^\[stub\]' "$RUN/console.txt" || true
grep -a '^RIG: ' "$RUN/console.txt" | grep -v '^RIG: dmesg-virtio' || true
marker 'dmesg-virtio: ' | tr '|' '\n' | sed '/^$/d; s/^/  dmesg: /'
echo "====="

[ "$QRC" = 0 ] || fail "qemu exited with $QRC (124 = timeout after ${TIMEOUT}s)"
grep -q '^RIG: done' "$RUN/console.txt" || fail "the guest did not finish its tests"
grep -q '^\[stub\] guest PSCI SYSTEM_OFF' "$RUN/console.txt" || fail "no stub exit statistics"
grep -q '^\[stub\] FATAL' "$RUN/console.txt" && fail "the stub hit a fatal trap"
STUB_READS=$(sed -n 's/^\[stub\] guest PSCI SYSTEM_OFF:.* reads=\([0-9]*\).*/\1/p' "$RUN/console.txt")
STUB_WRITES=$(sed -n 's/^\[stub\] guest PSCI SYSTEM_OFF:.* writes=\([0-9]*\).*/\1/p' "$RUN/console.txt")
STUB_ASYNC=$(sed -n 's/^\[stub\] guest PSCI SYSTEM_OFF:.* async_notifies=\([0-9]*\).*/\1/p' "$RUN/console.txt")
NDEV=$(echo "$RIG_DEVICE_TYPES" | wc -w)

case "$BACKEND" in
local | echo)
    # Every window must have been probed (magic, version, device id) and skipped as empty.
    [ "${STUB_READS:-0}" -ge $((3 * NDEV)) ] || fail "the stub saw ${STUB_READS:-0} reads, expected >= $((3 * NDEV))"
    grep -q '^RIG: device ' "$RUN/console.txt" && fail "the guest found a virtio device behind an empty window"
    if [ "$BACKEND" = echo ]; then
        ECHOED=$(grep -c 'echo: cpu' "$RUN/provider.log" || true)
        [ "$ECHOED" = "$((STUB_READS + STUB_WRITES))" ] \
            || fail "the provider answered $ECHOED requests, the stub forwarded $((STUB_READS + STUB_WRITES))"
    fi
    ;;
*)
    for t in $(echo "$TESTS" | tr ',' ' '); do
        [ "$t" = probe ] && continue
        grep -q "^RIG: $t PASS" "$RUN/console.txt" || fail "guest test $t did not pass"
    done
    if echo ",$TESTS," | grep -q ',blk,'; then
        WANT=$(marker 'blk written_md5=' | cut -d' ' -f1)
        HOST=$(head -c "$((BLK_MIB * 1024 * 1024))" "$DISK" | md5sum | cut -d' ' -f1)
        echo "host image md5 of the first $BLK_MIB MiB: $HOST (guest wrote $WANT)"
        [ -n "$WANT" ] && [ "$WANT" = "$HOST" ] || fail "the host image does not hold what the guest wrote"
    fi
    if has_test net; then
        # Guest to host: what the peer read must be what the guest sent, all of it.
        GUEST_SENT=$(marker 'net sent ' | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p')
        HOST_GOT=$(sed -n 's/^received bytes=\([0-9]*\) md5=\([0-9a-f]*\)$/\1 \2/p' "$RUN/net.result" 2>/dev/null)
        echo "net: guest sent md5 ${GUEST_SENT:-?}, host received ${HOST_GOT:-nothing} (bytes md5)"
        [ -n "$GUEST_SENT" ] && [ "$HOST_GOT" = "$((NET_MIB << 20)) $GUEST_SENT" ] \
            || fail "the host did not receive what the guest sent over TCP"
        grep -q '^sent bytes=' "$RUN/net.result" 2>/dev/null || fail "the net peer did not send its data to the guest"
    fi
    if has_test console; then
        GUEST_LINE=$(marker 'console sent=' | cut -d' ' -f1)
        HOST_LINE=$(sed -n 's/^line=//p' "$RUN/console.result" 2>/dev/null)
        echo "console: guest wrote ${GUEST_LINE:-?}, host client read ${HOST_LINE:-nothing}"
        [ -n "$GUEST_LINE" ] && [ "$GUEST_LINE" = "$HOST_LINE" ] || fail "the host console client did not get the guest's line"
        # Guest to host through hvc0: what the client read must be what the guest sent, all of it.
        GUEST_BULK=$(marker 'console bulk ' | sed -n 's/^bytes=\([0-9]*\) md5=\([0-9a-f]*\).*/\1 \2/p')
        HOST_BULK=$(sed -n 's/^bulk bytes=\([0-9]*\) md5=\([0-9a-f]*\)$/\1 \2/p' "$RUN/console.result" 2>/dev/null)
        echo "console: guest sent ${GUEST_BULK:-?} (bytes md5), host client received ${HOST_BULK:-nothing}"
        [ -n "$GUEST_BULK" ] && [ "$GUEST_BULK" = "$HOST_BULK" ] && [ "${GUEST_BULK%% *}" -ge $((1 << 20)) ] \
            || fail "the host console client did not receive what the guest sent through hvc0"
    fi
    if [ "$SMP" -gt 1 ] && echo ",$TESTS," | grep -q ',blk,'; then
        # The pinned read on the last CPU must have gone through that CPU's cfg slot.
        LAST_CPU_ACCESSES=$(sed -n 's/^\[stub\] guest PSCI SYSTEM_OFF:.* per_cpu_accesses=\([0-9/]*\).*/\1/p' "$RUN/console.txt" \
            | cut -d/ -f"$SMP")
        [ "${LAST_CPU_ACCESSES:-0}" -gt 0 ] || fail "CPU $((SMP - 1)) made no virtio register access"
    fi
    # hvisor makes a QueueNotify asynchronous only at offset 0x50 of its window: with no device
    # there (a shared window, devices further in), every notify must have waited for its reply.
    if [ "$RIG_ASYNC_NOTIFY_DEVICES" = 0 ]; then
        echo "stub: async_notifies=${STUB_ASYNC:-?} (no device covers a window's offset 0x50)"
        [ "${STUB_ASYNC:-x}" = 0 ] || fail "the stub made ${STUB_ASYNC:-?} notifies asynchronous, expected 0"
    fi
    for t in $(echo "$RIG_DEVICE_TYPES"); do
        case "$t" in blk) id=0x0002 ;; net) id=0x0001 ;; console) id=0x0003 ;; esac
        grep -q "^RIG: device virtio[0-9]* id=$id driver=virtio_" "$RUN/console.txt" \
            || fail "the guest has no bound $t device"
    done
    ;;
esac

if [ "$FAILED" != 0 ]; then
    dump_logs
    echo "----- guest console (last 40 lines)" >&2
    tail -n 40 "$RUN/console.txt" >&2
    echo "arm64 rig: FAILED (tests=$TESTS backend=$BACKEND)"
    exit 1
fi
echo "arm64 rig: PASSED (tests=$TESTS backend=$BACKEND smp=$SMP, ${BOOT_S}s)"
