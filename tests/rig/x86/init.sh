#!/bin/sh
# Guest /init for the x86 real-guest rig (busybox sh, PID 1 in the initramfs).
#
# Runs the tests named by rig.tests=a,b,c on the kernel command line, one after the other, and
# reports on the serial console with lines that start with "RIG: ":
#   RIG: result TEST key=value ...   facts for the host to check
#   RIG: host-action NAME            the host must act now (resize the image, kill the VM); the test
#                                    then waits for the effect
#   RIG: done                        all tests ran; the guest powers off
# The host decides pass or fail; the guest only reports what it observed.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Tools that busybox also has as applets (blkdiscard, fallocate) must be called by full path:
# this busybox sh runs its own applets before looking at PATH.
RIG_BIN=/rig/bin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1

MIB=1048576
say() { echo "RIG: $*"; }

# param NAME DEFAULT: the value of rig.NAME=... on the kernel command line.
param() {
    for word in $(cat /proc/cmdline); do
        case $word in
        "rig.$1="*)
            echo "${word#rig."$1"=}"
            return
            ;;
        esac
    done
    echo "$2"
}

finish() {
    say "done uptime=$(cut -d' ' -f1 /proc/uptime)"
    sync
    poweroff -f
    sleep 5
}

load_modules() {
    kver=$(uname -r)
    for mod in $(param modules "virtio_pci virtio_mmio virtio_blk virtio_net virtio_console" | tr , ' '); do
        if grep -q "/${mod}.ko" "/lib/modules/$kver/modules.builtin"; then
            continue
        fi
        modprobe "$mod" || say "modprobe-failed $mod"
    done
    for dev in /sys/bus/virtio/devices/*; do
        [ -e "$dev" ] || continue
        driver=none
        [ -e "$dev/driver" ] && driver=$(basename "$(readlink "$dev/driver")")
        say "virtio $(basename "$dev") device=$(cat "$dev/device") driver=$driver features=$(cat "$dev/features")"
    done
}

# Waits up to 10 s for /dev/vda: the virtio_blk probe can finish after modprobe returns.
wait_vda() {
    tries=0
    while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ -b /dev/vda ]
}

t_info() {
    q=/sys/block/vda/queue
    set -- size=/sys/block/vda/size ro=/sys/block/vda/ro serial=/sys/block/vda/serial \
        alignment_offset=/sys/block/vda/alignment_offset
    for attr in logical_block_size physical_block_size minimum_io_size optimal_io_size \
        discard_granularity discard_max_bytes discard_max_hw_bytes write_zeroes_max_bytes \
        max_segments max_segment_size max_hw_sectors_kb write_cache rotational; do
        set -- "$@" "$attr=$q/$attr"
    done
    line=""
    for pair in "$@"; do
        value=$(tr ' ' _ 2>/dev/null <"${pair#*=}")
        line="$line ${pair%%=*}=${value:-?}"
    done
    features=$(cat /sys/block/vda/device/features 2>/dev/null)
    say "result info$line mq=$(ls /sys/block/vda/mq | wc -l) cpus=$(nproc) features=$features"
}

# write: a random pattern of rig.write_mib MiB at offset 0, written and read back with O_DIRECT.
t_write() {
    mib=$(param write_mib 32)
    dd if=/dev/urandom of=/tmp/pattern bs=$MIB count="$mib" 2>/dev/null
    wrote=$(md5sum </tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of=/dev/vda bs=$MIB oflag=direct conv=fsync 2>/tmp/err
    rc=$?
    rm -f /tmp/pattern
    echo 3 >/proc/sys/vm/drop_caches
    read_back=$(dd if=/dev/vda bs=$MIB count="$mib" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    say "result write mib=$mib rc=$rc wrote=$wrote read=$read_back err=$(tr ' \n' '_ ' </tmp/err | tail -c 120)"
}

# region NAME: rig.NAME=OFFSET_MIB:LENGTH_MIB as byte offset and length.
region() {
    spec=$(param "$1" "")
    [ -n "$spec" ] || return 1
    off=$((${spec%%:*} * MIB))
    len=$((${spec##*:} * MIB))
}

# Runs a command against a region and reports its exit code and error text.
region_cmd() {
    name=$1
    shift
    "$@" >/tmp/err 2>&1
    rc=$?
    say "result $name off=$off len=$len rc=$rc err=$(tr ' \n' '_ ' </tmp/err | tail -c 120)"
}

# discard / zeroout / punch / zerorange: the four ways a guest removes data from a range.
t_discard() { region discard && region_cmd discard $RIG_BIN/blkdiscard -o "$off" -l "$len" /dev/vda; }
t_zeroout() { region zeroout && region_cmd zeroout $RIG_BIN/blkdiscard -z -o "$off" -l "$len" /dev/vda; }
# fallocate punch-hole on a block device is a write-zeroes that may unmap and never falls back to
# writing zero pages, so it fails unless the device offers WRITE_ZEROES.
t_punch() { region punch && region_cmd punch $RIG_BIN/fallocate -p -o "$off" -l "$len" /dev/vda; }
t_zerorange() { region zerorange && region_cmd zerorange $RIG_BIN/fallocate -z -o "$off" -l "$len" /dev/vda; }

# mq: direct reads from every online CPU; each request queue's interrupt count shows it was used.
queue_interrupts() {
    awk '/virtio[0-9]+-req\./ {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        printf " %s=%d", $NF, n
    }' /proc/interrupts
}
t_mq() {
    cpu=0
    while [ $cpu -lt "$(nproc)" ]; do
        taskset -c $cpu dd if=/dev/vda of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null &
        cpu=$((cpu + 1))
    done
    wait
    say "result mq queues=$(ls /sys/block/vda/mq | wc -l)$(queue_interrupts)"
}

# ro: every way a guest can change the device; the kernel must refuse each one itself (EPERM),
# since VIRTIO_BLK_F_RO marks the disk read-only.
t_ro() {
    dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/tmp/err
    dd_rc=$?
    dd_err=$(grep -o 'Operation not permitted\|Input/output error' /tmp/err | head -n 1 | tr ' ' _)
    $RIG_BIN/blkdiscard -z -o 0 -l $MIB /dev/vda 2>/tmp/err
    zeroout_rc=$?
    zeroout_err=$(grep -o 'Operation not permitted\|Input/output error' /tmp/err | head -n 1 | tr ' ' _)
    say "result ro ro=$(cat /sys/block/vda/ro) dd_rc=$dd_rc dd_err=$dd_err zeroout_rc=$zeroout_rc zeroout_err=$zeroout_err"
}

# resize: ask the host to grow the image, then wait up to 30 s for the new capacity.
t_resize() {
    old=$(cat /sys/block/vda/size)
    say "host-action resize"
    tries=0
    new=$old
    while [ "$new" = "$old" ] && [ $tries -lt 300 ]; do
        sleep 0.1
        tries=$((tries + 1))
        new=$(cat /sys/block/vda/size)
    done
    say "result resize old=$old new=$new"
}

# killsync: buffered write, sync and fsync (a FLUSH), then the host kills the VM and checks the image.
t_killsync() {
    region killsync || return
    dd if=/dev/urandom of=/tmp/pattern bs=$MIB count=$((len / MIB)) 2>/dev/null
    sum=$(md5sum </tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of=/dev/vda bs=$MIB seek=$((off / MIB)) conv=notrunc 2>/dev/null
    sync
    # A zero-length write with conv=fsync: fsync(2) on the device, which sends a FLUSH.
    dd if=/dev/null of=/dev/vda conv=notrunc,fsync 2>/dev/null
    say "result killsync off=$off len=$len md5=$sum"
    say "host-action kill"
    sleep 60
    say "result killsync-survived"
}

# bench: fio jobs NAME:RW:BS:IODEPTH (comma separated) for rig.runtime seconds each, O_DIRECT, libaio.
t_bench() {
    runtime=$(param runtime 10)
    for job in $(param jobs "" | tr , ' '); do
        IFS=: read -r name rw bs depth <<JOB
$job
JOB
        $RIG_BIN/fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio --rw="$rw" --bs="$bs" \
            --iodepth="$depth" --runtime="$runtime" --time_based --ramp_time=1 --size=$((64 * MIB)) \
            --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/err
        rc=$?
        # terse v3: field 7/8 read KiB/s and IOPS, 48/49 the same for writes.
        say "result bench name=$name rc=$rc $(awk -F';' '{ printf "read_kibps=%s read_iops=%s write_kibps=%s write_iops=%s", $7, $8, $48, $49 }' /tmp/fio.out)"
    done
}

# ---- network tests (rig.disk=0 boots without a disk) ----------------------------------------

uptime_s() { cut -d' ' -f1 /proc/uptime; }
elapsed_s() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }'; }

# The first network interface that is not loopback.
net_iface() {
    for n in /sys/class/net/*; do
        [ "${n##*/}" = lo ] && continue
        echo "${n##*/}"
        return
    done
}

# net: the interface gets rig.ip (default 10.77.0.2/24) and pings rig.peer (default 10.77.0.1).
t_net() {
    iface=$(net_iface)
    ip link set "$iface" up
    ip addr add "$(param ip 10.77.0.2/24)" dev "$iface"
    ping -c 3 -W 5 "$(param peer 10.77.0.1)" >/tmp/ping 2>&1
    rc=$?
    received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping)
    say "result net iface=$iface mac=$(cat "/sys/class/net/$iface/address") ping_rc=$rc received=${received:-0} features=$(cat "/sys/class/net/$iface/device/features")"
}

# watchdog PID: kills PID after rig.net_timeout seconds (default 120), so that a stalled
# transfer ends the test instead of the boot; prints the watchdog's PID.
watchdog() {
    # Its output must not be the caller's $(...) pipe, or the caller waits for it.
    (
        sleep "$(param net_timeout 120)"
        kill "$1"
    ) >/dev/null 2>&1 &
    echo $!
}

# nettx: rig.net_mib MiB of random data to rig.peer port 5001 over TCP (the host listens).
t_nettx() {
    mib=$(param net_mib 64)
    dd if=/dev/urandom of=/tmp/tx bs=$MIB count="$mib" 2>/dev/null
    sum=$(md5sum </tmp/tx | cut -d' ' -f1)
    start=$(uptime_s)
    nc -w 10 "$(param peer 10.77.0.1)" 5001 </tmp/tx 2>/tmp/err &
    sender=$!
    dog=$(watchdog $sender)
    wait $sender
    rc=$?
    kill "$dog" 2>/dev/null
    seconds=$(elapsed_s "$start")
    rm -f /tmp/tx
    say "result nettx bytes=$((mib * MIB)) md5=$sum rc=$rc seconds=$seconds err=$(tr ' \n' '_ ' </tmp/err | tail -c 120)"
}

# netrx: listens on port 5002, asks the host to send, and reports what arrived. nc's stdin is a
# FIFO held open, so that it stops at the sender's end of stream, not at its own.
t_netrx() {
    rm -f /tmp/hold /tmp/rx
    mkfifo /tmp/hold
    nc -l -p 5002 </tmp/hold >/tmp/rx 2>/tmp/err &
    listener=$!
    exec 3>/tmp/hold
    dog=$(watchdog $listener)
    start=$(uptime_s)
    say "host-action netrx"
    wait "$listener"
    rc=$?
    seconds=$(elapsed_s "$start")
    kill "$dog" 2>/dev/null
    exec 3>&-
    say "result netrx bytes=$(wc -c </tmp/rx) md5=$(md5sum </tmp/rx | cut -d' ' -f1) rc=$rc seconds=$seconds"
    rm -f /tmp/rx /tmp/hold
}

say "init uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) cmdline=$(tr ' ' '|' </proc/cmdline)"
load_modules
say "modules-loaded uptime=$(cut -d' ' -f1 /proc/uptime)"
tests=$(param tests "" | tr , ' ')
if [ -n "$tests" ] && [ "$(param disk 1)" = 1 ] && ! wait_vda; then
    say "no-vda"
    finish
fi
for t in $tests; do
    say "begin $t uptime=$(cut -d' ' -f1 /proc/uptime)"
    "t_$t"
done
finish
