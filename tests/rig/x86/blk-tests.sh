#!/usr/bin/env bash
# Real-guest tests of a vhost-user-blk backend: QEMU (TCG) as the vhost-user frontend, a stock
# Debian kernel and its virtio_blk driver in the guest, the image on tmpfs checked from the host.
#
# Usage: blk-tests.sh --backend ours|qsd [--num-queues N]
#   ours  the project's backend: $BLK_BACKEND (default target/release/vhost-user-blk), with extra
#         arguments from $BLK_BACKEND_ARGS (e.g. --direct)
#   qsd   qemu-storage-daemon, the control: a check failing only for ours points at ours
# Optional: BLK_EXPECT_TOPOLOGY="PHYSICAL_BLOCK MIN_IO OPT_IO" (bytes) for exact topology values;
# RIG_KEEP=1 keeps the run directory (logs, images).
#
# Two boots: a writable device (data, discard, zeroing, sysfs, queues, serial, resize, then a
# flush followed by SIGKILL), and a read-only one. Prints PASS/FAIL/N/A per check, then the final
# line "N passed, N failed"; exits 1 when a check failed.
set -uo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

backend=""
queues=2
while (($#)); do
    case $1 in
    --backend) backend=${2:-} && shift ;;
    --num-queues) queues=${2:-} && shift ;;
    *) rig_die "usage: blk-tests.sh --backend ours|qsd [--num-queues N]" ;;
    esac
    shift
done
[[ $backend == ours || $backend == qsd ]] || rig_die "usage: blk-tests.sh --backend ours|qsd [--num-queues N]"
[[ $queues =~ ^[1-8]$ ]] || rig_die "--num-queues must be 1..8"
BLK_BACKEND=${BLK_BACKEND:-$REPO_ROOT/target/release/vhost-user-blk}
if [[ $backend == ours && ! -x $BLK_BACKEND ]]; then
    rig_die "$BLK_BACKEND not found: cargo build --release -p vhost-user-blk (or set BLK_BACKEND)"
fi
rig_setup

MIB=1048576
IMAGE_MIB=128
GROW_MIB=64
SERIAL=hvv-rig-serial
# Guest byte ranges, as OFFSET_MIB:LENGTH_MIB, one per test that changes the image.
WRITE_MIB=32 # at offset 0
DISCARD=40:4
ZEROOUT=48:4
PUNCH=56:4
ZERORANGE=64:4
KILLSYNC=80:8

# virtio-blk feature bits, for reporting what was negotiated.
declare -A FEATURE_NAMES=([1]=SIZE_MAX [2]=SEG_MAX [4]=GEOMETRY [5]=RO [6]=BLK_SIZE [9]=FLUSH
    [10]=TOPOLOGY [11]=CONFIG_WCE [12]=MQ [13]=DISCARD [14]=WRITE_ZEROES [28]=INDIRECT_DESC
    [29]=EVENT_IDX [32]=VERSION_1 [34]=RING_PACKED)
F_RO=5 F_TOPOLOGY=10 F_MQ=12 F_DISCARD=13 F_WRITE_ZEROES=14

BACKEND_PID=""
BACKEND_SOCK=""
IMAGE=""

cleanup() {
    # Subshells must not tear down the run.
    [[ $BASHPID == "$MAIN_PID" ]] || return 0
    [[ -n $BACKEND_PID ]] && kill -KILL "$BACKEND_PID" 2>/dev/null
    if [[ ${RIG_KEEP:-0} == 1 || $RIG_FAILED -gt 0 ]]; then
        rig_log "logs and images kept in $RIG_RUN"
    else
        rm -rf "$RIG_RUN"
    fi
}

# start_backend rw|ro N: serves $IMAGE on a fresh socket; the backend's output goes to backend-N.log.
start_backend() {
    local mode=$1 n=$2 log=$RIG_RUN/backend-$2.log
    BACKEND_SOCK=$RIG_RUN/blk-$n.sock
    if [[ $backend == ours ]]; then
        local ro_flag=()
        [[ $mode == ro ]] && ro_flag=(--read-only)
        # shellcheck disable=SC2086 # BLK_BACKEND_ARGS is a list of words
        "$BLK_BACKEND" -s "$BACKEND_SOCK" --image "$IMAGE" --serial "$SERIAL" --num-queues "$queues" \
            "${ro_flag[@]}" ${BLK_BACKEND_ARGS:-} >"$log" 2>&1 &
    else
        local writable=on ro_opt=""
        [[ $mode == ro ]] && writable=off ro_opt=,read-only=on
        rm -f "$RIG_RUN/qmp.sock"
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file0,filename=$IMAGE,cache.direct=off,discard=unmap$ro_opt" \
            --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$BACKEND_SOCK,writable=$writable,num-queues=$queues" \
            --chardev "socket,id=qmp,path=$RIG_RUN/qmp.sock,server=on,wait=off" --monitor chardev=qmp \
            >"$log" 2>&1 &
    fi
    BACKEND_PID=$!
    # No event tells when the socket is listening: poll for it, bounded.
    local tries=0
    until [[ -S $BACKEND_SOCK ]]; do
        if ! kill -0 "$BACKEND_PID" 2>/dev/null || ((tries++ > 100)); then
            rig_log "backend did not create $BACKEND_SOCK; its log:"
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# Stops the backend with SIGTERM; SIGKILL after 10 s. Returns the backend's exit status.
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

# qmp SOCKET COMMAND_JSON...: runs QMP commands on qemu-storage-daemon's monitor.
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys

sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
stream = sock.makefile("rw")


def call(command):
    stream.write(command + "\n")
    stream.flush()
    while True:
        reply = json.loads(stream.readline())
        if "return" in reply or "error" in reply:
            return reply


json.loads(stream.readline())  # greeting
call('{"execute": "qmp_capabilities"}')
for command in sys.argv[2:]:
    reply = call(command)
    print(json.dumps(reply))
    if "error" in reply:
        sys.exit(1)
PY
}

RESIZE_RESULT=""
rig_host_action() {
    case $1 in
    resize)
        local new_size=$(((IMAGE_MIB + GROW_MIB) * MIB))
        if [[ $backend == ours ]]; then
            truncate -s "$new_size" "$IMAGE" && kill -HUP "$BACKEND_PID" && RESIZE_RESULT="truncate + SIGHUP"
        else
            if qmp "$RIG_RUN/qmp.sock" \
                "{\"execute\": \"block_resize\", \"arguments\": {\"node-name\": \"file0\", \"size\": $new_size}}" \
                >"$RIG_RUN/qmp.out" 2>&1; then
                RESIZE_RESULT="QMP block_resize"
            else
                RESIZE_RESULT="refused: $(tr '\n' ' ' <"$RIG_RUN/qmp.out" | cut -c1-200)"
            fi
        fi
        ;;
    kill)
        # Power cut for the whole stack: the VM and the backend die without any chance to flush.
        kill -KILL "$(cat "$RIG_RUN/qemu.pid")" 2>/dev/null
        kill -KILL "$BACKEND_PID" 2>/dev/null
        wait "$BACKEND_PID" 2>/dev/null
        BACKEND_PID=""
        ;;
    *) rig_log "unknown host action $1" ;;
    esac
}

# Host-side views of the image.
image_md5() { dd if="$IMAGE" bs=$MIB skip="$1" count="$2" status=none | md5sum | cut -d' ' -f1; }
# range_is_zero OFFSET_MIB LENGTH_MIB
range_is_zero() { cmp -s -n $(($2 * MIB)) -i $(($1 * MIB)):0 "$IMAGE" /dev/zero; }
# range_is_hole OFFSET_MIB LENGTH_MIB: no allocated data in the range (SEEK_DATA).
range_is_hole() {
    python3 - "$IMAGE" $(($1 * MIB)) $(($2 * MIB)) <<'PY'
import errno, os, sys

fd = os.open(sys.argv[1], os.O_RDONLY)
start, length = int(sys.argv[2]), int(sys.argv[3])
try:
    data = os.lseek(fd, start, os.SEEK_DATA)
except OSError as err:
    if err.errno != errno.ENXIO:
        raise
    data = None
sys.exit(0 if data is None or data >= start + length else 1)
PY
}

fresh_image() {
    IMAGE=$RIG_RUN/disk-$1.img
    # Random content everywhere, so zeroing and deallocation are visible.
    head -c $((IMAGE_MIB * MIB)) /dev/urandom >"$IMAGE"
}

boot_ok() {
    local label=$1
    if grep -q '^RIG: virtio .* device=0x0002 driver=virtio_blk' "$RIG_BOOT_LOG"; then
        rig_pass "$label: guest booted, virtio_blk bound" "${RIG_BOOT_SECONDS} s"
    else
        rig_fail "$label: guest booted, virtio_blk bound" \
            "no virtio_blk device in the guest (qemu rc $RIG_BOOT_RC, ${RIG_BOOT_SECONDS} s; see $RIG_BOOT_LOG)"
        return 1
    fi
}

# Checks a discard/zeroing result: the guest command worked and the host range reads as zeros.
check_region_zeroed() {
    local label=$1 test=$2 region=$3 result rc
    result=$(rig_result "$test")
    rc=$(rig_field "$result" rc)
    if [[ $rc != 0 ]]; then
        rig_fail "$label" "guest command failed: rc=${rc:-none} $(rig_field "$result" err)"
    elif range_is_zero "${region%%:*}" "${region##*:}"; then
        rig_pass "$label" "rc 0, image range reads zero"
    else
        rig_fail "$label" "guest rc 0, but the image range $region MiB still holds data"
    fi
}

check_sysfs() {
    local info=$1 features
    features=$(rig_field "$info" features)
    local names="" bit
    for bit in $(printf '%s\n' "${!FEATURE_NAMES[@]}" | sort -n); do
        rig_has_feature "$features" "$bit" && names+=" ${FEATURE_NAMES[$bit]}"
    done
    rig_log "negotiated:$names"

    local expected_serial=$SERIAL
    # qemu-storage-daemon has no serial option; its GET_ID always answers this.
    [[ $backend == qsd ]] && expected_serial=vhost_user_blk
    rig_expect "serial (/sys/block/vda/serial)" "$(rig_field "$info" serial)" "$expected_serial"
    rig_expect "capacity (/sys/block/vda/size)" "$(rig_field "$info" size)" $((IMAGE_MIB * MIB / 512))
    rig_expect "logical block size" "$(rig_field "$info" logical_block_size)" 512

    local mq
    mq=$(rig_field "$info" mq)
    if ((queues > 1)) && ! rig_has_feature "$features" $F_MQ; then
        rig_fail "queue count (/sys/block/vda/mq)" "VIRTIO_BLK_F_MQ not offered; guest has $mq queue(s), expected $queues"
    else
        rig_expect "queue count (/sys/block/vda/mq)" "$mq" "$queues"
    fi

    local phys min opt
    phys=$(rig_field "$info" physical_block_size)
    min=$(rig_field "$info" minimum_io_size)
    opt=$(rig_field "$info" optimal_io_size)
    local expected_topology=${BLK_EXPECT_TOPOLOGY:-}
    [[ $backend == qsd ]] && expected_topology="512 512 512"
    if ! rig_has_feature "$features" $F_TOPOLOGY; then
        rig_fail "topology" "VIRTIO_BLK_F_TOPOLOGY not offered (guest shows physical=$phys min_io=$min opt_io=$opt)"
    elif [[ -n $expected_topology ]]; then
        rig_expect "topology (physical_block_size min_io opt_io)" "$phys $min $opt" "$expected_topology"
    elif ((phys >= 512 && phys % 512 == 0 && min % 512 == 0 && (opt == 0 || opt % min == 0))); then
        rig_pass "topology" "physical=$phys min_io=$min opt_io=$opt, consistent"
    else
        rig_fail "topology" "inconsistent: physical=$phys min_io=$min opt_io=$opt"
    fi

    local discard_max zeroes_max
    discard_max=$(rig_field "$info" discard_max_bytes)
    zeroes_max=$(rig_field "$info" write_zeroes_max_bytes)
    if ! rig_has_feature "$features" $F_DISCARD; then
        rig_fail "discard limits (discard_max_bytes)" "VIRTIO_BLK_F_DISCARD not offered (discard_max_bytes=$discard_max)"
    elif ((discard_max > 0)); then
        rig_pass "discard limits (discard_max_bytes)" "$discard_max, granularity $(rig_field "$info" discard_granularity)"
    else
        rig_fail "discard limits (discard_max_bytes)" "DISCARD negotiated but discard_max_bytes=0"
    fi
    if ! rig_has_feature "$features" $F_WRITE_ZEROES; then
        rig_fail "write-zeroes limits (write_zeroes_max_bytes)" "VIRTIO_BLK_F_WRITE_ZEROES not offered"
    elif ((zeroes_max > 0)); then
        rig_pass "write-zeroes limits (write_zeroes_max_bytes)" "$zeroes_max"
    else
        rig_fail "write-zeroes limits (write_zeroes_max_bytes)" "WRITE_ZEROES negotiated but write_zeroes_max_bytes=0"
    fi
    rig_log "write_cache=$(rig_field "$info" write_cache) max_segments=$(rig_field "$info" max_segments) max_hw_sectors_kb=$(rig_field "$info" max_hw_sectors_kb)"
    FEATURES=$features
}

rw_group() {
    rig_log "boot 1: writable, $queues queue(s), $queues vCPU(s)"
    fresh_image rw
    start_backend rw 1 || {
        rig_fail "rw: backend start" "see $RIG_RUN/backend-1.log"
        return
    }
    rig_boot rw 180 "$queues" \
        "rig.tests=info,write,discard,zeroout,punch,zerorange,mq,resize,killsync rig.write_mib=$WRITE_MIB \
rig.discard=$DISCARD rig.zeroout=$ZEROOUT rig.punch=$PUNCH rig.zerorange=$ZERORANGE rig.killsync=$KILLSYNC" \
        -chardev "socket,id=c0,path=$BACKEND_SOCK" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues"
    [[ -n $BACKEND_PID ]] && stop_backend
    boot_ok rw || return

    local info
    info=$(rig_result info)
    check_sysfs "$info"

    local write wrote
    write=$(rig_result write)
    wrote=$(rig_field "$write" wrote)
    if [[ $(rig_field "$write" rc) != 0 ]]; then
        rig_fail "32 MiB pattern write" "guest dd failed: $(rig_field "$write" err)"
    elif [[ $(rig_field "$write" read) != "$wrote" ]]; then
        rig_fail "32 MiB pattern read-back" "guest read $(rig_field "$write" read), wrote $wrote"
    elif [[ $(image_md5 0 "$WRITE_MIB") != "$wrote" ]]; then
        rig_fail "32 MiB pattern in image" "host md5 $(image_md5 0 "$WRITE_MIB"), guest wrote $wrote"
    else
        rig_pass "32 MiB pattern write, O_DIRECT read-back, image md5" "$wrote"
    fi

    if rig_has_feature "$FEATURES" $F_DISCARD; then
        check_region_zeroed "discard (blkdiscard): range reads zero in image" discard "$DISCARD"
        if range_is_hole "${DISCARD%%:*}" "${DISCARD##*:}"; then
            rig_pass "discard deallocates (hole in image)"
        else
            rig_fail "discard deallocates (hole in image)" "range $DISCARD MiB still allocated"
        fi
    else
        rig_fail "discard (blkdiscard)" "VIRTIO_BLK_F_DISCARD not offered; guest: $(rig_field "$(rig_result discard)" err)"
        rig_fail "discard deallocates (hole in image)" "VIRTIO_BLK_F_DISCARD not offered"
    fi
    # BLKZEROOUT works without WRITE_ZEROES too: the guest kernel then writes zero pages itself.
    check_region_zeroed "zeroing (blkdiscard -z / BLKZEROOUT): range reads zero" zeroout "$ZEROOUT"
    if rig_has_feature "$FEATURES" $F_WRITE_ZEROES; then
        check_region_zeroed "write-zeroes, unmap allowed (fallocate -p): range reads zero" punch "$PUNCH"
        if range_is_hole "${PUNCH%%:*}" "${PUNCH##*:}"; then
            rig_pass "write-zeroes with UNMAP deallocates (hole in image)"
        else
            rig_fail "write-zeroes with UNMAP deallocates (hole in image)" "range $PUNCH MiB still allocated"
        fi
        check_region_zeroed "write-zeroes, no unmap (fallocate -z): range reads zero" zerorange "$ZERORANGE"
    else
        local why="VIRTIO_BLK_F_WRITE_ZEROES not offered"
        rig_fail "write-zeroes, unmap allowed (fallocate -p)" "$why; guest: $(rig_field "$(rig_result punch)" err)"
        rig_fail "write-zeroes with UNMAP deallocates (hole in image)" "$why"
        rig_fail "write-zeroes, no unmap (fallocate -z)" "$why"
    fi

    local mq counts="" unused=""
    mq=$(rig_result mq)
    local q
    for ((q = 0; q < queues; q++)); do
        local n
        n=$(tr ' ' '\n' <<<"$mq" | sed -n "s/^virtio[0-9]*-req\.$q=//p")
        counts+=" req.$q=${n:-none}"
        [[ ${n:-0} -gt 0 ]] || unused+=" req.$q"
    done
    if [[ -z $unused ]]; then
        rig_pass "every request queue carried I/O (reads from each vCPU)" "interrupts:$counts"
    else
        rig_fail "every request queue carried I/O (reads from each vCPU)" "unused:$unused (interrupts:$counts)"
    fi

    local resize old new expected
    resize=$(rig_result resize)
    old=$(rig_field "$resize" old)
    new=$(rig_field "$resize" new)
    expected=$(((IMAGE_MIB + GROW_MIB) * MIB / 512))
    if [[ $new == "$expected" ]]; then
        rig_pass "resize seen by guest (/sys/block/vda/size)" "$old -> $new sectors after $RESIZE_RESULT"
    elif [[ $backend == qsd && $RESIZE_RESULT == refused* ]]; then
        rig_na "resize seen by guest" "qemu-storage-daemon $RESIZE_RESULT"
    else
        rig_fail "resize seen by guest (/sys/block/vda/size)" "guest still sees $new sectors, expected $expected (host did: ${RESIZE_RESULT:-nothing})"
    fi

    local ks md5 off len
    ks=$(rig_result killsync)
    md5=$(rig_field "$ks" md5)
    off=${KILLSYNC%%:*}
    len=${KILLSYNC##*:}
    if [[ -z $md5 ]]; then
        rig_fail "sync, then SIGKILL of QEMU and backend: flushed data in image" "guest did not reach the kill point"
    elif grep -q '^RIG: result killsync-survived' "$RIG_BOOT_LOG"; then
        rig_fail "sync, then SIGKILL of QEMU and backend: flushed data in image" "QEMU was not killed"
    elif [[ $(image_md5 "$off" "$len") == "$md5" ]]; then
        rig_pass "sync, then SIGKILL of QEMU and backend: flushed data in image" "$len MiB, md5 $md5"
    else
        rig_fail "sync, then SIGKILL of QEMU and backend: flushed data in image" \
            "image md5 $(image_md5 "$off" "$len") != guest $md5"
    fi
}

ro_group() {
    rig_log "boot 2: read-only, 1 vCPU"
    fresh_image ro
    local before
    before=$(image_md5 0 "$IMAGE_MIB")
    start_backend ro 2 || {
        rig_fail "ro: backend start" "see $RIG_RUN/backend-2.log"
        return
    }
    rig_boot ro 120 1 "rig.tests=info,ro" \
        -chardev "socket,id=c0,path=$BACKEND_SOCK" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues"
    local stop_rc=0
    stop_backend || stop_rc=$?
    boot_ok ro || return

    local info ro
    info=$(rig_result info)
    ro=$(rig_result ro)
    if rig_has_feature "$(rig_field "$info" features)" $F_RO && [[ $(rig_field "$ro" ro) == 1 ]]; then
        rig_pass "read-only: VIRTIO_BLK_F_RO, /sys/block/vda/ro=1"
    else
        rig_fail "read-only: VIRTIO_BLK_F_RO, /sys/block/vda/ro=1" "ro=$(rig_field "$ro" ro)"
    fi
    # A stock guest never sends a write to a VIRTIO_BLK_F_RO disk: its kernel refuses with EPERM
    # first (the backend's own refusal is covered by the backend's unit tests).
    local how
    for how in dd zeroout; do
        if [[ $(rig_field "$ro" ${how}_rc) != 0 ]]; then
            rig_pass "read-only: guest $how write refused" "$(rig_field "$ro" ${how}_err)"
        else
            rig_fail "read-only: guest $how write refused" "it succeeded"
        fi
    done
    rig_expect "read-only: image unchanged" "$(image_md5 0 "$IMAGE_MIB")" "$before"
    if ((stop_rc == 0)); then
        rig_pass "backend exits 0 on SIGTERM"
    else
        rig_fail "backend exits 0 on SIGTERM" "exit status $stop_rc"
    fi
}

main() {
    local start
    start=$(rig_now)
    rig_make_run_dir
    MAIN_PID=$BASHPID
    trap cleanup EXIT
    trap 'rig_fail "run" "interrupted by a signal"; echo "$RIG_PASSED passed, $RIG_FAILED failed"; exit 1' INT TERM HUP
    rig_log "backend $backend$([[ $backend == ours ]] && echo " ($BLK_BACKEND ${BLK_BACKEND_ARGS:-})"), run dir $RIG_RUN"
    rw_group
    ro_group
    rig_log "total ${RIG_BOOT_SECONDS:+$(rig_elapsed "$start")} s"
    ((RIG_NA == 0)) || rig_log "$RIG_NA check(s) not applicable"
    echo "$RIG_PASSED passed, $RIG_FAILED failed"
    ((RIG_FAILED == 0))
}

main
