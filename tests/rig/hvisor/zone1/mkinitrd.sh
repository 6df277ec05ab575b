#!/bin/bash
# Builds zone1's initramfs: static busybox, the virtio modules in dependency order, /init.
# usage: mkinitrd.sh <modules-dir> <busybox> <out.cpio.gz>
#   <modules-dir> holds the kernel's modules flat (NAME.ko or NAME.ko.xz).
set -euo pipefail
MODDIR=$1
BUSYBOX=$2
OUT=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvisor-rig-zone1.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$BUSYBOX" "$WORK/bin/busybox"
cp "$HERE/init" "$WORK/init"
chmod 755 "$WORK/init" "$WORK/bin/busybox"

# Dependency order (modules.dep): failover before net_failover before virtio_net.
: > "$WORK/lib/modules/order"
for m in virtio_mmio virtio_blk failover net_failover virtio_net virtio_console; do
    if [ -f "$MODDIR/$m.ko" ]; then
        cp "$MODDIR/$m.ko" "$WORK/lib/modules/$m.ko"
    elif [ -f "$MODDIR/$m.ko.xz" ]; then
        xz -dc "$MODDIR/$m.ko.xz" > "$WORK/lib/modules/$m.ko"
    else
        continue # built into this kernel
    fi
    echo "$m.ko" >> "$WORK/lib/modules/order"
done

# Parameters for virtio_net (e.g. "csum=0 gso=0"), from the environment.
[ -z "${RIG_ZONE1_NET_PARAMS:-}" ] || echo "$RIG_ZONE1_NET_PARAMS" > "$WORK/lib/modules/virtio_net.params"

(cd "$WORK" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
