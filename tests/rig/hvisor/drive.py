#!/usr/bin/env python3
"""Drives one boot of the real-hvisor rig through its serial console.

QEMU runs with the serial port on stdio; this script reads everything it prints (U-Boot, hvisor
at EL2, zone0's Linux and shell, the daemon's log, zone1's console relayed by zone0) and types
the commands: U-Boot's bootm, then zone0 shell commands, each ended by a status marker. Every
wait is for output, with a timeout. Each check prints one PASS/FAIL/XFAIL/XPASS line; the exit
status is 1 when a check not listed in --xfail fails.

Standard library only (subprocess, selectors, re).
"""

import argparse
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import time

# Our bridge's counters, per blk bench phase (from its status socket): the loop's ring
# requests, interrupts and sleeps, and the blk device's QueueNotify-to-call round trips with
# their summed µs.
BRIDGE_PHASE_COUNTERS = ("requests", "interrupts", "sleeps", "blk_kicks", "blk_kick_to_call_us")

ALL_CHECKS = [
    "module", "init-order", "daemon-ready", "zone-start", "devices", "blk", "blk-direct",
    "console", "net", "reset", "shutdown", "shutdown-reset-log", "stop",
]
# Run only when asked for (bench.sh): measurements, not a check of behaviour.
EXTRA_CHECKS = ["bench"]
# The checks that need zone1 running (after daemon-ready and zone-start).
ZONE1_CHECKS = ["devices", "blk", "blk-direct", "console", "net", "reset", "shutdown",
                "shutdown-reset-log", "bench"]
# USER_HZ of zone0's Linux: the unit of /proc/<pid>/stat's times.
CLK_TCK = 100


class Timeout(Exception):
    pass


class Console:
    """QEMU on a pipe: a growing text buffer, a cursor, and expect()."""

    def __init__(self, argv, log_path, verbose):
        self.log = open(log_path, "w", encoding="utf-8", errors="replace")
        self.verbose = verbose
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = ""
        self.pos = 0
        self.nudge = None
        self.nudges = 0
        self.t0 = time.monotonic()

    def _pump(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if not self.sel.select(left):
            return False
        data = self.proc.stdout.read()
        if not data:
            raise EOFError("QEMU exited (status %s)" % self.proc.poll())
        text = data.decode("utf-8", errors="replace")
        self.buf += text
        self.log.write(text)
        self.log.flush()
        if self.verbose:
            sys.stdout.write(text)
            sys.stdout.flush()
        return True

    def expect(self, patterns, timeout):
        """Waits for the first of the regexes after the cursor; moves the cursor past it.
        Returns (index, match).

        Once `nudge` is set, a newline is typed after every `nudge` seconds without output.
        Under hvisor, zone0's PL011 sometimes misses an interrupt: the end of a typed line
        stays in the receive FIFO, or output stays queued in the tty, until the next interrupt.
        A newline raises one; the shell reads it as an empty command line."""
        if isinstance(patterns, str):
            patterns = [patterns]
        regs = [re.compile(p) for p in patterns]
        deadline = time.monotonic() + timeout
        while True:
            best = None
            for i, r in enumerate(regs):
                m = r.search(self.buf, self.pos)
                if m and (best is None or m.start() < best[1].start()):
                    best = (i, m)
            if best:
                self.pos = best[1].end()
                return best
            nudge = self.nudge
            step = deadline if nudge is None else min(deadline, time.monotonic() + nudge)
            if not self._pump(step):
                if time.monotonic() >= deadline:
                    raise Timeout("timed out after %ds waiting for %s" % (timeout, " | ".join(patterns)))
                self.nudges += 1
                self.send("\n")

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()


class Rig:
    def __init__(self, args):
        self.args = args
        self.results = []  # (name, status, seconds, detail)
        self.xfail = set(filter(None, args.xfail.split(",")))
        self.seq = 0
        self.daemon_pid = None
        self.cpu_ready = (0, {})
        self.daemon_pos = 0
        self.con = None

    # ---- reporting --------------------------------------------------------------------------
    def say(self, msg):
        print("[hvisor-rig %6.1fs] %s" % (time.monotonic() - self.con.t0, msg), flush=True)

    def result(self, name, ok, secs, detail=""):
        if ok:
            status = "XPASS" if name in self.xfail else "PASS"
        else:
            status = "XFAIL" if name in self.xfail else "FAIL"
        self.results.append((name, status, secs, detail))
        print("%-5s %-18s %7.1fs  %s" % (status, name, secs, detail), flush=True)
        return ok

    def skip(self, names, why):
        for n in names:
            if self.wanted(n) and n not in [r[0] for r in self.results]:
                self.result(n, False, 0.0, "not run: " + why)

    def wanted(self, name):
        return name in self.args.tests

    # ---- zone0 shell ------------------------------------------------------------------------
    def sh(self, cmd, timeout=None):
        """Runs one line in zone0's shell; returns (status, output)."""
        self.seq += 1
        start = self.con.pos
        # The quotes split the marker in the command text, so only its output matches.
        self.con.send('%s; echo "@@RC%d""=$?@@"\n' % (cmd, self.seq))
        m = self.con.expect(r"@@RC%d=(\d+)@@" % self.seq, timeout or self.args.timeout)[1]
        return int(m.group(1)), self.con.buf[start:m.start()]

    def z1(self, cmd, timeout=None):
        return self.sh("z1 " + cmd, timeout)

    @staticmethod
    def fact(text, pattern):
        m = re.search(pattern, text)
        return m.groups() if m else None

    # ---- phases -----------------------------------------------------------------------------
    def boot(self):
        c = self.con
        i, _ = c.expect([r"Hit any key to stop autoboot", r"=> "], 60)
        if i == 0:
            c.send("\n")
            c.expect(r"=> ", 30)
        t_uboot = time.monotonic() - c.t0
        c.send("bootm 0x40400000 - 0x40000000\n")
        # Typing while zone0 boots can lose the UART's interrupt for good: no nudges until its
        # shell is up.
        c.expect(r"@Z0 READY[^@]*@", self.args.timeout)
        c.nudge = 0.25
        t = time.monotonic() - c.t0
        self.say("U-Boot prompt %.1fs, zone0 shell %.1fs" % (t_uboot, t))
        self.phase("boot to zone0 shell", t)
        # zone0 gives up on a silent zone1 a little after zone1 gives up on its own waits.
        rc, out = self.sh(". /rig/lib.sh; Z1_TIMEOUT=%d; cat /proc/cmdline" % (self.args.timeout + 30))
        if rc != 0:
            raise RuntimeError("cannot source /rig/lib.sh: " + out)

    def phase(self, name, secs):
        print("TIME  %-30s %7.1fs" % (name, secs), flush=True)

    def run_checks(self):
        a = self.args
        c = self.con
        t = time.monotonic()
        rc, out = self.sh("insmod /rig/tool/hvisor.ko && ls -l /dev/hvisor")
        if not self.result("module", rc == 0, time.monotonic() - t, "insmod hvisor.ko rc=%d" % rc):
            self.skip(ALL_CHECKS, "hvisor.ko did not load")
            return
        # zone0's side of the devices: the TAP (persistent, so that it outlives a restarted
        # backend) with its address, the buffered disk's image; /dev/vda is QEMU's disk.
        self.sh("tunctl -t %s > /dev/null && ip addr add %s/24 dev %s && ip link set %s up"
                % (a.tap, a.zone0_ip, a.tap, a.tap))
        self.sh("rm -f /tmp/blk.img && truncate -s %dM /tmp/blk.img && ls -l /tmp/blk.img /dev/vda"
                % a.disk_mib)

        if a.daemon == "ours" and self.wanted("init-order"):
            self.check_init_order()
        if not set(a.tests) & set(["daemon-ready", "zone-start", "stop"] + ZONE1_CHECKS):
            return

        # ---- the daemon -------------------------------------------------------------------
        t = time.monotonic()
        cfg = "/rig/virtio_cfg.json" if a.daemon == "ours" else "/rig/virtio_cfg_tool.json"
        if a.bridge_args:
            self.sh("BRIDGE_ARGS='%s'" % a.bridge_args)
        start = self.daemon_pos = c.pos
        self.sh("daemon_start %s %s" % (a.daemon, cfg))
        # The daemon's first lines (its pid among them) may come before the shell's status
        # marker: look for them from where the command was typed.
        c.pos = start
        ready = False
        detail = ""
        try:
            if a.daemon == "ours":
                i, m = c.expect([r"serving (\d+) devices", r"@Z0 DAEMON-EXIT rc=(\d+)@"], a.timeout)
                if i == 0:
                    serving = int(m.group(1))
                    detail = "serving %d devices" % serving
                    # Where the bridge has --pid-file, the file must name it by now.
                    has_pidfile = "@Z0 DAEMON-PIDFILE yes@" in c.buf[start:]
                    self.read_daemon_pid()
                    rc, out = self.sh("cat /tmp/bridge.pid 2> /dev/null || echo none")
                    pidfile = out.strip().splitlines()[-1] if out.strip() else "none"
                    detail += ", pid file: %s" % (pidfile if has_pidfile else "(no --pid-file option)")
                    ready = serving == a.devices and (not has_pidfile or pidfile == str(self.daemon_pid))
                    if "--cpus" not in (a.bridge_args or ""):
                        pinned, where = self.pinned_to_irq_cpu()
                        ready &= pinned
                        detail += ", " + where
                else:
                    detail = "the bridge exited (rc=%s): %s" % (
                        m.group(1), self.last_error(c.buf[start:m.start()]))
            else:
                rc, out = self.sh("log_wait 'virtio request handler loop started' %d" % a.timeout,
                                  a.timeout + 30)
                ready = rc == 0
                detail = out.strip().splitlines()[-1] if out.strip() else ""
                self.read_daemon_pid()
        except Timeout as e:
            detail = str(e)
            self.read_daemon_pid()
        t_ready = time.monotonic() - t
        self.phase("daemon ready", t_ready)
        if ready and self.wanted("bench"):
            self.cpu_ready = self.cpu_ticks()
        if not self.result("daemon-ready", ready, t_ready, detail):
            # hvisor wedges a zone0 CPU when a zone whose devices have no server is shut down:
            # zone1 is never started against a daemon that is not serving.
            self.skip(["zone-start"] + ZONE1_CHECKS, "the daemon is not serving; zone1 not started")
            self.stop_daemon()
            return

        # ---- zone1 ------------------------------------------------------------------------
        if not self.start_zone1():
            self.skip(ZONE1_CHECKS, "zone1 did not come up")
            self.stop_daemon()
            return
        if self.wanted("devices"):
            self.check_devices()
        if self.wanted("bench"):
            self.check_bench()
        if self.wanted("blk"):
            self.check_blk("blk", self.blk_serial(), "dd if=/tmp/blk.img bs=1M count=%d" % a.blk_mib)
        if self.wanted("blk-direct"):
            self.check_blk("blk-direct", "rig-direct",
                           "dd if=/dev/vda bs=1M count=%d iflag=direct" % a.blk_mib)
        if self.wanted("console"):
            self.check_console()
        if self.wanted("net"):
            self.check_net()
        if self.wanted("reset"):
            self.check_reset()
        if self.wanted("shutdown") or self.wanted("shutdown-reset-log"):
            self.check_shutdown()
        self.stop_daemon()
        if self.wanted("bench"):
            # Our bridge's counters for the whole run (hvisor-tool's daemon has none).
            m = re.search(r"stopping: ([^\n]*)", self.con.buf[self.daemon_pos:])
            if m:
                print("BENCH bridge %s" % re.sub(r"\x1b\[[0-9;]*m", "", m.group(1)).strip(), flush=True)

    def blk_serial(self):
        """The buffered disk's serial: ours is set in virtio_cfg.json; hvisor-tool has its own."""
        return "rig-blk" if self.args.daemon == "ours" else "hvisor-virblk"

    @staticmethod
    def last_error(text):
        lines = [l for l in text.splitlines() if "ERROR" in l or "error" in l]
        # hvisor colours its own log lines; a reset sequence may lead a line of zone0's.
        return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1]).strip() if lines else "(no error line)"

    def cpu_ticks(self):
        """CPU ticks so far of the daemon and everything it spawned (zone0's /proc): the
        total, and a dict by process name."""
        rc, out = self.sh("cpu_ticks %d" % self.daemon_pid)
        f = self.fact(out, r"@Z0 cpu ticks=(\d+) procs=(\d+) by=(\S*)@")
        if rc != 0 or f is None:
            raise RuntimeError("cpu_ticks failed: " + out.strip())
        by = {}
        for item in filter(None, f[2].split(",")):
            name, ticks = item.rsplit(":", 1)
            by[name] = by.get(name, 0) + int(ticks)
        return int(f[0]), by

    def minor_faults(self):
        """Minor page faults so far of the daemon and everything it spawned (zone0's /proc)."""
        rc, out = self.sh("minor_faults %d" % self.daemon_pid)
        f = self.fact(out, r"@Z0 minor faults=(\d+)@")
        if rc != 0 or f is None:
            raise RuntimeError("minor_faults failed: " + out.strip())
        return int(f[0])

    def vcpu_ticks(self):
        """Host CPU ticks so far of each of QEMU's vCPU threads ("CPU <n>/TCG", named so by
        run.sh's `-name debug-threads=on`), by n: which of the machine's CPUs (zone0's, zone1's,
        the one hvisor parks) compete for the host's cores during a phase."""
        ticks = {}
        task = "/proc/%d/task" % self.con.proc.pid
        for tid in os.listdir(task):
            try:
                with open("%s/%s/comm" % (task, tid)) as f:
                    m = re.match(r"CPU (\d+)/", f.read())
                with open("%s/%s/stat" % (task, tid)) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended
            if m:
                # utime and stime: fields 14 and 15 of stat, 12 and 13 after the comm.
                ticks[int(m.group(1))] = int(fields[11]) + int(fields[12])
        return ticks

    def bridge_counters(self):
        """Our bridge's loop counters now (its status socket), with the notify-to-call round
        trips of the blk device (the bench's zone1 has one); None with hvisor-tool."""
        if self.args.daemon != "ours":
            return None
        rc, out = self.sh("bridge_status")
        f = self.fact(out, r"@Z0 status-json (.*) status-end@")
        if rc != 0 or f is None:
            raise RuntimeError("bridge_status failed: " + out.strip())
        status = json.loads(f[0])
        counters = dict(status["counters"])
        blk = [d for d in status["devices"] if d["device_id"] == 2]
        if len(blk) != 1:
            raise RuntimeError("bridge_status: expected one blk device, got %d" % len(blk))
        counters["blk_kicks"] = blk[0]["notify_to_call"]["count"]
        counters["blk_kick_to_call_us"] = blk[0]["notify_to_call"]["total_us"]
        return counters

    @staticmethod
    def cpu_delta(after, before):
        """ "cpu_s=S cpu_by=NAME:S,..." for a phase, in seconds."""
        by = ",".join("%s:%.2f" % (n, (t - before[1].get(n, 0)) / CLK_TCK)
                      for n, t in sorted(after[1].items()))
        return "cpu_s=%.2f cpu_by=%s" % ((after[0] - before[0]) / CLK_TCK, by or "-")

    def check_bench(self):
        """bench.sh's rows: one BENCH line per phase with zone1's figures and the daemon's CPU
        seconds in zone0 during the phase. A phase that fails still prints its line, with
        `error=`. The check fails when a phase of ours errs, loses a byte or a ping, or fails
        its md5; hvisor-tool's losses and failures are figures for bench_report.py."""
        a = self.args
        t = time.monotonic()
        serial = self.blk_serial()
        bad = []
        before = [self.cpu_ticks(), time.monotonic()]
        print("BENCH phase=start %s" % self.cpu_delta(self.cpu_ready, (0, {})), flush=True)
        print("BENCH phase=zone1-boot %s" % self.cpu_delta(before[0], self.cpu_ready), flush=True)

        def done(name, facts, lost=False):
            # wall_s: the phase's time on the host, its cost in the benchmark's run time.
            after = self.cpu_ticks()
            print("BENCH phase=%s %s %s wall_s=%.1f" % (name, facts, self.cpu_delta(after, before[0]),
                                                       time.monotonic() - before[1]), flush=True)
            before[0], before[1] = after, time.monotonic()
            if ("error=" in facts or lost) and a.daemon == "ours":
                bad.append(name)

        load = (("write", "write %d" % a.bench_mib),
                ("read", "read %d" % a.bench_mib),
                ("rand", "rand %d %d" % (a.bench_mib, a.bench_rand)),
                ("randwrite", "randwrite %d %d" % (a.bench_mib, a.bench_rand)),
                ("rand-qd", "rand %d %d %d" % (a.bench_mib, a.bench_qd_rand, a.bench_qd)),
                ("randwrite-qd", "randwrite %d %d %d" % (a.bench_mib, a.bench_qd_rand, a.bench_qd)))
        for name, args in load:
            op, rest = args.split(" ", 1)
            counters = self.bridge_counters()
            faults = self.minor_faults()
            vcpus, sampled = self.vcpu_ticks(), time.monotonic()
            rc, out = self.z1("load %s %s %s" % (op, serial, rest), a.timeout * 3)
            vcpus_after, sampled = self.vcpu_ticks(), time.monotonic() - sampled
            f = self.fact(out, r"@LOAD (op=[^@]*)@")
            facts = f[0] if f else "error=no-result"
            counts = self.fact(out, r"@Z1 load-counts irqs=(\d+) all_irqs=(\d+) busy_pct=(\S+)@")
            if counts:
                facts += " z1_irqs=%s z1_all_irqs=%s z1_busy_pct=%s" % counts
            facts += " z0_faults=%d" % (self.minor_faults() - faults)
            hz = os.sysconf("SC_CLK_TCK")
            facts += " host_vcpu_s=" + ",".join("%d:%.2f" % (n, (vcpus_after[n] - vcpus.get(n, 0)) / hz)
                                                for n in sorted(vcpus_after))
            facts += " host_s=%.2f" % sampled
            after = self.bridge_counters()
            if counters and after:
                facts += "".join(" br_%s=%d" % (k, after[k] - counters[k]) for k in BRIDGE_PHASE_COUNTERS)
            if rc != 0 and "error=" not in facts:
                facts += " error=rc%d" % rc
            done(name, facts)

        # zone1 -> zone0: timed by zone1's writer.
        rc, out = self.sh("console_bench %d" % a.bench_console, a.timeout * 3 + 60)
        sent = self.fact(out, r"@Z1 bulk-tx bytes=(\d+) md5=(\S+)@")
        got = self.fact(out, r"@Z0 console-bench got_bytes=(\d+) got_md5=(\S+)@")
        secs = self.fact(out, r"@Z1 bulk-tx-time s=(\S+)@")
        if sent and got and secs:
            done("console", "bytes=%s got=%s md5_ok=%d s=%s" % (sent[0], got[0], int(sent == got), secs[0]),
                 lost=sent != got)
        else:
            done("console", "error=no-result")
        # zone0 -> zone1: timed by zone1's reader, from its ready line to its last byte.
        rc, out = self.sh("console_bench_rx %d" % a.bench_console, a.timeout * 3 + 60)
        sent = self.fact(out, r"@Z0 console-bench-rx sent_bytes=(\d+) sent_md5=(\S+)@")
        got = self.fact(out, r"@Z1 bulk-rx bytes=(\d+) md5=(\S+)@")
        secs = self.fact(out, r"@LOAD op=recv bytes=\d+ s=(\S+)@")
        if sent and got and secs:
            done("console-rx", "bytes=%s got=%s md5_ok=%d s=%s" % (
                sent[0], got[0], int(sent == got), secs[0]), lost=sent != got)
        else:
            done("console-rx", "error=no-result")

        if a.bench_net_mib:
            self.bench_net(done, before)
        self.result("bench", not bad, time.monotonic() - t,
                    "%d MiB seq, %d random 4 KiB reads and writes at QD1, %d at QD%d, console %d "
                    "bytes each way%s%s" % (
                        a.bench_mib, a.bench_rand, a.bench_qd_rand, a.bench_qd, a.bench_console,
                        ", %d pings, %d MiB TCP each way" % (a.bench_pings, a.bench_net_mib)
                        if a.bench_net_mib else "", "; failed: " + ",".join(bad) if bad else ""))

    def bench_net(self, done, before):
        """The net rows: pings, then TCP each way over zone0's TAP, as the net check moves its
        data (zone0's busybox nc ends, md5s on both sides)."""
        a = self.args
        mib = a.bench_net_mib
        rc, out = self.sh("net_listen 5555 5556 %d" % mib)
        tx_file = self.fact(out, r"@Z0 net-tx-file md5=(\S+)@")
        rc, out = self.z1("net_up %s/24 %s" % (a.zone1_ip, a.zone0_ip), 60)
        if rc != 0 or not self.fact(out, r"@Z1 ping (ok[^@]*)@"):
            err = self.fact(out, r"@Z1 (?:ping|net) FAIL ([^@]*)@")
            why = re.sub(r"\s+", "_", err[0].strip()) if err else "no-ping-result"
            for name in ("ping", "net-tx", "net-rx"):
                done(name, "error=net-up:%s" % why)
            self.sh("kill $(pidof nc) 2> /dev/null")
            return
        # The interface's setup is not charged to the ping phase.
        before[0], before[1] = self.cpu_ticks(), time.monotonic()
        rc, out = self.z1("ping_bench %s %d" % (a.zone0_ip, a.bench_pings), a.bench_pings + 60)
        f = self.fact(out, r"@Z1 ping-bench (\d+) packets transmitted, (\d+) packets received.*?"
                           r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")
        if f:
            done("ping", "count=%s received=%s rtt_min_ms=%s rtt_ms=%s rtt_max_ms=%s%s" % (
                f + (" error=rc%d" % rc if rc else "",)), lost=f[0] != f[1])
        else:
            done("ping", "error=no-result")
        rc, out = self.z1("net_tx %s 5555 %d %d" % (a.zone0_ip, mib, a.net_timeout), a.net_timeout + 60)
        sent = self.fact(out, r"@Z1 net-tx bytes=(\d+) md5=(\S+) rc=(\d+) s=(\S+) retrans=(\S+)@")
        rc0, out0 = self.sh("wc -c < /tmp/net.rx; md5sum < /tmp/net.rx")
        got = self.fact(out0, r"(\d+)\s+([0-9a-f]{32})")
        if sent and got:
            done("net-tx", "bytes=%s got=%s md5_ok=%d s=%s%s" % (
                sent[0], got[0], int(sent[:2] == got), sent[3],
                " error=rc%s" % sent[2] if sent[2] != "0" else ""), lost=sent[:2] != got)
        else:
            done("net-tx", "error=no-result")
        rc, out = self.z1("net_rx %s 5556 %d" % (a.zone0_ip, a.net_timeout), a.net_timeout + 60)
        recv = self.fact(out, r"@Z1 net-rx bytes=(\d+) md5=(\S+) rc=(\d+) s=(\S+) retrans=(\S+)@")
        if recv and tx_file:
            good = recv[1] == tx_file[0] and int(recv[0]) == mib << 20
            done("net-rx", "bytes=%d got=%s md5_ok=%d s=%s%s" % (
                mib << 20, recv[0], int(good), recv[3],
                " error=rc%s" % recv[2] if recv[2] != "0" else ""), lost=not good)
        else:
            done("net-rx", "error=no-result")
        self.sh("kill $(pidof nc) 2> /dev/null")

    def read_daemon_pid(self):
        """The daemon's pid, from the file daemon_start writes (see lib.sh for why not from its
        serial marker). None while there is no daemon."""
        rc, out = self.sh("cat /tmp/daemon.pid 2> /dev/null")
        pid = self.fact(out, r"(?m)^(\d+)\s*$") if rc == 0 else None
        self.daemon_pid = int(pid[0]) if pid else None
        return self.daemon_pid

    def check_init_order(self):
        """A config the bridge rejects: hvisor must have seen INIT_VIRTIO before the bridge
        gave up, or a zone that touches its devices later makes hvisor panic."""
        c = self.con
        t = time.monotonic()
        start = c.pos
        self.sh("daemon_start ours /rig/bad_cfg.json")
        try:
            m = c.expect(r"@Z0 DAEMON-EXIT rc=(\d+)@", 60)[1]
        except Timeout as e:
            self.result("init-order", False, time.monotonic() - t, str(e))
            if self.read_daemon_pid():
                self.sh("kill %d" % self.daemon_pid)
                self.daemon_pid = None
            return
        text = c.buf[start:m.start()]
        init = text.find("handle hvc init virtio")
        err = text.find("ERROR")
        rc = int(m.group(1))
        ok = rc != 0 and init >= 0 and err >= 0 and init < err
        if init < 0:
            why = "hvisor never logged 'handle hvc init virtio' before the bridge exited"
        elif err < 0:
            why = "no bridge error line"
        elif init > err:
            why = "hvisor's INIT_VIRTIO came after the bridge's error"
        else:
            why = "INIT_VIRTIO before the bridge's error"
        self.result("init-order", ok, time.monotonic() - t,
                    "bridge rc=%d; %s; error: %s" % (rc, why, self.last_error(text)))

    def start_zone1(self):
        a = self.args
        c = self.con
        t = time.monotonic()
        rc, out = self.sh("z1_open")
        if rc != 0:
            self.result("zone-start", False, 0.0, "no console pty: " + out.strip())
            return False
        rc, out = self.sh("cd /rig/zone1 && hvisor zone start zone1.json; r=$?; cd /; (exit $r)", 120)
        t_start = time.monotonic() - t
        self.phase("zone start returns", t_start)
        if rc != 0:
            last = out.strip().splitlines()
            self.result("zone-start", False, t_start, "hvisor zone start rc=%d: %s"
                        % (rc, last[-1] if last else ""))
            return False
        # zone1's first line on hvc0 comes from its init, once its virtio modules are loaded.
        rc, out = self.sh('z1_read "@Z1 ready"', a.timeout + 30)
        t_shell = time.monotonic() - t
        self.phase("zone start to zone1 shell", t_shell)
        ready = self.fact(out, r"@Z1 (ready[^@]*)@")
        return self.result("zone-start", rc == 0 and ready is not None, t_shell,
                           ready[0] if ready else "zone1 did not answer on its console")

    def check_devices(self):
        t = time.monotonic()
        rc, out = self.z1("devices")
        want = {"0x0001": "virtio_net", "0x0002": "virtio_blk", "0x0003": "virtio_console"}
        bound = re.findall(r"@Z1 device (\S+) id=(\S+) driver=(\S+) at=(\S+)@", out)
        missing = []
        # hvisor-tool's daemon serves no O_DIRECT disk.
        for kind, count in (("0x0001", 1), ("0x0002", 2 if self.args.daemon == "ours" else 1),
                            ("0x0003", 1)):
            n = len([b for b in bound if b[1] == kind and b[2] == want[kind]])
            if n < count:
                missing.append("%s x%d bound to %s (found %d)" % (kind, count, want[kind], n))
        disks = re.findall(r"@Z1 disk (\S+) serial=(\S*) ", out)
        self.result("devices", rc == 0 and not missing, time.monotonic() - t,
                    "; ".join(missing) if missing else "%d devices bound, disks %s"
                    % (len(bound), ",".join("%s=%s" % d for d in disks)))

    def check_blk(self, name, serial, zone0_read):
        a = self.args
        t = time.monotonic()
        rc, out = self.z1("blk %s %d" % (serial, a.blk_mib), a.timeout * 3)
        f = self.fact(out, r"@Z1 blk %s disk=(\S+) mib=\d+ written_md5=(\S+) read_md5=(\S*) "
                           r"write_s=(\S+) read_s=(\S+)" % serial)
        if f is None:
            err = self.fact(out, r"@Z1 blk %s (.*)@" % serial)
            self.result(name, False, time.monotonic() - t,
                        "zone1: %s" % (err[0] if err else "no result (rc=%d)" % rc))
            return
        disk, want, got, ws, rs = f
        rc0, out0 = self.sh("%s 2> /dev/null | md5sum" % zone0_read, a.timeout)
        img = self.fact(out0, r"([0-9a-f]{32})")
        img = img[0] if img else "?"
        ok = rc == 0 and want == got == img
        self.result(name, ok, time.monotonic() - t,
                    "%s %d MiB O_DIRECT: wrote %s, read back %s, image in zone0 %s (write %ss, "
                    "read %ss)" % (disk, a.blk_mib, want, got or "-", img, ws, rs))

    def check_console(self):
        a = self.args
        t = time.monotonic()
        details = []
        ok = True
        line = "rig-console-%08x" % random.getrandbits(32)
        rc, out = self.z1("echo_line " + line)
        echoed = "@Z1 echo %s@" % line in out
        ok &= rc == 0 and echoed
        details.append("echo %s" % ("ok" if echoed else "MISSING"))
        # zone0 and zone1 each give up after Z1_TIMEOUT; the driver waits for both.
        rc, out = self.sh("console_from_z1 %d" % a.console_bytes, a.timeout * 3 + 60)
        sent = self.fact(out, r"@Z1 bulk-tx bytes=(\d+) md5=(\S+)@")
        got = self.fact(out, r"@Z0 console-from-z1 got_bytes=(\d+) got_md5=(\S+)@")
        good = rc == 0 and sent and got and sent == got and int(sent[0]) == a.console_bytes
        ok &= bool(good)
        details.append("zone1->zone0 %s/%s bytes, md5 %s/%s" % (
            got[0] if got else "?", sent[0] if sent else "?", got[1] if got else "?",
            sent[1] if sent else "?"))
        rc, out = self.sh("console_to_z1 %d" % a.console_bytes, a.timeout * 3 + 60)
        sent = self.fact(out, r"@Z0 console-to-z1 sent_bytes=(\d+) sent_md5=(\S+)@")
        got = self.fact(out, r"@Z1 bulk-rx bytes=(\d+) md5=(\S+)@")
        good = rc == 0 and sent and got and sent == got
        ok &= bool(good)
        details.append("zone0->zone1 %s/%s bytes, md5 %s/%s" % (
            got[0] if got else "?", sent[0] if sent else "?", got[1] if got else "?",
            sent[1] if sent else "?"))
        self.result("console", ok, time.monotonic() - t, "; ".join(details))

    def check_net(self):
        a = self.args
        t = time.monotonic()
        details = []
        rc, out = self.sh("net_listen 5555 5556 %d" % a.net_mib)
        tx_file = self.fact(out, r"@Z0 net-tx-file md5=(\S+)@")
        rc, out = self.z1("net_up %s/24 %s" % (a.zone1_ip, a.zone0_ip), 60)
        ping = self.fact(out, r"@Z1 ping (ok[^@]*)@")
        if rc != 0 or not ping:
            err = self.fact(out, r"@Z1 (ping FAIL[^@]*|net FAIL[^@]*)@")
            self.result("net", False, time.monotonic() - t, err[0] if err else "no ping result")
            self.sh("kill $(pidof nc) 2> /dev/null")
            return
        details.append("ping " + ping[0])
        ok = True
        rc, out = self.z1("net_tx %s 5555 %d %d" % (a.zone0_ip, a.net_mib, a.net_timeout),
                          a.net_timeout + 60)
        sent = self.fact(out, r"@Z1 net-tx bytes=(\d+) md5=(\S+) rc=(\d+) s=(\S+) retrans=(\S+)@")
        rc0, out0 = self.sh("wc -c < /tmp/net.rx; md5sum < /tmp/net.rx")
        got = self.fact(out0, r"(\d+)\s+([0-9a-f]{32})")
        good = rc == 0 and sent and got and sent[:2] == got and int(got[0]) == a.net_mib << 20
        ok &= bool(good)
        details.append("zone1->zone0 %s bytes %s/%s in %ss (%s zone1 retransmits)" % (
            got[0] if got else "?", sent[1] if sent else "?", got[1] if got else "?",
            sent[3] if sent else "?", sent[4] if sent else "?"))
        rc, out = self.z1("net_rx %s 5556 %d" % (a.zone0_ip, a.net_timeout), a.net_timeout + 60)
        recv = self.fact(out, r"@Z1 net-rx bytes=(\d+) md5=(\S+) rc=(\d+) s=(\S+) retrans=(\S+)@")
        good = rc == 0 and recv and tx_file and recv[1] == tx_file[0] and int(recv[0]) == a.net_mib << 20
        ok &= bool(good)
        details.append("zone0->zone1 %s bytes %s/%s in %ss (%s zone1 retransmits)" % (
            recv[0] if recv else "?", tx_file[0] if tx_file else "?", recv[1] if recv else "?",
            recv[3] if recv else "?", recv[4] if recv else "?"))
        if not ok:
            # Both ends' counters and sockets, for the report.
            self.z1("diag")
            self.sh("grep rigtap /proc/net/dev; netstat -tn; ls -l /tmp/net.rx")
        self.sh("kill $(pidof nc) 2> /dev/null")
        self.result("net", ok, time.monotonic() - t, "; ".join(details))

    def check_reset(self):
        a = self.args
        t = time.monotonic()
        rc, out = self.z1("reset %s %d" % (self.blk_serial(), a.blk_mib), a.timeout * 3)
        f = self.fact(out, r"@Z1 reset dev=(\S+) disk=(\S+) before_md5=(\S+) after_md5=(\S+)@")
        if f is None:
            err = self.fact(out, r"@Z1 (reset FAIL[^@]*)@")
            self.result("reset", False, time.monotonic() - t, err[0] if err else "no result")
            return
        # The data must also be what the blk check wrote, when it ran.
        wrote = self.fact(self.con.buf, r"@Z1 blk %s disk=\S+ mib=\d+ written_md5=(\S+)"
                          % self.blk_serial())
        ok = rc == 0 and f[2] == f[3] and (wrote is None or wrote[0] == f[3])
        self.result("reset", ok, time.monotonic() - t,
                    "%s unbound and bound (%s): md5 %s before, %s after%s" % (
                        f[0], f[1], f[2], f[3], "" if wrote is None else ", blk wrote " + wrote[0]))

    def check_shutdown(self):
        a = self.args
        c = self.con
        t = time.monotonic()
        start = c.pos
        rc, out = self.sh("hvisor zone shutdown -id 1", 60)
        shut = rc == 0
        # The daemon must keep running (its exit would print DAEMON-EXIT).
        rc2, out2 = self.sh("kill -0 %d && echo daemon-alive; hvisor zone list" % self.daemon_pid)
        alive = "daemon-alive" in out2 and "@Z0 DAEMON-EXIT" not in c.buf[start:]
        if self.wanted("shutdown"):
            self.result("shutdown", shut and alive, time.monotonic() - t,
                        "zone shutdown rc=%d, daemon %s" % (rc, "alive" if alive else "GONE"))
        if self.wanted("shutdown-reset-log"):
            # The bridge's log (on the console through tee) should say that it reset zone 1's
            # devices after the shutdown.
            pattern = r"(?i)[^\n]*(zone ?1[^\n]*reset|reset[^\n]*zone ?1)[^\n]*"
            m = re.search(pattern, c.buf[start:])
            if m is None:
                try:
                    m = c.expect(pattern, 15)[1]
                except Timeout:
                    m = None
            self.result("shutdown-reset-log", m is not None, time.monotonic() - t,
                        m.group(0).strip() if m else "no bridge log line about resetting zone 1's devices")

    def pinned_to_irq_cpu(self):
        """The bridge's default --cpus: it and its backends on the CPU that takes hvisor's
        interrupt. Returns (all there, what was seen)."""
        # The quotes split the markers in the command text, so only the output matches.
        rc, out = self.sh(
            "irq=$(awk '/hvisor/ {sub(\":\", \"\", $1); print $1}' /proc/interrupts); "
            "echo \"@@IRQ""CPU $(cat /proc/irq/$irq/effective_affinity_list)@@\"; "
            "for p in $(pidof hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console); do "
            "echo \"@@CP""US $p $(awk '/Cpus_allowed_list/ {print $2}' /proc/$p/status)@@\"; done")
        irq_cpu = self.fact(out, r"@@IRQCPU (\S+)@@")
        procs = re.findall(r"@@CPUS (\d+) (\S+)@@", out)
        ok = bool(irq_cpu) and len(procs) == 1 + self.args.devices and all(
            cpus == irq_cpu[0] for _, cpus in procs)
        return ok, "hvisor IRQ on CPU %s, bridge and backends on %s" % (
            irq_cpu[0] if irq_cpu else "?", " ".join(sorted(set(c for _, c in procs))) or "?")

    def stop_daemon(self):
        """A plain SIGTERM to the daemon's pid; nothing of it may be left."""
        c = self.con
        if self.daemon_pid is None:
            return
        t = time.monotonic()
        exited = re.compile(r"@Z0 DAEMON-EXIT rc=(\d+)@").search(c.buf, self.daemon_pos)
        early = exited is not None
        if exited is None:
            self.sh("kill %d" % self.daemon_pid)
            try:
                exited = c.expect(r"@Z0 DAEMON-EXIT rc=(\d+)@", 30)[1]
            except Timeout:
                exited = None
        progs = "hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console"
        rc, out = self.sh("procs_of %s hvisor" % progs)
        left = [l for l in out.split() if re.match(r"\d+:", l)]
        # Nothing here asks our bridge for its status (SIGUSR1): a status table in its log
        # means hvisor.ko's wakeup signal (SIGHVI, the same number) was taken for one.
        dumps = "0"
        if self.args.daemon == "ours":
            rc, out = self.sh("grep -c 'status: ' /tmp/daemon.log")
            dumps = (re.findall(r"^(\d+)\s*$", out, re.M) or ["?"])[-1]
        if self.wanted("stop"):
            self.result("stop", exited is not None and exited.group(1) == "0" and not left
                        and dumps == "0",
                        time.monotonic() - t, "%s rc=%s; left running: %s; status tables logged: %s" % (
                            "the daemon had exited before SIGTERM," if early else "daemon exit",
                            exited.group(1) if exited else "none (still running)",
                            " ".join(left) or "nothing", dumps))

    def tails(self):
        """On failure: the end of the daemon's log and of both consoles."""
        print("----- daemon log (last 40 lines, zone0 /tmp/daemon.log)")
        try:
            rc, out = self.sh("tail -n 40 /tmp/daemon.log", 30)
            print(out.rstrip())
        except (Timeout, EOFError) as e:
            print("(unavailable: %s)" % e)
        z1 = [l for l in self.con.buf.splitlines() if l.startswith("z1| ")]
        print("----- zone1 console (last 40 lines)")
        print("\n".join(z1[-40:]))
        print("----- serial console (last 60 lines)")
        print("\n".join(self.con.buf.splitlines()[-60:]))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--qemu-argv", required=True, help="file: QEMU's argv, one per line")
    p.add_argument("--log", required=True, help="where the whole serial console goes")
    p.add_argument("--tests", default=",".join(ALL_CHECKS))
    p.add_argument("--xfail", default="", help="checks expected to fail (reported as XFAIL)")
    p.add_argument("--daemon", choices=["ours", "hvisor-tool"], default="ours")
    p.add_argument("--timeout", type=int, default=120, help="seconds for each wait")
    p.add_argument("--blk-mib", type=int, default=32)
    p.add_argument("--disk-mib", type=int, default=64)
    p.add_argument("--net-mib", type=int, default=16)
    p.add_argument("--net-timeout", type=int, default=180,
                   help="seconds for each TCP transfer")
    p.add_argument("--console-bytes", type=int, default=1 << 20)
    p.add_argument("--bench-mib", type=int, default=32, help="bench: MiB of the sequential rows")
    p.add_argument("--bench-rand", type=int, default=1000,
                   help="bench: 4 KiB random reads, and as many writes, at QD1")
    p.add_argument("--bench-qd", type=int, default=32, help="bench: the deep queue's depth")
    p.add_argument("--bench-qd-rand", type=int, default=4000,
                   help="bench: 4 KiB random reads, and as many writes, at the deep queue")
    p.add_argument("--bench-console", type=int, default=256 << 10,
                   help="bench: console bytes, each way")
    p.add_argument("--bench-net-mib", type=int, default=2,
                   help="bench: MiB of TCP each way (0: no net device, no net rows)")
    p.add_argument("--bench-pings", type=int, default=100, help="bench: pings, 50 ms apart")
    p.add_argument("--bridge-args", default="", help="extra options for our bridge")
    p.add_argument("--devices", type=int, default=4, help="enabled devices in our config")
    p.add_argument("--tap", default="rigtap0")
    p.add_argument("--zone0-ip", default="192.168.77.1")
    p.add_argument("--zone1-ip", default="192.168.77.2")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--qemu-pid-file", help="where QEMU's pid goes (for the caller's cleanup)")
    args = p.parse_args()
    args.tests = [t for t in args.tests.split(",") if t]
    for t in args.tests:
        if t not in ALL_CHECKS + EXTRA_CHECKS:
            p.error("unknown check %s (known: %s)" % (t, ",".join(ALL_CHECKS + EXTRA_CHECKS)))
    with open(args.qemu_argv) as f:
        argv = [l.rstrip("\n") for l in f if l.strip()]

    rig = Rig(args)
    rig.con = Console(argv, args.log, args.verbose)
    if args.qemu_pid_file:
        with open(args.qemu_pid_file, "w") as f:
            f.write("%d\n" % rig.con.proc.pid)
    aborted = None
    try:
        try:
            rig.boot()
            rig.run_checks()
        except (Timeout, EOFError, RuntimeError) as e:
            aborted = str(e)
            print("ABORT %s" % aborted, flush=True)
            rig.skip(args.tests, "aborted: " + aborted)
        failed = [r for r in rig.results if r[1] == "FAIL"]
        total = time.monotonic() - rig.con.t0
        if failed or aborted:
            if rig.con.proc.poll() is None:
                rig.tails()
            else:
                print("----- serial console (last 60 lines)")
                print("\n".join(rig.con.buf.splitlines()[-60:]))
    finally:
        rig.con.close()
        if args.qemu_pid_file:
            os.unlink(args.qemu_pid_file)
    print("SUMMARY " + " ".join("%s=%s" % (r[0], r[1]) for r in rig.results))
    print("TIME  %-30s %7.1fs  (serial input nudges: %d)" % ("total", total, rig.con.nudges))
    return 1 if failed or aborted else 0


if __name__ == "__main__":
    sys.exit(main())
