#!/usr/bin/env python3
"""The table of bench.sh (real-hvisor rig) from its boots' outputs.

Each boot's output (<work>/<ours|tool>-<n>.out, drive.py's stdout) holds one `BENCH phase=NAME
key=value ...` line per phase: zone1's load-program figures (`mbs=`, `iops=`, `lat_us=`, `s=`),
a console or TCP transfer's (`bytes=`, `got=`, `md5_ok=`, `s=`) or the pings' (`count=`,
`received=`, `rtt_ms=`), or `error=` when the phase failed; `cpu_s=`, the zone0 CPU seconds
of the daemon and its children during the phase (`cpu_by=NAME:S,...`: by process name); and
`wall_s=`, the phase's host time. Ours also prints `BENCH bridge <the bridge's stopping line>`.

Speed is printed, never asserted. The report exits nonzero when our side lost a console byte or
a ping, failed an md5, or a phase of ours failed; hvisor-tool's losses and failures are printed.
"""
import argparse
import os
import re
import statistics
import sys

# Phase: (figure key, metric name) of its throughput or latency rows.
LOAD = {"write": (("mbs", "write"),), "read": (("mbs", "read"),),
        "rand": (("iops", "rand"), ("lat_us", "rand_lat")),
        "randwrite": (("iops", "randwrite"), ("lat_us", "randwrite_lat")),
        "rand-qd": (("iops", "randqd"), ("lat_us", "randqd_lat")),
        "randwrite-qd": (("iops", "randwriteqd"), ("lat_us", "randwriteqd_lat"))}
TRANSFERS = ("console", "console-rx", "net-tx", "net-rx")
NET = ("ping", "net-tx", "net-rx")


def phases_of(args):
    return ["start", "zone1-boot"] + list(LOAD) + ["console", "console-rx"] + (
        list(NET) if args.net_mib else [])


def parse(path, args):
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
    for p in phases_of(args):
        if p not in phases:
            sys.exit("bench_report: phase %s missing from %s (rerun with --keep)" % (p, path))
    return phases, bridge


def metrics(path, args):
    """One boot's figures; None where its phase failed. `failures` lists what would fail the
    report if this were our side."""
    ph, bridge = parse(path, args)
    m = {"failures": []}
    for p in phases_of(args):
        if "error" in ph[p]:
            m["failures"].append("%s: %s" % (p, ph[p]["error"]))
    for p, figures in LOAD.items():
        for key, name in figures:
            m[name] = None if "error" in ph[p] else float(ph[p][key])
    for p in TRANSFERS:
        if p not in ph:
            continue
        kv, name = ph[p], p.replace("-", "")
        # A transfer that ended in error (a timeout) still counts what arrived; only its rate
        # is not a figure.
        counted = "got" in kv
        rated = counted and "error" not in kv
        got = int(kv["got"]) if counted else 0
        m[name + "_mbs"] = got / 1e6 / max(float(kv["s"]), 1e-3) if rated else None
        m[name + "_kibs"] = got / 1024 / max(float(kv["s"]), 1e-3) if rated else None
        m[name + "_lost"] = int(kv["bytes"]) - got if counted else None
        m[name + "_md5"] = int(kv.get("md5_ok", 0)) if counted else 0
        m[name + "_got_mb"] = got / 1e6
        if counted and (m[name + "_lost"] or not m[name + "_md5"]):
            m["failures"].append("%s: %d of %s bytes lost, md5 %s" % (
                p, m[name + "_lost"], kv["bytes"], "ok" if m[name + "_md5"] else "differs"))
    if args.net_mib:
        kv = ph["ping"]
        good = "error" not in kv
        m["ping_rtt"] = float(kv["rtt_ms"]) if good else None
        m["ping_lost"] = int(kv["count"]) - int(kv["received"]) if good else None
        if good and m["ping_lost"]:
            m["failures"].append("ping: %d of %s lost" % (m["ping_lost"], kv["count"]))
    for p in phases_of(args):
        m["cpu." + p] = float(ph[p]["cpu_s"])
        if "wall_s" in ph[p]:
            m["wall." + p] = float(ph[p]["wall_s"])
        for item in filter(None, ph[p].get("cpu_by", "-").strip("-").split(",")):
            name, secs = item.rsplit(":", 1)
            m["by.%s.%s" % (p, name)] = float(secs)
    # CPU per unit of work done: per request, per MB moved (delivered, for the transfers).
    per_req = {"rand": args.rand, "randwrite": args.rand, "rand-qd": args.qd_rand,
               "randwrite-qd": args.qd_rand}
    if args.net_mib:
        per_req["ping"] = args.pings
    for p, n in per_req.items():
        m["cpu_ms_per." + p] = m["cpu." + p] * 1e3 / n
    # zone1's own view of the blk phases: interrupts per request (per MiB for the sequential
    # ones) and its CPU's busy share. The same guest and load on both sides, so a difference is
    # in how the daemon batches completions and how long zone1 waits on its register accesses.
    per_unit = dict(per_req, write=args.mib, read=args.mib)
    for p in LOAD:
        if "z1_irqs" in ph[p] and "error" not in ph[p]:
            m["z1_irqs_per." + p] = int(ph[p]["z1_irqs"]) / per_unit[p]
            m["z1_all_irqs_per." + p] = int(ph[p]["z1_all_irqs"]) / per_unit[p]
            m["z1_busy." + p] = float(ph[p]["z1_busy_pct"])
        if "rounds" in ph[p] and "error" not in ph[p]:
            for key in ("per_round", "submit_us", "wait_us"):
                m["z1_%s.%s" % (key, p)] = float(ph[p][key])
        # The host CPU of each vCPU thread of QEMU over the phase, as a share of its host time.
        if "host_vcpu_s" in ph[p] and "host_s" in ph[p] and "error" not in ph[p]:
            for item in ph[p]["host_vcpu_s"].split(","):
                n, secs = item.split(":")
                m["vcpu%s_pct.%s" % (n, p)] = 100 * float(secs) / max(float(ph[p]["host_s"]), 1e-3)
        if "z0_faults" in ph[p] and "error" not in ph[p]:
            m["z0_faults_per.%s" % p] = int(ph[p]["z0_faults"]) / per_unit[p]
        # Our bridge's counters over the phase.
        if "br_blk_kicks" in ph[p] and "error" not in ph[p]:
            kicks = int(ph[p]["br_blk_kicks"])
            m["br_kick_to_call_us." + p] = int(ph[p]["br_blk_kick_to_call_us"]) / kicks if kicks else None
            for key in ("requests", "sleeps"):
                m["br_%s_per.%s" % (key, p)] = int(ph[p]["br_" + key]) / per_unit[p]
    mb = {"write": args.mib * 1.048576, "read": args.mib * 1.048576}
    for p in TRANSFERS:
        if p in ph:
            mb[p] = m[p.replace("-", "") + "_got_mb"]
    for p, n in mb.items():
        m["cpu_s_per_mb." + p] = m["cpu." + p] / n if n > 0 else None
    m["bridge"] = bridge
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--pairs", type=int, required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--rand", type=int, required=True)
    ap.add_argument("--qd", type=int, required=True)
    ap.add_argument("--qd-rand", type=int, required=True)
    ap.add_argument("--console-bytes", type=int, required=True)
    ap.add_argument("--net-mib", type=int, required=True)
    ap.add_argument("--pings", type=int, required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--bridge-args", default="")
    ap.add_argument("--versus", default=None,
                    help="the baseline side is our bridge with these options, not hvisor-tool")
    args = ap.parse_args()

    ours = [metrics("%s/ours-%d.out" % (args.work, r), args) for r in range(1, args.pairs + 1)]
    tool = [metrics("%s/tool-%d.out" % (args.work, r), args) for r in range(1, args.pairs + 1)]

    def fmt(v, count=False):
        if abs(v) >= 100 or count:
            return "{:,.0f}".format(v)
        if abs(v) >= 10:
            return "{:.1f}".format(v)
        if abs(v) >= 0.1 or v == 0:
            return "{:.2f}".format(v)
        return "{:.3f}".format(v)

    def cell(runs, key, count=False):
        values = sorted(r[key] for r in runs if r.get(key) is not None)
        failed = len(runs) - len(values)
        if not values:
            return "failed %d/%d" % (failed, len(runs))
        text = fmt(statistics.median(values), count)
        if len(values) > 1:
            text += " [%s–%s]" % (fmt(values[0], count), fmt(values[-1], count))
        if failed:
            text += " (failed %d/%d)" % (failed, len(runs))
        return text

    def ratio(key, higher_better=True):
        # Per pair, then the median: each pair ran under the same load from elsewhere.
        rs = []
        for o, t in zip(ours, tool):
            if t.get(key) and o.get(key):
                rs.append(o[key] / t[key] if higher_better else t[key] / o[key])
        return "%.2f" % statistics.median(rs) if rs else "—"

    def row(label, key, higher_better=True):
        print("| %s | %s | %s | %s |" % (label, cell(ours, key), cell(tool, key), ratio(key, higher_better)))

    def loss_row(label, key, unit):
        def side(runs):
            lost = cell(runs, key + "_lost", True)
            return "%s (md5 ok %d/%d)" % (lost, sum(r[key + "_md5"] for r in runs), len(runs))
        print("| %s: %s lost | %s | %s | — |" % (label, unit, side(ours), side(tool)))

    kib = args.console_bytes // 1024
    theirs_name = "hvisor-tool" if args.versus is None else "ours, %s" % (args.versus or "(defaults)")
    baseline = ("hvisor-tool's daemon" if args.versus is None else
                "our bridge with options %s" % (args.versus or "(defaults)"))
    print("Real-hvisor rig: ours (hvisor-vhost-bridge + backends) vs %s, hvisor-tool "
          "%s; %d interleaved boot pair(s), medians [min–max]. zone1: blk on a 64 MiB image in zone0's "
          "tmpfs + console%s; times by zone1's clock; zone0 CPU = user+sys of the daemon and its children. "
          "Bridge options: %s." % (baseline, args.module, args.pairs, " + net on zone0's TAP" if args.net_mib else "",
                                   args.bridge_args or "(defaults)"))
    print()
    print("| row | ours | %s | ours / theirs (≥ 1 is better for ours) |" % theirs_name)
    print("|---|---|---|---|")
    row("seq write %d MiB, 1 MiB, O_DIRECT + fsync (MB/s)" % args.mib, "write")
    row("seq read %d MiB, 1 MiB, O_DIRECT (MB/s)" % args.mib, "read")
    for op, key in (("read", "rand"), ("write", "randwrite")):
        row("4 KiB random %s QD1, %d requests (IOPS)" % (op, args.rand), key)
        row("4 KiB random %s QD1, mean latency (µs)" % op, key + "_lat", False)
    for op, key in (("read", "randqd"), ("write", "randwriteqd")):
        row("4 KiB random %s QD%d, %d requests (IOPS)" % (op, args.qd, args.qd_rand), key)
        row("4 KiB random %s QD%d, mean latency (µs)" % (op, args.qd), key + "_lat", False)
    row("console: %d KiB zone1 → zone0, delivered KiB/s" % kib, "console_kibs")
    loss_row("console zone1 → zone0", "console", "bytes of %d KiB" % kib)
    row("console: %d KiB zone0 → zone1, delivered KiB/s (first to last byte)" % kib, "consolerx_kibs")
    loss_row("console zone0 → zone1", "consolerx", "bytes of %d KiB" % kib)
    if args.net_mib:
        row("net: ping zone1 → zone0, %d pings 50 ms apart, mean rtt (ms)" % args.pings, "ping_rtt", False)
        print("| net: pings lost of %d | %s | %s | — |" % (
            args.pings, cell(ours, "ping_lost", True), cell(tool, "ping_lost", True)))
        row("net: TCP %d MiB zone1 → zone0 (MB/s)" % args.net_mib, "nettx_mbs")
        loss_row("net: TCP zone1 → zone0", "nettx", "bytes of %d MiB" % args.net_mib)
        row("net: TCP %d MiB zone0 → zone1 (MB/s)" % args.net_mib, "netrx_mbs")
        loss_row("net: TCP zone0 → zone1", "netrx", "bytes of %d MiB" % args.net_mib)
    else:
        print("| net | not measured (--net-mib 0) | | |")
    cpu_rows = [
        ("daemon start (until serving)", "start"),
        ("zone1 boot (start to zone1 shell)", "zone1-boot"),
        ("seq write %d MiB" % args.mib, "write"),
        ("seq read %d MiB" % args.mib, "read"),
        ("%d random 4 KiB reads QD1" % args.rand, "rand"),
        ("%d random 4 KiB writes QD1" % args.rand, "randwrite"),
        ("%d random 4 KiB reads QD%d" % (args.qd_rand, args.qd), "rand-qd"),
        ("%d random 4 KiB writes QD%d" % (args.qd_rand, args.qd), "randwrite-qd"),
        ("console %d KiB zone1 → zone0" % kib, "console"),
        ("console %d KiB zone0 → zone1" % kib, "console-rx"),
    ]
    if args.net_mib:
        cpu_rows += [("%d pings" % args.pings, "ping"),
                     ("TCP %d MiB zone1 → zone0" % args.net_mib, "net-tx"),
                     ("TCP %d MiB zone0 → zone1" % args.net_mib, "net-rx")]
    for label, p in cpu_rows:
        row("zone0 CPU s, %s" % label, "cpu." + p, False)
    labels = dict((p, label) for label, p in cpu_rows)
    for p in ("rand", "randwrite", "rand-qd", "randwrite-qd", "ping"):
        if "cpu_ms_per." + p in ours[0]:
            unit = "ping" if p == "ping" else "request"
            row("zone0 CPU ms per %s, %s" % (unit, labels[p]), "cpu_ms_per." + p, False)
    for p in ("write", "read", "console", "console-rx", "net-tx", "net-rx"):
        if "cpu_s_per_mb." + p in ours[0]:
            what = "MB" if p in ("write", "read") else "MB delivered"
            row("zone0 CPU s per %s, %s" % (what, labels[p]), "cpu_s_per_mb." + p, False)

    if any("z1_irqs_per." + p in r for r in ours + tool for p in LOAD):
        print()
        print("Zone1's view of the blk phases (medians [min–max]): its interrupts per request (per "
              "MiB for the sequential phases), the disk's and all of them, and its CPU's busy share, %:")
        print()
        print("| phase | disk's interrupts, ours | %s | all interrupts, ours | %s | zone1 busy %%, ours | %s |"
              % ((theirs_name,) * 3))
        print("|---|---|---|---|---|---|---|")
        for p in LOAD:
            print("| %s | %s |" % (labels[p], " | ".join(
                cell(side, "%s.%s" % (key, p)) for key in ("z1_irqs_per", "z1_all_irqs_per", "z1_busy")
                for side in (ours, tool))))

    deep = [p for p in LOAD if any("z1_per_round." + p in r for r in ours + tool)]
    if deep:
        print()
        print("The deep queue's rounds, by zone1's clock (one io_submit of the free slots, then one "
              "io_getevents): requests completed per round, and µs per round submitting and waiting "
              "for the device and its interrupt (medians [min–max]):")
        print()
        print("| phase | requests/round, ours | %s | submit µs, ours | %s | wait µs, ours | %s |" % (
            (theirs_name,) * 3))
        print("|---|---|---|---|---|---|---|")
        for p in deep:
            print("| %s | %s |" % (labels[p], " | ".join(
                cell(side, "z1_%s.%s" % (key, p)) for key in ("per_round", "submit_us", "wait_us")
                for side in (ours, tool))))
    vcpus = sorted({k.split(".")[0] for r in ours + tool for k in r if k.startswith("vcpu")})
    if vcpus:
        print()
        print("Host CPU of each of QEMU's vCPU threads during each blk phase, in %% of the phase's host "
              "time (the host has %d cores; medians), ours / %s; and the daemon's minor page faults "
              "in zone0 per request (per MiB for the sequential phases):" % (os.cpu_count(), theirs_name))
        print()
        print("| phase | " + " | ".join("CPU %s" % v[4:-4] for v in vcpus) + " | zone0 faults |")
        print("|---|" + "---|" * (len(vcpus) + 1))
        for p in LOAD:
            def med(runs, key):
                values = [r[key] for r in runs if r.get(key) is not None]
                return "%.0f" % statistics.median(values) if values else "—"
            print("| %s | %s | %s / %s |" % (labels[p], " | ".join(
                "%s / %s" % (med(ours, "%s.%s" % (v, p)), med(tool, "%s.%s" % (v, p))) for v in vcpus),
                cell(ours, "z0_faults_per." + p), cell(tool, "z0_faults_per." + p)))
    ring = [p for p in LOAD if any("br_requests_per." + p in r for r in ours)]
    if ring:
        print()
        print("Our bridge over each blk phase (status socket): ring requests and sleeps per request "
              "(per MiB for the sequential phases), and the mean µs from a QueueNotify to the backend's "
              "call:")
        print()
        print("| phase | ring requests | sleeps | notify to call, µs |")
        print("|---|---|---|---|")
        for p in ring:
            print("| %s | %s | %s | %s |" % (labels[p], cell(ours, "br_requests_per." + p),
                                             cell(ours, "br_sleeps_per." + p), cell(ours, "br_kick_to_call_us." + p)))

    names = sorted({k.split(".", 2)[2] for r in ours for k in r if k.startswith("by.")})
    if names and all(any(k.startswith("by.") for k in r) for r in ours):
        print()
        print("Our zone0 CPU seconds by process (medians over the boots):")
        print()
        print("| phase | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for p in phases_of(args):
            print("| %s | %s |" % (p, " | ".join(
                "%.2f" % statistics.median(r.get("by.%s.%s" % (p, n), 0.0) for r in ours) for n in names)))
    bridges = [r["bridge"] for r in ours if r["bridge"]]
    if bridges:
        keys = [k for k in bridges[0] if all(k in b for b in bridges)]
        print()
        print("Bridge counters per boot (its `stopping:` line; medians [min–max]): " + ", ".join(
            "%s %s" % (k, cell([{"v": float(b[k])} for b in bridges], "v", True)) for k in keys))
    walls = [p for p in phases_of(args) if all("wall." + p in r for r in ours + tool)]
    if walls:
        print()
        print("Host wall seconds per phase, medians ours / %s (what each phase adds to a pair): " % theirs_name +
              ", ".join("%s %.1f / %.1f" % (p, statistics.median(r["wall." + p] for r in ours),
                                           statistics.median(r["wall." + p] for r in tool)) for p in walls))
    theirs = ["pair %d: %s" % (i, f) for i, r in enumerate(tool, 1) for f in r["failures"]]
    if theirs:
        print()
        print("%s: losses and failed phases: " % theirs_name + "; ".join(theirs))
    # Speed is reported, never asserted; a byte, ping or phase our side lost is a failure.
    failed = ["pair %d: %s" % (i, f) for i, r in enumerate(ours, 1) for f in r["failures"]]
    if args.versus is not None:
        failed += ["baseline pair %d: %s" % (i, f) for i, r in enumerate(tool, 1) for f in r["failures"]]
    if failed:
        sys.exit("bench_report: our side lost data or failed a phase: " + "; ".join(failed))


if __name__ == "__main__":
    main()
