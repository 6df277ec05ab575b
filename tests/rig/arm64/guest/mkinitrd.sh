#!/bin/bash
# Builds the rig's guest initramfs: static busybox, the guest helper, the modules of guest/modules
# with their dependencies in dependency order, /init.
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

# The modules of guest/modules and their dependencies, each after what it needs (modules.dep).
MODDIR=$KROOT/lib/modules/$KVER
: > "$WORK/lib/modules/order"
for m in $("$HERE/moddeps.py" "$HERE/modules" "$MODDIR/modules.dep"); do
    name=$(basename "$m")
    if [ -f "$MODDIR/$m" ]; then
        cp "$MODDIR/$m" "$WORK/lib/modules/$name"
    else
        xz -dc "$MODDIR/$m.xz" > "$WORK/lib/modules/$name"
    fi
    echo "$name" >> "$WORK/lib/modules/order"
done

(cd "$WORK" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
