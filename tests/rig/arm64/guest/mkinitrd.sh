#!/bin/bash
# Builds the rig's guest initramfs: static busybox, the benchmark helper, the virtio modules in
# dependency order, /init.
# usage: mkinitrd.sh <kernel-tree-root> <kernel-version> <busybox-binary> <rigbench-binary> <out.cpio.gz>
set -euo pipefail
KROOT=$1
KVER=$2
BUSYBOX=$3
RIGBENCH=$4
OUT=$5
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rig-initrd.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$BUSYBOX" "$WORK/bin/busybox"
cp "$RIGBENCH" "$WORK/bin/rigbench"
cp "$HERE/init" "$WORK/init"
chmod 755 "$WORK/init" "$WORK/bin/busybox" "$WORK/bin/rigbench"

# Dependency order (modules.dep): failover before net_failover before virtio_net.
MODS="drivers/virtio/virtio_mmio drivers/block/virtio_blk net/core/failover drivers/net/net_failover
      drivers/net/virtio_net drivers/char/virtio_console"
: > "$WORK/lib/modules/order"
for m in $MODS; do
    src=$KROOT/lib/modules/$KVER/kernel/$m
    name=$(basename "$m").ko
    if [ -f "$src.ko" ]; then
        cp "$src.ko" "$WORK/lib/modules/$name"
    elif [ -f "$src.ko.xz" ]; then
        xz -dc "$src.ko.xz" > "$WORK/lib/modules/$name"
    else
        continue # built into this kernel
    fi
    echo "$name" >> "$WORK/lib/modules/order"
done

(cd "$WORK" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
