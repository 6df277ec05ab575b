#!/usr/bin/env python3
"""Derives everything the arm64 rig needs from ONE hvisor-tool style config (virtio_cfg.json).

  gen.py env CONFIG                       shell assignments for run.sh (layout, zone, devices)
  gen.py build CONFIG --virt-dtb F --out DIR --bootargs S --initrd-size N [--doorbell] [--local-empty | --baseline]
                                          DIR/rig_config.h (the EL2 stub's parameters) and
                                          DIR/rig.dts + DIR/rig.dtb (the guest's device tree)

Guest memory layout (QEMU virt, RAM at 0x40000000):
  RAM base + 2 MiB     kernel Image          RAM base + 64 MiB   device tree blob
  RAM base + 128 MiB   initramfs             top 2 MiB of RAM    EL2 stub, its stacks, page tables;
                                                                 its last page is the bridge page.
The top 2 MiB are removed from the guest's memory node and left out of stage 2.
"""
import argparse
import json
import re
import shlex
import subprocess
import sys

RAM_BASE = 0x40000000
MIB = 1 << 20
PAGE = 0x1000
STUB_REGION = 2 * MIB
KERNEL_OFFSET = 2 * MIB
DTB_OFFSET = 64 * MIB
INITRD_OFFSET = 128 * MIB
STACK_SIZE = 0x4000
MAX_CPUS = 8
DEVICE_TYPES = {"net": 1, "blk": 2, "console": 3, "rng": 4, "scsi": 8, "vsock": 19, "fs": 26}
DOORBELL_NODE = "pl011@9040000"
QUEUE_NOTIFY = 0x50  # window offset hvisor treats as an asynchronous QueueNotify
# The stub's counter page: trapped like a window page but answered by the stub itself with its
# statistics (the guest's benchmark samples them). Free space in QEMU virt's memory map.
COUNTER_PAGE = 0x0b000000


def num(value, what):
    if isinstance(value, bool):
        raise SystemExit(f"config: {what} must be a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise SystemExit(f"config: {what} is not a number: {value!r}")


def load(path):
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    zones = cfg.get("zones") or []
    if len(zones) != 1:
        raise SystemExit("config: the rig runs exactly one zone")
    zone = zones[0]
    regions = zone.get("memory_region") or []
    if len(regions) != 1:
        raise SystemExit("config: the rig expects one memory_region (the guest RAM)")
    region = regions[0]
    ram_base = num(region["zonex_ipa"], "zonex_ipa")
    ram_size = num(region["size"], "size")
    if ram_base != RAM_BASE:
        raise SystemExit(f"config: zonex_ipa must be {RAM_BASE:#x} (QEMU virt RAM base)")
    if ram_size % (2 * MIB) or ram_size < 256 * MIB or ram_size > 3 * 1024 * MIB:
        raise SystemExit("config: RAM size must be a multiple of 2 MiB, 256 MiB .. 3 GiB")
    devices = []
    for i, d in enumerate(zone.get("devices") or []):
        if d.get("status", "enable") == "disable":
            continue
        dtype = d.get("type")
        if dtype not in DEVICE_TYPES:
            raise SystemExit(f"config: device {i}: unsupported type {dtype!r}")
        addr = num(d["addr"], "addr")
        length = num(d["len"], "len")
        irq = num(d["irq"], "irq")
        if not 32 <= irq < 1020:
            raise SystemExit(f"config: device {i}: irq {irq} is not a GIC SPI INTID (32..1019)")
        if addr >= RAM_BASE or addr + length > RAM_BASE or length == 0:
            raise SystemExit(f"config: device {i}: window {addr:#x}+{length:#x} not in device space")
        if addr < COUNTER_PAGE + PAGE and addr + length > COUNTER_PAGE:
            raise SystemExit(f"config: device {i}: overlaps the stub's counter page {COUNTER_PAGE:#x}")
        devices.append({"type": dtype, "addr": addr, "len": length, "irq": irq})
    if not devices:
        raise SystemExit("config: no enabled device")
    windows = []
    for i, w in enumerate(zone.get("virtio_windows") or []):
        base, size = num(w["base"], "virtio_windows base"), num(w["size"], "virtio_windows size")
        if size == 0 or base + size > RAM_BASE:
            raise SystemExit(f"config: virtio_windows[{i}] not in device space")
        if base < COUNTER_PAGE + PAGE and base + size > COUNTER_PAGE:
            raise SystemExit(f"config: virtio_windows[{i}] overlaps the stub's counter page {COUNTER_PAGE:#x}")
        windows.append((base, size))
    end = ram_base + ram_size
    return {
        "zone": num(zone.get("id", 0), "id"),
        "zone0_ipa": num(region["zone0_ipa"], "zone0_ipa"),
        "ram_base": ram_base,
        "ram_size": ram_size,
        "stub_base": end - STUB_REGION,
        "bridge": end - PAGE,
        "kernel": ram_base + KERNEL_OFFSET,
        "dtb": ram_base + DTB_OFFSET,
        "initrd": ram_base + INITRD_OFFSET,
        "devices": devices,
        "windows": windows,
    }


def windows_of(layout):
    """hvisor traps whole zone-config 'virtio' regions and applies the QueueNotify (0x50) rule
    relative to their base. The config's optional `virtio_windows` names them (as the bridge
    reads it); without it every device is its own window."""
    return layout["windows"] or [(d["addr"], d["len"]) for d in layout["devices"]]


def async_notify_devices(layout):
    """The devices whose QueueNotify hvisor (and the stub) treats as asynchronous: those that
    cover offset 0x50 of their window. The others' notifies are synchronous writes."""
    return [d for d in layout["devices"]
            for base, _ in windows_of(layout)
            if d["addr"] <= base + QUEUE_NOTIFY < d["addr"] + d["len"]]


def holes_of(windows):
    return sorted({p for base, size in windows for p in range(base & ~(PAGE - 1), base + size, PAGE)})


def cmd_env(args):
    lay = load(args.config)
    out = {
        "RIG_ZONE_ID": lay["zone"],
        "RIG_RAM_BASE": hex(lay["ram_base"]),
        "RIG_RAM_SIZE": hex(lay["ram_size"]),
        "RIG_RAM_MIB": lay["ram_size"] // MIB,
        "RIG_ZONE0_IPA": hex(lay["zone0_ipa"]),
        "RIG_BRIDGE_GPA": hex(lay["bridge"]),
        "RIG_KERNEL_ADDR": hex(lay["kernel"]),
        "RIG_DTB_ADDR": hex(lay["dtb"]),
        "RIG_INITRD_ADDR": hex(lay["initrd"]),
        "RIG_DEVICE_TYPES": " ".join(d["type"] for d in lay["devices"]),
        "RIG_COUNTER_PAGE": hex(COUNTER_PAGE),
        "RIG_ASYNC_NOTIFY_DEVICES": len(async_notify_devices(lay)),
    }
    for k, v in out.items():
        print(f"{k}={shlex.quote(str(v))}")


def top_nodes(dts, name_re):
    """Top-level nodes of a dtc-decompiled tree (children of / are indented by one tab)."""
    return list(re.finditer(r"\n\t(" + name_re + r") \{\n.*?\n\t\};", dts, re.S))


def cmd_build(args):
    lay = load(args.config)
    wins = [] if args.baseline else windows_of(lay)
    holes = sorted(set(holes_of(wins)) | {COUNTER_PAGE})
    initrd_end = lay["initrd"] + args.initrd_size
    if initrd_end > lay["stub_base"]:
        raise SystemExit("initramfs does not fit below the stub region")
    if args.kernel_size and lay["kernel"] + args.kernel_size > lay["dtb"]:
        raise SystemExit("kernel image overlaps the device tree address")

    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", args.virt_dtb],
                         check=True, capture_output=True, text=True).stdout
    # QEMU's own (empty) transports that share a page with our windows would shadow them.
    for m in reversed(top_nodes(dts, r"virtio_mmio@[0-9a-f]+")):
        addr = int(m.group(1).split("@")[1], 16)
        if addr & ~(PAGE - 1) in holes:
            dts = dts[:m.start()] + dts[m.end():]
    # The second UART, when QEMU has one, is the stub's doorbell: hide it from the guest.
    for m in reversed(top_nodes(dts, DOORBELL_NODE)):
        dts = dts[:m.start()] + dts[m.end():]
    dts = re.sub(r"\n\t\tserial1 = \"/" + DOORBELL_NODE + r"\";", "", dts)
    mem = top_nodes(dts, r"memory@[0-9a-f]+")
    if len(mem) != 1:
        raise SystemExit("unexpected memory nodes in QEMU's device tree")
    guest_ram = lay["stub_base"] - lay["ram_base"]
    node = re.sub(r"reg = <[^>]*>;",
                  f"reg = <0x00 {lay['ram_base']:#x} {guest_ram >> 32:#x} {guest_ram & 0xffffffff:#x}>;",
                  mem[0].group(0))
    dts = dts[:mem[0].start()] + node + dts[mem[0].end():]
    chosen = top_nodes(dts, "chosen")
    if len(chosen) != 1:
        raise SystemExit("no chosen node in QEMU's device tree")
    extra = (f'\n\t\tbootargs = "{args.bootargs}";'
             f"\n\t\tlinux,initrd-start = <0x00 {lay['initrd']:#x}>;"
             f"\n\t\tlinux,initrd-end = <0x00 {initrd_end:#x}>;")
    node = chosen[0].group(0).replace("chosen {", "chosen {" + extra, 1)
    dts = dts[:chosen[0].start()] + node + dts[chosen[0].end():]
    nodes = "".join(
        f"\n\tvirtio_mmio@{d['addr']:x} {{\n\t\tcompatible = \"virtio,mmio\";"
        f"\n\t\treg = <0x00 {d['addr']:#x} 0x00 {d['len']:#x}>;"
        f"\n\t\tinterrupts = <0x00 {d['irq'] - 32:#x} 0x01>;\n\t\tdma-coherent;\n\t}};"
        for d in ([] if args.baseline else lay["devices"]))
    root_end = dts.rstrip().rfind("};")
    dts = dts[:root_end].rstrip("\n") + nodes + "\n};\n"
    with open(f"{args.out}/rig.dts", "w", encoding="utf-8") as f:
        f.write(dts)
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", f"{args.out}/rig.dtb", f"{args.out}/rig.dts"],
                   check=True)

    header = [
        "/* Generated by gen.py from the rig's virtio config: do not edit. */",
        "#pragma once",
        f"#define RIG_ZONE_ID {lay['zone']}",
        f"#define RIG_RAM_BASE {lay['ram_base']:#x}UL",
        f"#define RIG_RAM_SIZE {lay['ram_size']:#x}UL",
        f"#define RIG_STUB_BASE {lay['stub_base']:#x}",
        f"#define RIG_BRIDGE_GPA {lay['bridge']:#x}",
        f"#define RIG_KERNEL_ADDR {lay['kernel']:#x}UL",
        f"#define RIG_DTB_ADDR {lay['dtb']:#x}UL",
        f"#define RIG_STACK_SIZE {STACK_SIZE:#x}",
        f"#define RIG_MAX_CPUS {MAX_CPUS}",
        f"#define RIG_LOCAL_EMPTY {1 if args.local_empty else 0}",
        f"#define RIG_DOORBELL {1 if args.doorbell else 0}",
        f"#define RIG_KICK {1 if args.doorbell and not args.no_kick else 0}",
        f"#define RIG_FENCED {1 if args.fenced else 0}",
        f"#define RIG_SYNC_NOTIFY_READS {1 if args.sync_notify_reads else 0}",
        f"#define RIG_NUM_WINDOWS {len(wins)}",
        "#define RIG_WINDOWS { " + ", ".join(f"{{ {b:#x}, {s:#x} }}" for b, s in wins) + " }",
        f"#define RIG_NUM_IRQS {len(lay['devices'])}",
        "#define RIG_IRQS { " + ", ".join(str(d["irq"]) for d in lay["devices"]) + " }",
        f"#define RIG_COUNTER_PAGE {COUNTER_PAGE:#x}UL",
        f"#define RIG_NUM_HOLES {len(holes)}",
        "#define RIG_HOLES { " + ", ".join(f"{p:#x}" for p in holes) + " }",
    ]
    with open(f"{args.out}/rig_config.h", "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("config")
    b = sub.add_parser("build")
    b.add_argument("config")
    b.add_argument("--virt-dtb", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--bootargs", required=True)
    b.add_argument("--initrd-size", type=int, required=True)
    b.add_argument("--kernel-size", type=int, default=0, help="image_size from the Image header")
    b.add_argument("--doorbell", action="store_true",
                   help="the host rings the stub through QEMU's second UART on FINISH_REQ")
    b.add_argument("--no-kick", action="store_true",
                   help="with --doorbell: no wakeup byte from the stub; the provider's poll alone wakes the bridge")
    b.add_argument("--fenced", action="store_true",
                   help="a StoreLoad barrier between publishing a request and reading need_wakeup "
                        "(hvisor has none, so by default the stub has none either)")
    b.add_argument("--sync-notify-reads", action="store_true",
                   help="a read at window offset 0x50 waits for the bridge's reply "
                        "(hvisor sends it asynchronously and returns 0, as the stub does by default)")
    b.add_argument("--baseline", action="store_true",
                   help="no windows and no added nodes: QEMU's own virtio-mmio devices, no stage-2 hole")
    b.add_argument("--local-empty", action="store_true",
                   help="the stub answers the windows itself as empty transports (no bridge)")
    args = ap.parse_args()
    {"env": cmd_env, "build": cmd_build}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
