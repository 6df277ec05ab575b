#!/bin/bash
# Boots the REAL hvisor (qemu-gicv3) under QEMU TCG with Debian's arm64 Linux as zone0, loads
# hvisor-tool's hvisor.ko there, starts the virtio daemon (our bridge, or hvisor-tool's own),
# starts zone1 (a second Debian Linux) with `hvisor zone start`, and checks zone1's virtio
# devices with its stock drivers: all in one boot, driven through the serial console by drive.py.
#
# usage: run.sh [--module b17d9dd|7e55b1b] [--daemon ours|hvisor-tool] [--test LIST]
#               [--xfail LIST] [--verbose] [--keep]
#   --module   which hvisor-tool commit's hvisor.ko and CLI (default b17d9dd: eventfd wakeup;
#              7e55b1b: signal wakeup)
#   --daemon   ours (default): hvisor-vhost-bridge with our backends;
#              hvisor-tool: `hvisor virtio start` (the baseline: blk, console and net)
#   --test     checks, comma separated (default: all): module, init-order, daemon-ready,
#              zone-start, devices, blk, blk-direct, console, net, reset, shutdown,
#              shutdown-reset-log, stop; and bench (never by default: bench.sh's measurements,
#              with zone1 reduced to the devices both daemons serve: blk on an image, the
#              console, and net unless RIG_BENCH_NET_MIB=0)
#   --xfail    checks expected to fail: reported as XFAIL (or XPASS) and not counted as failures
#   --verbose  stream the serial console
#   --keep     keep the run directory (serial log, generated DTBs, configs, initramfs images)
# Environment: RIG_BUILD (default <repo>/build/rig-hvisor; setup.sh's output is in its out/),
#   RIG_RUN_DIR (default: a new directory under RIG_BUILD), RIG_TIMEOUT (seconds for each wait,
#   default 120), RIG_BLK_MIB (default 32), RIG_NET_MIB (default 16), RIG_NET_TIMEOUT (seconds
#   for each TCP transfer, default 180), RIG_CONSOLE_BYTES
#   (default 1048576), RIG_HVISOR_BIN (an hvisor.bin to use instead of setup.sh's),
#   RIG_WINDOWS=per-device (one hvisor trap region per device, so that every QueueNotify is
#   asynchronous; default shared: the example's one region, where only 0xa000050 is),
#   RIG_ZONE1_NET_PARAMS (zone1's virtio_net module parameters, e.g. "csum=0 gso=0"),
#   RIG_NO_CARGO=1 (do not run cross-build.sh first), RIG_BIN_DIR (our four static aarch64
#   binaries from elsewhere, e.g. another commit's; implies no cross-build), RIG_TARBALL (the
#   board tarball of scripts/build-board.sh: unpacked into a prefix as a user installs it, and
#   its bin/ put in zone0; implies no cross-build). For --test bench:
#   RIG_LOAD_BIN (bench.sh's static aarch64 rigload, put in both zones), RIG_BENCH_MIB (default
#   32), RIG_BENCH_RAND (4 KiB random reads, and as many writes, at QD1; default 1000),
#   RIG_BENCH_QD (default 32), RIG_BENCH_QD_RAND (4 KiB random reads, and as many writes, at
#   that depth; default 4000), RIG_BENCH_CONSOLE (bytes each way, default 262144),
#   RIG_BENCH_NET_MIB (TCP each way, default 2; 0: no net device), RIG_BENCH_PINGS (default
#   100), RIG_BRIDGE_ARGS (extra options for our bridge, e.g. "--spin-us 0").
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../../.." && pwd)
BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
OUT=$BUILD/out
TIMEOUT=${RIG_TIMEOUT:-120}
BLK_MIB=${RIG_BLK_MIB:-32}
NET_MIB=${RIG_NET_MIB:-16}
NET_TIMEOUT=${RIG_NET_TIMEOUT:-180}
CONSOLE_BYTES=${RIG_CONSOLE_BYTES:-1048576}
DISK_MIB=64
WINDOWS=${RIG_WINDOWS:-shared}

MODULE=b17d9dd
DAEMON=ours
TESTS=all
XFAIL=""
VERBOSE=0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --module) MODULE=$2; shift 2 ;;
    --daemon) DAEMON=$2; shift 2 ;;
    --test) TESTS=$2; shift 2 ;;
    --xfail) XFAIL=$2; shift 2 ;;
    --verbose) VERBOSE=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$DAEMON" in ours | hvisor-tool) ;; *) echo "run.sh: bad --daemon $DAEMON" >&2; exit 2 ;; esac
BENCH=0
case ",$TESTS," in *,bench,*) BENCH=1 ;; esac
# The bench's net rows, and with them zone1's net device (both daemons serve one on the TAP).
BENCH_NET=0
[ "$BENCH" = 1 ] && [ "${RIG_BENCH_NET_MIB:-2}" != 0 ] && BENCH_NET=1
if [ "$BENCH" = 1 ] && [ ! -x "${RIG_LOAD_BIN:-}" ]; then
    echo "run.sh: --test bench needs RIG_LOAD_BIN (bench.sh builds it)" >&2
    exit 2
fi
[ "$BLK_MIB" -le "$DISK_MIB" ] || { echo "run.sh: RIG_BLK_MIB is at most $DISK_MIB" >&2; exit 2; }

log() { echo "[hvisor-rig] $*" >&2; }
die() { echo "[hvisor-rig] error: $*" >&2; exit 1; }

[ -f "$OUT/READY" ] || die "$OUT/READY missing: run tests/rig/hvisor/setup.sh first"
TOOL=$OUT/hvisor-tool/$MODULE
if [ ! -f "$TOOL/hvisor.ko" ] || [ ! -x "$TOOL/hvisor" ]; then
    die "no hvisor-tool $MODULE in $OUT/hvisor-tool (known: $(cd "$OUT/hvisor-tool" && echo *))"
fi
HVISOR_BIN=${RIG_HVISOR_BIN:-$OUT/hvisor.bin}
for f in "$HVISOR_BIN" "$OUT/u-boot-atf.bin" "$OUT/zone0.dts" "$OUT/Image" "$OUT/busybox"; do
    [ -f "$f" ] || die "$f missing (setup.sh's output)"
done
BIN=${RIG_BIN_DIR:-$OUT/bin}
if [ -n "${RIG_TARBALL:-}" ]; then
    [ -f "$RIG_TARBALL" ] || die "RIG_TARBALL=$RIG_TARBALL missing (scripts/build-board.sh makes it)"
elif [ "$DAEMON" = ours ]; then
    # Our binaries from the working tree, as the other rigs build theirs (incremental).
    if [ -z "${RIG_BIN_DIR:-}" ] && [ "${RIG_NO_CARGO:-0}" != 1 ]; then
        "$RIG_DIR/cross-build.sh"
    fi
    for b in hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console; do
        [ -x "$BIN/$b" ] || die "$BIN/$b missing: run tests/rig/hvisor/cross-build.sh"
    done
fi
# The upstream example zone1 is made from: its JSON and device tree.
EXAMPLE=$(dirname "$(find "$TOOL/examples" -name zone1_linux.json | head -n1)")
[ -f "$EXAMPLE/linux2.dts" ] || die "hvisor-tool $MODULE's with_virtio_blk_console example missing under $TOOL/examples"
for t in qemu-system-aarch64 dtc cpio python3; do
    command -v "$t" > /dev/null || die "$t missing (setup.sh installs it)"
done

if [ -n "${RIG_RUN_DIR:-}" ]; then
    RUN=$RIG_RUN_DIR
    mkdir -p "$RUN"
else
    mkdir -p "$BUILD/runs"
    RUN=$(mktemp -d "$BUILD/runs/$MODULE-$DAEMON.XXXXXX")
fi
DRIVER_PID=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    # drive.py kills QEMU itself; this covers run.sh or the driver being interrupted.
    [ -z "$DRIVER_PID" ] || kill "$DRIVER_PID" 2> /dev/null || true
    if [ -f "$RUN/qemu.pid" ]; then kill -9 "$(cat "$RUN/qemu.pid")" 2> /dev/null || true; fi
    if [ "$KEEP" = 1 ]; then log "run directory kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
GEN=$RUN/gen
ROOT0=$RUN/zone0-root
mkdir -p "$GEN" "$ROOT0"
if [ -n "${RIG_TARBALL:-}" ]; then
    # As the README tells a board user: unpack into a prefix, run what its bin/ holds.
    mkdir -p "$RUN/prefix"
    tar -C "$RUN/prefix" --strip-components=1 -xzf "$RIG_TARBALL"
    BIN=$RUN/prefix/bin
    for b in hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console; do
        [ -x "$BIN/$b" ] || die "$RIG_TARBALL has no executable bin/$b"
    done
    log "our binaries from $RIG_TARBALL"
fi

# ---- zone1: initramfs, device tree, zone config --------------------------------------------
"$RIG_DIR/zone1/mkinitrd.sh" "$OUT/modules" "$OUT/busybox" "$GEN/zone1-initrd.cpio.gz"
if [ "$BENCH" = 1 ]; then
    # The load program as a second archive after the first: the kernel unpacks both.
    mkdir -p "$GEN/load/bin"
    cp "$RIG_LOAD_BIN" "$GEN/load/bin/rigload"
    (cd "$GEN/load" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >> "$GEN/zone1-initrd.cpio.gz"
fi
ZONE1_INITRD=0x5c000000
ZONE1_INITRD_END=$(printf '0x%x' $((ZONE1_INITRD + $(stat -c %s "$GEN/zone1-initrd.cpio.gz"))))
# The example's device tree, with our bootargs and initrd, and two more transports (net and
# the O_DIRECT disk) on SPIs zone0 does not own (board.rs gives it 77 and 79). hvc0 is not made
# the kernel's console: on its console the hvc driver takes ^O as a SysRq prefix and eats the
# byte after it, so the console check's random bytes would not arrive intact (and a ^O b would
# reboot zone1). zone1's init prints what the checks need on hvc0 itself.
{
    cat "$EXAMPLE/linux2.dts"
    cat <<EOF
/ {
	chosen {
		/delete-property/ stdout-path;
		bootargs = "console=ttynull rdinit=/init";
		linux,initrd-start = <0x0 $ZONE1_INITRD>;
		linux,initrd-end = <0x0 $ZONE1_INITRD_END>;
	};
EOF
    # The bench config has net only when it measures it (RIG_BENCH_NET_MIB).
    { [ "$BENCH" = 0 ] || [ "$BENCH_NET" = 1 ]; } && cat <<EOF
	virtio_mmio@a003600 {
		dma-coherent;
		interrupt-parent = <0x01>;
		interrupts = <0x0 0x2b 0x1>;
		reg = <0x0 0xa003600 0x0 0x200>;
		compatible = "virtio,mmio";
	};
EOF
    # The O_DIRECT disk is ours only: hvisor-tool's daemon crashes (SIGSEGV) on an access to a
    # window it serves no device in.
    [ "$DAEMON" = ours ] && [ "$BENCH" = 0 ] && cat <<EOF
	virtio_mmio@a003400 {
		dma-coherent;
		interrupt-parent = <0x01>;
		interrupts = <0x0 0x2a 0x1>;
		reg = <0x0 0xa003400 0x0 0x200>;
		compatible = "virtio,mmio";
	};
EOF
    echo "};"
} > "$GEN/zone1.dts"
dtc -q -I dts -O dtb -o "$GEN/zone1.dtb" "$GEN/zone1.dts"

# The example's zone config: our paths, the initramfs as a module, the two extra SPIs, and the
# "pci_config" that hvisor-tool b17d9dd requires. Then the daemon configs: ours as committed,
# a copy the bridge must reject (an unknown field), and hvisor-tool's (no O_DIRECT disk: hvisor-tool
# has no such option).
python3 - "$EXAMPLE/zone1_linux.json" "$RIG_DIR/virtio_cfg.json" "$GEN" "$ZONE1_INITRD" "$WINDOWS" "$BENCH" "$BENCH_NET" <<'EOF'
import json, sys
example, ours, gen, initrd, windows, bench, bench_net = sys.argv[1:]
z = json.load(open(example))
cfg = json.load(open(ours))
if bench == "1":
    # Both daemons' devices: the buffered disk, the console, and net when measured.
    kinds = ("console", "net") if bench_net == "1" else ("console",)
    for zone in cfg["zones"]:
        zone["devices"] = [d for d in zone["devices"]
                           if d["type"] in kinds or (d["type"] == "blk" and not d.get("direct"))]
if windows == "per-device":
    # One trap region per device instead of the example's shared one: every QueueNotify is
    # then at offset 0x50 of its region, which hvisor treats as asynchronous.
    z["memory_regions"] = [r for r in z["memory_regions"] if r["type"] != "virtio"] + [
        {"type": "virtio", "physical_start": d["addr"], "virtual_start": d["addr"], "size": d["len"]}
        for d in cfg["zones"][0]["devices"]]
    cfg["zones"][0].pop("virtio_windows")
z["kernel_filepath"] = "/rig/zone1/Image"
z["dtb_filepath"] = "/rig/zone1/zone1.dtb"
z["interrupts"] = sorted(set(z["interrupts"]) | {74, 75})
z["pci_config"] = []
z["modules"] = [{"name": "initrd", "filepath": "/rig/zone1/initrd.cpio.gz", "load_paddr": initrd}]
json.dump(z, open(gen + "/zone1.json", "w"), indent=4)
json.dump(cfg, open(gen + "/virtio_cfg.json", "w"), indent=4)
bad = json.loads(json.dumps(cfg))
bad["zones"][0]["devices"][0]["rig_unknown_field"] = 1
json.dump(bad, open(gen + "/bad_cfg.json", "w"), indent=4)
tool = json.loads(json.dumps(cfg))
for zone in tool["zones"]:
    zone.pop("virtio_windows", None)
    keep = []
    for d in zone["devices"]:
        if d["type"] in ("console", "net") or (d["type"] == "blk" and not d.get("direct")):
            for k in ("serial", "direct", "num_queues", "queue_size", "backend"):
                d.pop(k, None)
            keep.append(d)
    zone["devices"] = keep
json.dump(tool, open(gen + "/virtio_cfg_tool.json", "w"), indent=4)
EOF

# ---- zone0: initramfs and device tree -------------------------------------------------------
mkdir -p "$ROOT0"/{bin,sbin,proc,sys,dev,tmp,lib/modules,rig/bin,rig/tool,rig/zone1}
cp "$OUT/busybox" "$ROOT0/bin/busybox"
cp "$RIG_DIR/zone0/init" "$ROOT0/init"
cp "$RIG_DIR/zone0/lib.sh" "$ROOT0/rig/lib.sh"
cp "$GEN/virtio_cfg.json" "$GEN/bad_cfg.json" "$GEN/virtio_cfg_tool.json" "$ROOT0/rig/"
cp "$TOOL/hvisor.ko" "$TOOL/hvisor" "$ROOT0/rig/tool/"
if [ "$DAEMON" = ours ]; then
    for b in hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console; do cp "$BIN/$b" "$ROOT0/rig/bin/"; done
fi
[ "$BENCH" = 0 ] || cp "$RIG_LOAD_BIN" "$ROOT0/rig/bin/rigload"
cp "$OUT/Image" "$ROOT0/rig/zone1/Image"
cp "$GEN/zone1.dtb" "$GEN/zone1.json" "$ROOT0/rig/zone1/"
cp "$GEN/zone1-initrd.cpio.gz" "$ROOT0/rig/zone1/initrd.cpio.gz"
: > "$ROOT0/lib/modules/order"
for m in virtio_mmio virtio_blk tun; do
    if [ -f "$OUT/modules/$m.ko" ]; then
        cp "$OUT/modules/$m.ko" "$ROOT0/lib/modules/"
    elif [ -f "$OUT/modules/$m.ko.xz" ]; then
        xz -dc "$OUT/modules/$m.ko.xz" > "$ROOT0/lib/modules/$m.ko"
    else
        continue # built into the kernel
    fi
    echo "$m.ko" >> "$ROOT0/lib/modules/order"
done
chmod 755 "$ROOT0/init" "$ROOT0/bin/busybox"
# Uncompressed: unpacking under TCG costs less than gunzip (the zone1 kernel is most of it).
(cd "$ROOT0" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$GEN/zone0-initrd.cpio"
rm -rf "$ROOT0"
ZONE0_INITRD=0x90000000
ZONE0_INITRD_END=$(printf '0x%x' $((ZONE0_INITRD + $(stat -c %s "$GEN/zone0-initrd.cpio"))))
[ $((ZONE0_INITRD_END)) -le $((0xa0000000)) ] || die "zone0's initramfs is too big for 0x90000000..0xa0000000"
{
    cat "$OUT/zone0.dts"
    cat <<EOF
/ {
	chosen {
		bootargs = "clk_ignore_unused earlycon console=ttyAMA0 rdinit=/init iomem=relaxed nokaslr";
		stdout-path = "/pl011@9000000";
		linux,initrd-start = <0x0 $ZONE0_INITRD>;
		linux,initrd-end = <0x0 $ZONE0_INITRD_END>;
	};
};
EOF
} > "$GEN/zone0.dts"
dtc -q -I dts -O dtb -o "$GEN/zone0.dtb" "$GEN/zone0.dts"

# zone0's own disk on QEMU's last virtio-mmio transport (0xa003e00, SPI 47 = INTID 79, both
# zone0's in hvisor's board config): the image of zone1's O_DIRECT device, which needs a file
# system or device that supports O_DIRECT (zone0's tmpfs does not on Linux 6.1).
truncate -s "${DISK_MIB}M" "$RUN/zone0-disk.img"

# ---- QEMU (hvisor's platform.mk for qemu-gicv3) ---------------------------------------------
{
    printf '%s\n' qemu-system-aarch64 -machine virt,secure=on,gic-version=3,virtualization=on,iommu=smmuv3 \
        -global arm-smmuv3.stage=2 -cpu cortex-a72 -smp 4 -m 2G \
        -display none -monitor none -serial stdio -no-reboot \
        -name hvisor-rig,debug-threads=on \
        -bios "$OUT/u-boot-atf.bin" \
        -device "loader,file=$HVISOR_BIN,addr=0x40400000,force-raw=on" \
        -device "loader,file=$OUT/Image,addr=0xa0400000,force-raw=on" \
        -device "loader,file=$GEN/zone0.dtb,addr=0xa0000000,force-raw=on" \
        -device "loader,file=$GEN/zone0-initrd.cpio,addr=$ZONE0_INITRD,force-raw=on" \
        -drive "if=none,file=$RUN/zone0-disk.img,id=zone0disk,format=raw" \
        -device virtio-blk-device,drive=zone0disk,bus=virtio-mmio-bus.31
    # romfile=: QEMU's efi-virtio.rom is not installed (and not needed).
    for n in 1 2 3; do
        printf '%s\n' -netdev "user,id=net$n" \
            -device "virtio-net-pci,netdev=net$n,disable-legacy=on,disable-modern=off,iommu_platform=on,romfile="
    done
} > "$GEN/qemu.argv"

[ "$TESTS" = all ] && TESTS=""
DRIVE=(python3 "$RIG_DIR/drive.py" --qemu-argv "$GEN/qemu.argv" --log "$RUN/serial.log" --qemu-pid-file "$RUN/qemu.pid"
    --daemon "$DAEMON" --timeout "$TIMEOUT" --blk-mib "$BLK_MIB" --disk-mib "$DISK_MIB"
    --net-mib "$NET_MIB" --net-timeout "$NET_TIMEOUT" --console-bytes "$CONSOLE_BYTES" --xfail "$XFAIL"
    --devices "$(python3 -c 'import json, sys; print(sum(d.get("status", "enable") == "enable"
        for z in json.load(open(sys.argv[1]))["zones"] for d in z["devices"]))' "$GEN/virtio_cfg.json")")
[ -n "$TESTS" ] && DRIVE+=(--tests "$TESTS")
[ "$BENCH" = 1 ] && DRIVE+=(--bench-mib "${RIG_BENCH_MIB:-32}" --bench-rand "${RIG_BENCH_RAND:-1000}"
    --bench-qd "${RIG_BENCH_QD:-32}" --bench-qd-rand "${RIG_BENCH_QD_RAND:-4000}"
    --bench-console "${RIG_BENCH_CONSOLE:-262144}" --bench-net-mib "${RIG_BENCH_NET_MIB:-2}"
    --bench-pings "${RIG_BENCH_PINGS:-100}")
# hvisor-tool's daemon: no O_DIRECT disk, and the bridge-only checks do not apply.
[ "$DAEMON" = hvisor-tool ] && [ -z "$TESTS" ] && DRIVE+=(--tests "module,daemon-ready,zone-start,devices,blk,console,net,reset,shutdown,stop")
[ -n "${RIG_BRIDGE_ARGS:-}" ] && DRIVE+=("--bridge-args=$RIG_BRIDGE_ARGS")
[ "$VERBOSE" = 1 ] && DRIVE+=(--verbose)
log "hvisor $(basename "$HVISOR_BIN"), hvisor-tool $MODULE, daemon $DAEMON, run directory $RUN"
set +e
"${DRIVE[@]}" &
DRIVER_PID=$!
wait "$DRIVER_PID"
rc=$?
DRIVER_PID=""
set -e
if [ "$rc" = 0 ]; then
    echo "hvisor rig: PASSED (module $MODULE, daemon $DAEMON)"
else
    echo "hvisor rig: FAILED (module $MODULE, daemon $DAEMON; serial log: $RUN/serial.log$([ "$KEEP" = 1 ] || echo ', removed: use --keep'))"
fi
exit "$rc"
