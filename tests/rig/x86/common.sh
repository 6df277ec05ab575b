# Shared settings for the x86 real-guest rig. Sourced by the other scripts in this directory.
# shellcheck shell=bash
# shellcheck disable=SC2034 # RIG_BOOT_* and RIG_RUN are read by the scripts that source this file

RIG_SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$RIG_SRC_DIR/../../.." && pwd)
# Everything downloaded or built by setup.sh lives here; rerunning setup.sh reuses it.
RIG_BUILD_DIR=${RIG_BUILD_DIR:-$REPO_ROOT/build/rig-x86}
RIG_KERNEL=$RIG_BUILD_DIR/vmlinux
RIG_INITRAMFS=$RIG_BUILD_DIR/initramfs.cpio

rig_log() { printf '[rig] %s\n' "$*" >&2; }
rig_die() {
    printf '[rig] error: %s\n' "$*" >&2
    exit 1
}

# Seconds since the epoch with millisecond precision, for timings.
rig_now() { date +%s.%N | cut -c1-14; }
rig_elapsed() { awk -v a="$1" -v b="$(rig_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Runs setup.sh (fast when everything is cached; it also rebuilds the initramfs after init.sh
# changed) unless RIG_SKIP_SETUP=1, then checks that the guest and QEMU are there.
rig_setup() {
    if [[ ${RIG_SKIP_SETUP:-0} != 1 ]]; then
        "$RIG_SRC_DIR/setup.sh" "$@" >&2 || rig_die "setup.sh failed"
    fi
    [[ -f $RIG_KERNEL && -f $RIG_INITRAMFS ]] ||
        rig_die "guest kernel/initramfs missing in $RIG_BUILD_DIR: run tests/rig/x86/setup.sh"
    command -v qemu-system-x86_64 >/dev/null || rig_die "qemu-system-x86_64 missing: run setup.sh"
}

# ---- running guests -------------------------------------------------------------------------

# Scratch directory for images, sockets and logs of one run: tmpfs when available.
rig_make_run_dir() {
    local base=/dev/shm
    [[ -d $base && -w $base ]] || base=${TMPDIR:-/tmp}
    RIG_RUN=$(mktemp -d "$base/hvisor-vhost-rig.XXXXXX")
}

# Called for each "RIG: host-action NAME" line; the scripts that boot guests override it.
rig_host_action() { rig_log "unhandled host action: $1"; }

# rig_boot NAME TIME_LIMIT SMP APPEND [QEMU_ARGS...]
# Boots the guest under TCG and streams its serial console into $RIG_RUN/NAME.log, calling
# rig_host_action while the guest waits. Sets RIG_BOOT_RC (QEMU's exit status), RIG_BOOT_SECONDS
# and RIG_BOOT_LOG. QEMU's pid is in $RIG_RUN/qemu.pid while it runs.
rig_boot() {
    local name=$1 limit=$2 smp=$3 append=$4
    shift 4
    local fifo=$RIG_RUN/$name.serial start line qemu_job
    RIG_BOOT_LOG=$RIG_RUN/$name.log
    rm -f "$fifo" "$RIG_RUN/qemu.pid" "$RIG_BOOT_LOG"
    mkfifo "$fifo"
    start=$(rig_now)
    timeout -k 5 "$limit" qemu-system-x86_64 -accel tcg -m 512 -smp "$smp" \
        -nodefaults -no-user-config -display none -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -kernel "$RIG_KERNEL" -initrd "$RIG_INITRAMFS" \
        -append "console=ttyS0 panic=-1 quiet $append" \
        -serial stdio -pidfile "$RIG_RUN/qemu.pid" "$@" </dev/null >"$fifo" 2>&1 &
    qemu_job=$!
    while IFS= read -r line; do
        line=${line%$'\r'}
        printf '%s\n' "$line" >>"$RIG_BOOT_LOG"
        case $line in
        "RIG: host-action "*) rig_host_action "${line#RIG: host-action }" ;;
        esac
    done <"$fifo"
    RIG_BOOT_RC=0
    wait "$qemu_job" 2>/dev/null || RIG_BOOT_RC=$?
    RIG_BOOT_SECONDS=$(rig_elapsed "$start")
    rm -f "$fifo"
}

# rig_result TEST: the key=value part of the guest's first "RIG: result TEST ..." line.
rig_result() { sed -n "s/^RIG: result $1 //p" "$RIG_BOOT_LOG" | head -n 1; }
# rig_field "KEY=VALUE ..." KEY
rig_field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -n 1; }

# Whether the guest negotiated virtio feature bit N (the "features=" string from the info test
# holds one character per bit, bit 0 first).
rig_has_feature() { [[ ${1:$2:1} == 1 ]]; }

# ---- verdicts -------------------------------------------------------------------------------

RIG_PASSED=0
RIG_FAILED=0
RIG_NA=0
rig_pass() {
    RIG_PASSED=$((RIG_PASSED + 1))
    printf 'PASS %s%s\n' "$1" "${2:+ ($2)}"
}
rig_fail() {
    RIG_FAILED=$((RIG_FAILED + 1))
    printf 'FAIL %s: %s\n' "$1" "$2"
}
rig_na() {
    RIG_NA=$((RIG_NA + 1))
    printf 'N/A  %s: %s\n' "$1" "$2"
}
# rig_expect LABEL ACTUAL EXPECTED
rig_expect() {
    if [[ $2 == "$3" ]]; then rig_pass "$1" "$2"; else rig_fail "$1" "got '$2', expected '$3'"; fi
}
