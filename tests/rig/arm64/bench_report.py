#!/usr/bin/env python3
"""Tables for bench.sh from its run directories.

Each boot's output holds the guest's `RIG: bench step=NAME bytes=N | <counters before> |
<counters after> | <last output line>` markers: the counters are the EL2 stub's (read from its
counter page by `rigbench counters`), with `ns=` the generic-counter time. The run directory
also holds cpu.txt (host CPU seconds per process) and the bridge and provider logs.
"""
import argparse
import re
import statistics
import sys

DD_STEPS = (("write_1m", "write bs=1M oflag=direct"), ("read_1m", "read bs=1M iflag=direct"),
            ("write_4k", "write bs=4k oflag=direct"), ("read_4k", "read bs=4k iflag=direct"))


def kv(text):
    return {k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", text)}


def first_match(path, pattern):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.search(pattern, line)
                if m:
                    return m
    except OSError:
        pass
    return None


def steps(work, name):
    """Counter deltas of every bench step of one boot."""
    out = {}
    with open(f"{work}/{name}.out", errors="replace") as f:
        for line in f:
            if not line.startswith("RIG: bench step="):
                continue
            head, before, after, tail = line.rstrip("\n").split(" | ", 3)
            c0, c1 = kv(before), kv(after)
            d = {k: c1[k] - c0[k] for k in c0 if k in c1 and k != "cntfrq"}
            d["freq"] = c1["cntfrq"]
            d["bytes"] = kv(head)["bytes"]
            d["tail"] = kv(tail)
            out[re.search(r"step=(\w+)", head).group(1)] = d
    for s in ["null", "mmio_stub", "mmio_device"] + [s for s, _ in DD_STEPS]:
        if s not in out:
            sys.exit(f"bench: step {s} missing from boot {name} (rerun with --keep)")
    return out


def ticks_ns(d, key):
    return d[key] * 1e9 / d["freq"]


def metrics(work, name, args):
    """The figures of one boot."""
    st = steps(work, name)
    m = {}
    null = st["null"]["ns"]  # the bracketing itself: two rigbench runs and a fork
    for s, _ in DD_STEPS:
        d = st[s]
        ns = max(d["ns"] - null, 1)
        traps = d["traps"] - d["counter_reads"]
        blocks = args.count_4k if s.endswith("4k") else args.mib
        m[s + ".mbs"] = d["bytes"] / ns * 1e3
        m[s + ".traps_s"] = traps / ns * 1e9
        m[s + ".traps_req"] = traps / max(d["async_notifies"], 1)
        m[s + ".wait_us"] = ticks_ns(d, "sync_wait_ticks") / max(d["sync_waits"], 1) / 1e3
        m[s + ".idle"] = ticks_ns(d, "wfi_ticks") / ns
        m[s + ".req_us"] = ns / 1e3 / blocks
        m[s + ".idle_req_us"] = ticks_ns(d, "wfi_ticks") / 1e3 / blocks
        m[s + ".wait_req_us"] = ticks_ns(d, "sync_wait_ticks") / 1e3 / blocks
    for s in ("mmio_stub", "mmio_device"):
        d = st[s]
        m[s + ".ns"] = d["tail"]["ns"] / d["tail"]["reads"]
        m[s + ".rt_ns"] = ticks_ns(d, "sync_wait_ticks") / d["sync_waits"] if d["sync_waits"] else 0.0
    boot = first_match(f"{work}/{name}.out", r"\(([0-9.]+) s boot to power-off")
    m["boot_s"] = float(boot.group(1)) if boot else 0.0
    try:
        with open(f"{work}/{name}/cpu.txt") as f:
            for line in f:
                proc, secs = line.split()
                m["cpu." + proc] = m.get("cpu." + proc, 0.0) + float(secs)
    except (OSError, ValueError):
        pass
    stop = first_match(f"{work}/{name}/bridge.log", r"stopping: (\d+) requests, (\d+) interrupts, (\d+) sleeps")
    if stop:
        m["bridge.requests"], m["bridge.interrupts"], m["bridge.sleeps"] = map(float, stop.groups())
    prov = first_match(f"{work}/{name}/provider.log", r"stopping: (\d+) wakeups sent")
    if prov:
        m["provider.kicks"] = float(prov.group(1))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--count-4k", type=int, required=True)
    ap.add_argument("--reads", type=int, required=True)
    ap.add_argument("--bridge-args", default="")
    args = ap.parse_args()

    ours = [metrics(args.work, f"bridge-{r}", args) for r in range(1, args.rounds + 1)]
    base = [metrics(args.work, f"qemu-{r}", args) for r in range(1, args.rounds + 1)]

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    def spread(values, fmt):
        values = sorted(values)
        text = fmt.format(statistics.median(values))
        if len(values) > 1:
            text += f" [{fmt.format(values[0])}–{fmt.format(values[-1])}]"
        return text

    def cell(runs, key, fmt="{:,.1f}"):
        return spread([r[key] for r in runs], fmt)

    print(f"arm64 rig benchmark: {args.rounds} interleaved boot pair(s), medians [min–max]. Guest dd on "
          f"/dev/vda with direct I/O: {args.mib} MiB in 1 MiB blocks, {args.count_4k} x 4 KiB. "
          f"Bridge options: {args.bridge_args or '(defaults)'}.")
    print()
    print("| dd | bridge + vhost-user-blk MB/s | QEMU virtio-blk-device MB/s | ratio | traps/s (bridge) "
          "| traps per request | bridge wait per sync access (µs) | guest idle in WFI, bridge / QEMU |")
    print("|---|---|---|---|---|---|---|---|")
    for s, label in DD_STEPS:
        ratio = spread([o[s + ".mbs"] / b[s + ".mbs"] for o, b in zip(ours, base)], "{:.2f}")
        print(f"| {label} | {cell(ours, s + '.mbs')} | {cell(base, s + '.mbs')} | {ratio} "
              f"| {cell(ours, s + '.traps_s', '{:,.0f}')} | {med(ours, s + '.traps_req'):.1f} "
              f"| {cell(ours, s + '.wait_us')} | {med(ours, s + '.idle'):.0%} / {med(base, s + '.idle'):.0%} |")

    stub, dev, own = med(ours, "mmio_stub.ns"), med(ours, "mmio_device.ns"), med(base, "mmio_device.ns")
    rt = med(ours, "mmio_device.rt_ns")
    print()
    print(f"Register reads: {args.reads} 32-bit reads of one register in a guest user-space loop (/dev/mem):")
    print()
    print("| path | ns per read | reads/s (= traps/s when trapped) |")
    print("|---|---|---|")
    print(f"| QEMU's own virtio-mmio register (QEMU boot, no trap) | {cell(base, 'mmio_device.ns', '{:,.0f}')} "
          f"| {1e9 / own:,.0f} |")
    print(f"| trapped, answered by the EL2 stub (its counter page) | {cell(ours, 'mmio_stub.ns', '{:,.0f}')} "
          f"| {1e9 / stub:,.0f} |")
    print(f"| trapped, through the bridge page and the bridge (MagicValue) "
          f"| {cell(ours, 'mmio_device.ns', '{:,.0f}')} | {1e9 / dev:,.0f} |")
    print(f"| — TCG: trap to EL2 and back, decode, the guest loop (= the stub-answered read) | {stub:,.0f} | |")
    print(f"| — stub push to reply: ring + bridge round trip (stub's clock) | {rt:,.0f} | |")
    print(f"| — the rest: the stub's work for a forwarded access (window lookup, timing, res_list) "
          f"| {max(dev - stub - rt, 0):,.0f} | |")

    print()
    print("Per request (µs, medians):")
    print()
    print("| | 4 KiB read, bridge | 4 KiB read, QEMU | 1 MiB write, bridge | 1 MiB write, QEMU |")
    print("|---|---|---|---|---|")
    for key, label in (("req_us", "wall time"), ("idle_req_us", "guest idle in WFI (waiting for the completion)"),
                       ("wait_req_us", "stub waiting for bridge replies (sync register accesses)")):
        print(f"| {label} | {med(ours, 'read_4k.' + key):,.0f} | {med(base, 'read_4k.' + key):,.0f} "
              f"| {med(ours, 'write_1m.' + key):,.0f} | {med(base, 'write_1m.' + key):,.0f} |")

    print()
    procs = sorted({k for r in ours for k in r if k.startswith("cpu.") and all(k in x for x in ours)})
    print("Host CPU seconds per boot (user+sys, medians): bridge boot "
          + ", ".join(f"{k[4:]} {med(ours, k):.2f}" for k in procs)
          + f" ({med(ours, 'boot_s'):.2f} s wall); QEMU boot "
          + (f"qemu {med(base, 'cpu.qemu'):.2f}" if all("cpu.qemu" in r for r in base) else "?")
          + f" ({med(base, 'boot_s'):.2f} s wall)")
    if all("bridge.requests" in r and "provider.kicks" in r for r in ours):
        print(f"Bridge, whole boot (medians): {med(ours, 'bridge.requests'):.0f} requests, "
              f"{med(ours, 'bridge.interrupts'):.0f} interrupts, {med(ours, 'bridge.sleeps'):.0f} sleeps; "
              f"provider wakeup kicks {med(ours, 'provider.kicks'):.0f}")


if __name__ == "__main__":
    main()
