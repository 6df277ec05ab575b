#!/bin/bash
# Boots a stock Debian arm64 Linux guest at EL1 under the rig's EL2 stub (QEMU TCG) with its
# virtio-mmio devices served through the bridge page by the (unchanged) hvisor-vhost bridge.
#
# usage: run.sh [--test blk|reset|net|console|fs|rng|vsock|scsi|bench|probe|all]
#               [--backend ours|qsd|thirdparty|echo|local|qemu] [--smp N] [--config FILE] [--verbose] [--keep]
#   --test     guest tests (comma list allowed); probe = boot and probe only; all = every test
#              the config has a device for (default: blk); bench = the benchmark steps that
#              bench.sh reads. net runs in a network namespace made here (the bridge runs in it
#              and spawns vhost-user-net on its TAP); console talks to vhost-user-console
#              started here with a client socket (peer.py is the host side of both).
#              fs, rng, vsock and scsi need --backend thirdparty and a config with that device
#              (virtio_cfg_thirdparty.json has all of them, with blk and console).
#   --backend  ours  = the bridge spawns our vhost-user-blk for "img" devices (default)
#              qsd   = qemu-storage-daemon exports the image as a vhost-user-blk socket
#              thirdparty = every device on a third-party backend, each started here on
#                      the socket the config names (relative to the config, in the run dir):
#                      blk qemu-storage-daemon (num-queues = the device's num_queues),
#                      console vhost-device-console (network backend, peer.py on its TCP
#                      port), fs virtiofsd, rng vhost-device-rng, vsock vhost-device-vsock
#                      (guest CID 3), scsi vhost-device-scsi; binaries from THIRDPARTY_BIN
#                      (tests/thirdparty/install.sh installs them there)
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
#   RIG_BENCH_MIB / RIG_BENCH_4K / RIG_MMIO_READS (bench sizes, default 64 / 4096 / 20000),
#   THIRDPARTY_BIN (default build/thirdparty/bin), RIG_FS_MIB (64: each way through virtiofs),
#   RIG_VSOCK_MIB (8: each way), RIG_SCSI_MIB (16), RIG_RNG_BYTES (16384).
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
THIRDPARTY_BIN=${THIRDPARTY_BIN:-$REPO/build/thirdparty/bin}
FS_MIB=${RIG_FS_MIB:-64}
VSOCK_MIB=${RIG_VSOCK_MIB:-8}
VSOCK_CID=3
VSOCK_PORT=5000
SCSI_MIB=${RIG_SCSI_MIB:-16}
SCSI_DISK_MIB=64
RNG_BYTES=${RIG_RNG_BYTES:-16384}
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
case "$BACKEND" in ours | qsd | thirdparty | echo | local | qemu) ;; *) echo "run.sh: bad --backend $BACKEND" >&2; exit 2 ;; esac
# The backends whose devices go through the bridge.
bridged() { case "$BACKEND" in ours | qsd | thirdparty) return 0 ;; *) return 1 ;; esac; }
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
    if bridged; then
        (cd "$REPO" && cargo build --release -q -p hvisor-bridge -p vhost-user-blk -p vhost-user-net \
            -p vhost-user-console)
    fi
fi
if [ "$BACKEND" = thirdparty ]; then
    # Cached: an installed crate at its pinned version is only checked.
    "$REPO/tests/thirdparty/install.sh" vhost-device-console vhost-device-rng vhost-device-vsock vhost-device-scsi \
        virtiofsd >&2
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
# With --backend thirdparty, every device keeps the socket the config names (resolved against
# the run directory, where the copy lives): prints SOCK_<type>=<path> for each. BLK_QUEUES is
# the disk's queue count.
NET_TAP=""
BLK_QUEUES=1
python3 - "$CONFIG" "$RUN/virtio_cfg.json" "$BACKEND" "$DISK" "$RUN/qsd.sock" "$RUN/console.sock" "$RUN" \
    > "$RUN/config.env" <<'EOF' || exit 2
import json, os, shlex, sys
src, dst, backend, disk, qsd, console, run = sys.argv[1:]
cfg = json.load(open(src))
seen = set()
for zone in cfg["zones"]:
    for dev in zone.get("devices", []):
        if dev.get("status", "enable") == "disable":
            continue
        kind = dev.get("type")
        if kind == "blk":
            print(f"BLK_QUEUES={int(dev.get('backend', {}).get('num_queues', dev.get('num_queues', 1)))}")
        if backend == "thirdparty":
            sock = dev.get("socket") or dev.get("backend", {}).get("socket")
            if kind not in ("blk", "console", "fs", "rng", "vsock", "scsi") or not sock or kind in seen:
                sys.exit(f"run.sh: --backend thirdparty serves one each of blk, console, fs, rng, vsock "
                         f"and scsi, each with a socket; the config has {kind} {sock or 'without one'}")
            seen.add(kind)
            print(f"SOCK_{kind}={shlex.quote(os.path.join(run, sock))}")
            continue
        if kind not in ("blk", "net", "console"):
            sys.exit(f"run.sh: a {kind} device needs --backend thirdparty")
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
# shellcheck source=/dev/null
. "$RUN/config.env"
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
        bridged || { log "--test $t needs the bridge (--backend ours, qsd or thirdparty)"; exit 2; }
        [ "$t" = console ] || [ -n "$NET_TAP" ] || { log "--test net: the net device needs a \"tap\""; exit 2; }
        ;;
    fs | rng | vsock | scsi)
        has_device "$t" || { log "--test $t: the config has no enabled $t device"; exit 2; }
        [ "$BACKEND" = thirdparty ] || { log "--test $t needs --backend thirdparty"; exit 2; }
        ;;
    *) log "unknown test $t"; exit 2 ;;
    esac
done
[ "$TESTS" = probe ] && GUEST_TESTS=none || GUEST_TESTS=$TESTS
BOOTARGS="console=ttyAMA0 panic=-1 rig.tests=$GUEST_TESTS rig.blk_mib=$BLK_MIB rig.counter_page=$RIG_COUNTER_PAGE"
BOOTARGS="$BOOTARGS rig.bench_mib=$BENCH_MIB rig.bench_4k=${RIG_BENCH_4K:-4096} rig.mmio_reads=${RIG_MMIO_READS:-20000}"
BOOTARGS="$BOOTARGS rig.blk_queues=$BLK_QUEUES"
# vhost-device-console 0.1.0 also panics on a write that is not UTF-8: text only.
[ -n "${SOCK_console:-}" ] && BOOTARGS="$BOOTARGS rig.console_reply=0 rig.console_text=1"
has_test() { echo ",$TESTS," | grep -q ",$1,"; }
if has_test net; then
    # What the host sends the guest; the guest checks its md5.
    head -c "$((NET_MIB << 20))" /dev/urandom > "$RUN/net.send"
    NET_SEND_MD5=$(md5sum < "$RUN/net.send" | cut -d' ' -f1)
    BOOTARGS="$BOOTARGS rig.ip=$NET_GUEST_IP rig.peer=$NET_HOST_IP rig.port=$NET_PORT rig.net_mib=$NET_MIB"
    BOOTARGS="$BOOTARGS rig.net_rx_md5=$NET_SEND_MD5"
fi
if has_test fs; then
    # The shared directory: a small file the guest checks by content and a large one by md5.
    mkdir -p "$RUN/share"
    FS_HOST_LINE=rig-host-$RANDOM$RANDOM
    echo "$FS_HOST_LINE" > "$RUN/share/host.txt"
    head -c "$((FS_MIB << 20))" /dev/urandom > "$RUN/share/host.bin"
    BOOTARGS="$BOOTARGS rig.fs_tag=rigfs rig.fs_mib=$FS_MIB rig.fs_host_line=$FS_HOST_LINE"
    BOOTARGS="$BOOTARGS rig.fs_host_md5=$(md5sum < "$RUN/share/host.bin" | cut -d' ' -f1)"
fi
has_test rng && BOOTARGS="$BOOTARGS rig.rng_bytes=$RNG_BYTES"
if has_test vsock; then
    head -c "$((VSOCK_MIB << 20))" /dev/urandom > "$RUN/vsock.send"
    BOOTARGS="$BOOTARGS rig.vsock_cid=$VSOCK_CID rig.vsock_port=$VSOCK_PORT rig.vsock_mib=$VSOCK_MIB"
    BOOTARGS="$BOOTARGS rig.vsock_rx_md5=$(md5sum < "$RUN/vsock.send" | cut -d' ' -f1)"
fi
SCSI_DISK=$RUN/scsi.img
has_test scsi && BOOTARGS="$BOOTARGS rig.scsi_mib=$SCSI_MIB rig.scsi_bytes=$((SCSI_DISK_MIB << 20))"

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
if bridged; then DOORBELL=${RIG_DOORBELL:-1}; fi
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
QSD_SOCK=$RUN/qsd.sock
[ "$BACKEND" = thirdparty ] && QSD_SOCK=${SOCK_blk:-}
if [ "$BACKEND" = qsd ] || { [ "$BACKEND" = thirdparty ] && [ -n "$QSD_SOCK" ]; }; then
    command -v qemu-storage-daemon > /dev/null || { log "qemu-storage-daemon not found (package qemu-utils)"; exit 1; }
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$DISK,cache.direct=off" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$QSD_SOCK,writable=on,num-queues=$BLK_QUEUES" \
        > "$RUN/qsd.log" 2>&1 &
    PIDS+=($!)
    wait_for "the qemu-storage-daemon socket" 10 test -S "$QSD_SOCK" || { dump_logs; exit 1; }
fi
start_thirdparty() { # start_thirdparty NAME SOCKET-TO-WAIT-FOR ARGS...: a backend from THIRDPARTY_BIN
    local name=$1 sock=$2
    shift 2
    [ -x "$THIRDPARTY_BIN/$name" ] || { log "$THIRDPARTY_BIN/$name not found (tests/thirdparty/install.sh)"; exit 1; }
    RUST_LOG=${RUST_LOG:-info} "$THIRDPARTY_BIN/$name" "$@" > "$RUN/$name.log" 2>&1 &
    PIDS+=($!)
    wait_for "the $name socket" 10 test -S "$sock" || { dump_logs; exit 1; }
}
# vhost-device-rng and -console append the instance number to --socket-path: the config's
# socket is that path with its trailing 0.
if [ -n "${SOCK_fs:-}" ]; then
    mkdir -p "$RUN/share"
    start_thirdparty virtiofsd "$SOCK_fs" --socket-path "$SOCK_fs" --shared-dir "$RUN/share" --tag rigfs \
        --cache never --sandbox none
fi
[ -z "${SOCK_rng:-}" ] || start_thirdparty vhost-device-rng "$SOCK_rng" --socket-path "${SOCK_rng%0}"
[ -z "${SOCK_vsock:-}" ] || start_thirdparty vhost-device-vsock "$SOCK_vsock" --guest-cid "$VSOCK_CID" \
    --socket "$SOCK_vsock" --uds-path "$RUN/vm.vsock"
if [ -n "${SOCK_scsi:-}" ]; then
    truncate -s "${SCSI_DISK_MIB}M" "$SCSI_DISK"
    start_thirdparty vhost-device-scsi "$SOCK_scsi" --socket-path "$SOCK_scsi" "$SCSI_DISK"
fi
CONSOLE_PORT=""
if [ -n "${SOCK_console:-}" ]; then
    # A free port: the listener is closed before the backend binds it.
    CONSOLE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    start_thirdparty vhost-device-console "$SOCK_console" --socket-path "${SOCK_console%0}" --backend network \
        --tcp-port "$CONSOLE_PORT"
fi
if has_test vsock; then
    # The backend turns the guest's connection to CID 2 port P into one to <uds-path>_P.
    python3 "$RIG_DIR/peer.py" net --unix "$RUN/vm.vsock_$VSOCK_PORT" --expect-bytes "$((VSOCK_MIB << 20))" \
        --send "$RUN/vsock.send" --result "$RUN/vsock.result" --timeout "$TIMEOUT" > "$RUN/vsock-peer.log" 2>&1 &
    PIDS+=($!)
    wait_for "the vsock peer to listen" 10 grep -q '^listening' "$RUN/vsock.result" 2>/dev/null || { dump_logs; exit 1; }
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
if bridged && [ -n "$NET_TAP" ]; then
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
if bridged && has_test console; then
    # vhost-device-console 0.1.0 returns each receive buffer once per byte it writes (its
    # add_used is inside the per-byte loop), so the guest reads every prefix of what the host
    # sent: with it, the test checks the guest-to-host direction only (docs/devices.md).
    if [ -n "$CONSOLE_PORT" ]; then PEER_AT=(--tcp "127.0.0.1:$CONSOLE_PORT" --no-reply); else PEER_AT=(--socket "$RUN/console-client.sock"); fi
    python3 "$RIG_DIR/peer.py" console "${PEER_AT[@]}" --result "$RUN/console.result" \
        --timeout "$TIMEOUT" > "$RUN/console-peer.log" 2>&1 &
    PIDS+=($!)
fi
if bridged; then
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
# What each device negotiated: the backend's offer (features, protocol features the bridge
# took), and what the guest's driver acked at DRIVER_OK.
if [ -f "$RUN/bridge.log" ]; then
    grep -aE 'backend features|activated with features' "$RUN/bridge.log" | sed 's/^.*\] *//; s/^/  bridge: /' || true
fi
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
        # The guest's writes may still be on their way when it powers off (without replies it
        # does not wait for them): give the client its own deadline to finish reading.
        wait_for "the console client's result" 30 grep -qE '^(bulk|eof|error)' "$RUN/console.result" || true
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
    if has_test fs; then
        # Guest to host: the file the guest wrote, and its small file, as the host sees them.
        GUEST_FS=$(marker 'fs wrote ' | sed -n 's/^bytes=\([0-9]*\) md5=\([0-9a-f]*\).*/\1 \2/p')
        HOST_FS=""
        [ -f "$RUN/share/guest.bin" ] && HOST_FS="$(stat -c %s "$RUN/share/guest.bin") $(md5sum < "$RUN/share/guest.bin" | cut -d' ' -f1)"
        echo "fs: guest wrote ${GUEST_FS:-?} (bytes md5), the host's guest.bin is ${HOST_FS:-missing}"
        [ -n "$GUEST_FS" ] && [ "$GUEST_FS" = "$HOST_FS" ] && [ "${GUEST_FS%% *}" = "$((FS_MIB << 20))" ] \
            || fail "the host's share does not hold what the guest wrote through virtiofs"
        GUEST_LINE=$(marker 'fs line=')
        HOST_LINE=$(cat "$RUN/share/guestdir/guest.txt" 2>/dev/null || true)
        echo "fs: guest wrote line ${GUEST_LINE:-?}, the host reads ${HOST_LINE:-nothing}"
        [ -n "$GUEST_LINE" ] && [ "$GUEST_LINE" = "$HOST_LINE" ] || fail "the host does not see the guest's small file"
        GUEST_READ=$(marker 'fs read ' | sed -n 's/^bytes=\([0-9]*\) md5=\([0-9a-f]*\).*/\1 \2/p')
        HOST_BIN="$(stat -c %s "$RUN/share/host.bin") $(md5sum < "$RUN/share/host.bin" | cut -d' ' -f1)"
        echo "fs: guest read host.bin as ${GUEST_READ:-?}, the host's is $HOST_BIN"
        [ "$GUEST_READ" = "$HOST_BIN" ] || fail "the guest did not read the host's file through virtiofs"
    fi
    if has_test vsock; then
        GUEST_SENT=$(marker 'vsock sent ' | sed -n 's/^bytes=\([0-9]*\) md5=\([0-9a-f]*\).*/\1 \2/p')
        HOST_GOT=$(sed -n 's/^received bytes=\([0-9]*\) md5=\([0-9a-f]*\)$/\1 \2/p' "$RUN/vsock.result" 2>/dev/null)
        echo "vsock: guest sent ${GUEST_SENT:-?}, host received ${HOST_GOT:-nothing} (bytes md5)"
        [ -n "$GUEST_SENT" ] && [ "$HOST_GOT" = "$GUEST_SENT" ] && [ "${HOST_GOT%% *}" = "$((VSOCK_MIB << 20))" ] \
            || fail "the host did not receive what the guest sent over vsock"
        HOST_SENT=$(sed -n 's/^sent bytes=\([0-9]*\) md5=\([0-9a-f]*\)$/\1 \2/p' "$RUN/vsock.result" 2>/dev/null)
        GUEST_GOT=$(marker 'vsock received ' | sed -n 's/^bytes=\([0-9]*\) md5=\([0-9a-f]*\).*/\1 \2/p')
        echo "vsock: host sent ${HOST_SENT:-nothing}, guest received ${GUEST_GOT:-?} (bytes md5)"
        [ -n "$HOST_SENT" ] && [ "$HOST_SENT" = "$GUEST_GOT" ] || fail "the guest did not receive what the host sent over vsock"
    fi
    if has_test scsi; then
        WANT=$(marker 'scsi written_md5=' | cut -d' ' -f1)
        HOST=$(head -c "$((SCSI_MIB << 20))" "$SCSI_DISK" | md5sum | cut -d' ' -f1)
        echo "scsi: host image md5 of the first $SCSI_MIB MiB: $HOST (guest wrote ${WANT:-?})"
        [ -n "$WANT" ] && [ "$WANT" = "$HOST" ] || fail "the scsi image does not hold what the guest wrote"
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
        case "$t" in
        blk) id=0x0002 ;; net) id=0x0001 ;; console) id=0x0003 ;; rng) id=0x0004 ;; scsi) id=0x0008 ;;
        vsock) id=0x0013 ;; fs) id=0x001a ;;
        esac
        # Any driver (virtiofs and vmw_vsock_virtio_transport are not named virtio_*), not none.
        grep -a "^RIG: device virtio[0-9]* id=$id driver=" "$RUN/console.txt" | grep -qv "driver=none" \
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
