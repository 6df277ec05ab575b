#!/usr/bin/env python3
"""Host side of uml-console-tests.sh.

  uml-console-peer.py client --socket PATH --result FILE [--bulk] [--timeout SECONDS]
      A client of one vhost-user-console --socket port. Connects (waiting for the socket to
      appear), then:
  echo  waits for a line `<tag>-ready` from the guest, sends `host-line-<tag>-<nonce>` and
        waits for the guest's `guest-echo host-line-<tag>-<nonce>`; records
        `echo tag=<tag> sent=<line> back=<line>`.
  bulk  (with --bulk) waits for `bulk <bytes> <md5>`, reads exactly that many bytes, answers
        `host-md5 <md5 of what arrived>` and records `bulk bytes=<n> md5=<md5> announced=<md5>`.
      Lines before the expected ones (a login prompt, stray output) are skipped. Every step has
      a deadline; on failure the result file says what happened last.
  uml-console-peer.py resize --pty PATH --cols N --rows N
      What a terminal emulator does when its window is resized (TIOCSWINSZ on the pty), followed
      by a keystroke. The pty is opened with O_NOCTTY, so the caller never takes it as its
      controlling terminal.
"""
import argparse
import fcntl
import hashlib
import os
import secrets
import socket
import struct
import sys
import termios
import time


def record(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


class Session:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the console closed")
        self.buf += chunk

    def line(self):
        while b"\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").rstrip("\r")

    def exactly(self, count):
        while len(self.buf) < count:
            self._fill()
        data, self.buf = self.buf[:count], self.buf[count:]
        return data

    def wait_for(self, match):
        while True:
            line = self.line()
            if match(line):
                return line


def run(args):
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(args.socket):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no console socket {args.socket}")
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(args.socket)
        sock.settimeout(args.timeout)
        session = Session(sock)
        ready = session.wait_for(lambda l: l.endswith("-ready"))
        tag = ready[: -len("-ready")]
        sent = f"host-line-{tag}-{secrets.token_hex(6)}"
        sock.sendall(sent.encode() + b"\n")
        back = session.wait_for(lambda l: l.startswith("guest-echo "))
        record(args.result, f"echo tag={tag} sent={sent} back={back[len('guest-echo '):]}")
        if not args.bulk:
            return
        header = session.wait_for(lambda l: l.startswith("bulk "))
        _, count, announced = header.split()
        data = session.exactly(int(count))
        got = hashlib.md5(data).hexdigest()
        sock.sendall(f"host-md5 {got}\n".encode())
        record(args.result, f"bulk bytes={len(data)} md5={got} announced={announced}")


def resize(args):
    fd = os.open(args.pty, os.O_RDWR | os.O_NOCTTY)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", args.rows, args.cols, 0, 0))
        os.write(fd, b"x")
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--socket", required=True)
    c.add_argument("--result", required=True)
    c.add_argument("--bulk", action="store_true")
    c.add_argument("--timeout", type=float, default=60)
    r = sub.add_parser("resize")
    r.add_argument("--pty", required=True)
    r.add_argument("--cols", type=int, required=True)
    r.add_argument("--rows", type=int, required=True)
    args = ap.parse_args()
    if args.cmd == "resize":
        resize(args)
        return
    try:
        run(args)
    except (OSError, EOFError, ValueError) as e:
        record(args.result, f"error {e}")
        sys.exit(f"uml-console-peer.py: {e}")


if __name__ == "__main__":
    main()
