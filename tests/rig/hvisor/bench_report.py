#!/usr/bin/env python3
"""The table of bench.sh (real-hvisor rig) from its boots' outputs.

Each boot's output (<work>/<ours|tool>-<n>.out, drive.py's stdout) holds one `BENCH phase=NAME
key=value ...` line per phase: zone1's load-program figures (`mbs=`, `iops=`, `s=`) or the console
transfer's (`bytes=`, `got=`, `md5_ok=`, `s=`), and `cpu_s=`, the zone0 CPU seconds of the daemon
and its children during the phase (`cpu_by=NAME:S,...`: by process name). Ours also prints `BENCH bridge <the bridge's stopping line>`.
"""
import argparse
import re
import statistics
import sys


def parse(path):
    phases, bridge = {}, None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("BENCH phase="):
                kv = dict(re.findall(r"(\w+)=(\S+)", line))
                phases[kv.pop("phase")] = kv
            elif line.startswith("BENCH bridge "):
                counters = line[len("BENCH bridge "):]
                bridge = {k: int(v) for v, k in re.findall(r"(\d+) ([a-z][a-z -]*[a-z])", counters)}
                # Injection-to-ACK gap buckets: "<100µs:3 ... >=8000µs:1".
                bridge.update({"ACK %s%sµs" % (op, bound): int(v) for op, bound, v in
                               re.findall(r"(<|>=)(\d+)µs:(\d+)", counters)})
    for p in ("start", "zone1-boot", "write", "read", "rand", "console"):
        if p not in phases:
            sys.exit("bench_report: phase %s missing from %s (rerun with --keep)" % (p, path))
    for p in ("write", "read", "rand"):
        if "error" in phases[p]:
            sys.exit("bench_report: %s failed in %s: %s" % (p, path, phases[p]["error"]))
    return phases, bridge


def metrics(path, args):
    ph, bridge = parse(path)
    c = ph["console"]
    secs = max(float(c["s"]), 1e-3)
    m = {
        "write": float(ph["write"]["mbs"]),
        "read": float(ph["read"]["mbs"]),
        "rand": float(ph["rand"]["iops"]),
        "rand_lat": float(ph["rand"]["lat_us"]),
        "con_rate": int(c["got"]) / 1024 / secs,
        "con_lost": int(c["bytes"]) - int(c["got"]),
        "con_md5": int(c["md5_ok"]),
    }
    for p in ("start", "zone1-boot", "write", "read", "rand", "console"):
        m["cpu." + p] = float(ph[p]["cpu_s"])
        for item in filter(None, ph[p].get("cpu_by", "-").strip("-").split(",")):
            name, secs = item.rsplit(":", 1)
            m["by.%s.%s" % (p, name)] = float(secs)
    m["cpu_per_req_ms"] = m["cpu.rand"] * 1e3 / args.rand
    m["cpu_per_mb_write"] = m["cpu.write"] / (args.mib * 1.048576)
    m["cpu_per_mb_read"] = m["cpu.read"] / (args.mib * 1.048576)
    m["bridge"] = bridge
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--pairs", type=int, required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--rand", type=int, required=True)
    ap.add_argument("--console-bytes", type=int, required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--bridge-args", default="")
    args = ap.parse_args()

    ours = [metrics("%s/ours-%d.out" % (args.work, r), args) for r in range(1, args.pairs + 1)]
    tool = [metrics("%s/tool-%d.out" % (args.work, r), args) for r in range(1, args.pairs + 1)]

    def fmt(v, count=False):
        if abs(v) >= 100 or count:
            return "{:,.0f}".format(v)
        if abs(v) >= 10:
            return "{:.1f}".format(v)
        return "{:.2f}".format(v)

    def cell(runs, key, count=False):
        values = sorted(r[key] for r in runs)
        text = fmt(statistics.median(values), count)
        if len(values) > 1:
            text += " [%s–%s]" % (fmt(values[0], count), fmt(values[-1], count))
        return text

    def ratio(key, higher_better=True):
        # Per pair, then the median: each pair ran under the same load from elsewhere.
        rs = []
        for o, t in zip(ours, tool):
            if t[key] > 0 and o[key] > 0:
                rs.append(o[key] / t[key] if higher_better else t[key] / o[key])
        return "%.2f" % statistics.median(rs) if rs else "—"

    kib = args.console_bytes // 1024
    print("Real-hvisor rig: ours (hvisor-vhost-bridge + backends) vs hvisor-tool's daemon, hvisor-tool "
          "%s; %d interleaved boot pair(s), medians [min–max]. zone1: blk on a 64 MiB image in zone0's "
          "tmpfs + console; times by zone1's clock; zone0 CPU = user+sys of the daemon and its children. Bridge "
          "options: %s." % (args.module, args.pairs, args.bridge_args or "(defaults)"))
    print()
    print("| row | ours | hvisor-tool | ours / theirs (≥ 1 is better for ours) |")
    print("|---|---|---|---|")
    rows = (
        ("seq write %d MiB, 1 MiB, O_DIRECT + fsync (MB/s)" % args.mib, "write", True),
        ("seq read %d MiB, 1 MiB, O_DIRECT (MB/s)" % args.mib, "read", True),
        ("4 KiB random read QD1, %d requests (IOPS)" % args.rand, "rand", True),
        ("4 KiB random read QD1, mean latency (µs)", "rand_lat", False),
        ("console: %d KiB zone1 → zone0, delivered KiB/s" % kib, "con_rate", True),
    )
    for label, key, hb in rows:
        print("| %s | %s | %s | %s |" % (label, cell(ours, key), cell(tool, key), ratio(key, hb)))
    print("| console: bytes lost of %d KiB | %s (md5 ok %d/%d) | %s (md5 ok %d/%d) | — |" % (
        kib, cell(ours, "con_lost", True), sum(r["con_md5"] for r in ours), len(ours),
        cell(tool, "con_lost", True), sum(r["con_md5"] for r in tool), len(tool)))
    cpu_rows = (
        ("daemon start (until serving)", "cpu.start"),
        ("zone1 boot (start to zone1 shell)", "cpu.zone1-boot"),
        ("seq write %d MiB" % args.mib, "cpu.write"),
        ("seq read %d MiB" % args.mib, "cpu.read"),
        ("%d random 4 KiB reads" % args.rand, "cpu.rand"),
        ("console %d KiB" % kib, "cpu.console"),
    )
    for label, key in cpu_rows:
        print("| zone0 CPU s, %s | %s | %s | %s |" % (label, cell(ours, key), cell(tool, key),
                                                     ratio(key, higher_better=False)))
    print("| zone0 CPU ms per random read | %s | %s | %s |" % (
        cell(ours, "cpu_per_req_ms"), cell(tool, "cpu_per_req_ms"), ratio("cpu_per_req_ms", False)))
    names = sorted({k.split(".", 2)[2] for r in ours for k in r if k.startswith("by.")})
    if names and all(any(k.startswith("by.") for k in r) for r in ours):
        print()
        print("Our zone0 CPU seconds by process (medians over the boots):")
        print()
        print("| phase | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for p in ("start", "zone1-boot", "write", "read", "rand", "console"):
            print("| %s | %s |" % (p, " | ".join(
                "%.2f" % statistics.median(r.get("by.%s.%s" % (p, n), 0.0) for r in ours) for n in names)))
    bridges = [r["bridge"] for r in ours if r["bridge"]]
    if bridges:
        keys = [k for k in bridges[0] if all(k in b for b in bridges)]
        print()
        print("Bridge counters per boot (its `stopping:` line; medians [min–max]): " + ", ".join(
            "%s %s" % (k, cell([{"v": float(b[k])} for b in bridges], "v", True)) for k in keys))
    # Speed is reported, never asserted; a byte our side lost is a failure.
    lost = [r for r in ours if r["con_lost"] != 0 or not r["con_md5"]]
    if lost:
        sys.exit("bench_report: our console lost bytes or failed md5 in %d of %d boots" % (len(lost), len(ours)))


if __name__ == "__main__":
    main()
