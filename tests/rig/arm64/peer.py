#!/usr/bin/env python3
"""Host-side peers for the arm64 rig's net, vsock and console tests (run.sh starts them before the guest).

  peer.py net (--addr A --port P | --unix PATH) --expect-bytes N --send FILE --result FILE
      (inside the test's network namespace, or on the UNIX socket vhost-device-vsock connects
      the guest's stream to) first connection: the guest sends; read N bytes (or up to EOF),
      then close, and record `received bytes=.. md5=..`. Second connection: send FILE and
      close, and record `sent bytes=.. md5=..`.
  peer.py console (--socket PATH | --tcp HOST:PORT) [--no-reply] --result FILE
      attach to the console backend's client socket (or the TCP port of vhost-device-console's
      network backend), wait for one line from the guest, answer
      `host-echo <line>`, record `line=<line>`. Then wait for `rig-bulk <bytes> <md5>`, read
      exactly that many bytes, answer `host-md5 <md5 of what arrived>` and record
      `bulk bytes=<n> md5=<md5>`. --no-reply records the same but sends nothing back.

Every step has a deadline (--timeout); the result file says what happened either way.
"""
import argparse
import hashlib
import socket
import sys
import time


def record(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def net(args):
    deadline = time.monotonic() + args.timeout
    if args.unix:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(args.unix)
        server.listen(1)
    else:
        server = socket.create_server((args.addr, args.port), backlog=1)
    with server:
        record(args.result, "listening")
        server.settimeout(args.timeout)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(max(deadline - time.monotonic(), 1))
            digest, got = hashlib.md5(), 0
            while got < args.expect_bytes:
                chunk = conn.recv(min(1 << 16, args.expect_bytes - got))
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
        record(args.result, f"received bytes={got} md5={digest.hexdigest()}")
        server.settimeout(max(deadline - time.monotonic(), 1))
        conn, _ = server.accept()
        with conn, open(args.send, "rb") as f:
            data = f.read()
            conn.settimeout(max(deadline - time.monotonic(), 1))
            conn.sendall(data)
        record(args.result, f"sent bytes={len(data)} md5={hashlib.md5(data).hexdigest()}")


class LineReader:
    """Lines and then raw bytes from one stream socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def line(self):
        while b"\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip("\r")

    def exactly(self, count):
        while len(self.buf) < count:
            self._fill()
        data, self.buf = self.buf[:count], self.buf[count:]
        return data


def connect_console(args):
    """The backend's client end; it may not listen yet (vhost-device-console opens its TCP
    port once the bridge has connected), so keep trying until the deadline."""
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            if args.tcp:
                host, port = args.tcp.rsplit(":", 1)
                return socket.create_connection((host, int(port)))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(args.socket)
            except OSError:
                sock.close()
                raise
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sys.exit(f"peer.py: the console backend never accepted ({args.tcp or args.socket})")
            time.sleep(0.05)


def console(args):
    with connect_console(args) as sock:
        sock.settimeout(args.timeout)
        reader = LineReader(sock)
        try:
            # The guest's line is the first one that starts with the test's prefix: anything
            # the console printed before (a getty, kernel output) is skipped.
            text = reader.line()
            while not text.startswith(args.prefix):
                text = reader.line()
            if not args.no_reply:
                sock.sendall(b"host-echo " + text.encode() + b"\n")
            record(args.result, f"line={text}")
            header = reader.line()
            while not header.startswith("rig-bulk "):
                header = reader.line()
            count = int(header.split()[1])
            data = reader.exactly(count)
        except EOFError:
            record(args.result, "eof")
            return
        digest = hashlib.md5(data).hexdigest()
        if not args.no_reply:
            sock.sendall(f"host-md5 {digest}\n".encode())
        record(args.result, f"bulk bytes={len(data)} md5={digest}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("net")
    where = n.add_mutually_exclusive_group(required=True)
    where.add_argument("--addr")
    where.add_argument("--unix")
    n.add_argument("--port", type=int)
    n.add_argument("--expect-bytes", type=int, required=True)
    n.add_argument("--send", required=True)
    n.add_argument("--result", required=True)
    n.add_argument("--timeout", type=float, default=150)
    c = sub.add_parser("console")
    at = c.add_mutually_exclusive_group(required=True)
    at.add_argument("--socket")
    at.add_argument("--tcp")
    c.add_argument("--result", required=True)
    c.add_argument("--prefix", default="rig-console-")
    c.add_argument("--no-reply", action="store_true")
    c.add_argument("--timeout", type=float, default=150)
    args = ap.parse_args()
    try:
        {"net": net, "console": console}[args.cmd](args)
    except (OSError, socket.timeout, ValueError, IndexError) as e:
        record(args.result, f"error {e}")
        sys.exit(f"peer.py {args.cmd}: {e}")


if __name__ == "__main__":
    main()
