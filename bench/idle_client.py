#!/usr/bin/env python3
"""Memory per idle keep-alive client connection of a proxy (stdlib only; run by bench/idle.sh).

Opens N keep-alive connections to HOST:PORT and holds them idle, then sends one GET on each
(at most --concurrency in flight) and holds them idle again. The proxy's resident memory
(VmRSS of --pid, the one process that accepts and serves) is read before, with the fresh
connections idle, and with the used connections idle; the differences divided by N are the
figures. Before the baseline, --warmup requests go through --concurrency connections (then
closed), so the proxy's pools, caches and allocator are warm and the upstream pool is already
as large as the request phase will need it.

Prints one line of key=value pairs:
  label=... n=N base_kib=... fresh_kib=... used_kib=... fresh_per_conn_kib=... used_per_conn_kib=...
Exits 1 when a connection was refused, closed by the proxy, or answered with anything but 200.
"""

import argparse
import os
import resource
import selectors
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(pid, quiet, longest):
    """RSS once it stops moving: two readings `quiet` seconds apart within 0.5%."""
    deadline = time.monotonic() + longest
    last = rss_kib(pid)
    while True:
        time.sleep(quiet)
        now = rss_kib(pid)
        if abs(now - last) <= max(64, last // 200) or time.monotonic() > deadline:
            return now
        last = now


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 16
    if hard != resource.RLIM_INFINITY and hard < want:
        raise SystemExit(f"{n} connections need ulimit -n {want}; the hard limit is {hard}")
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def connect_all(host, port, n, pid=None, batch=64):
    """N connected sockets (non-blocking connects, `batch` at a time). With `pid`, each batch
    waits until the proxy has accepted it: a listen backlog is short (128 for a std listener),
    and a connection past it is dropped by the server's kernel while the client's side still
    looks established."""
    socks = []
    fds = open_fds(pid) if pid else 0
    sel = selectors.DefaultSelector()
    while len(socks) < n:
        pending = {}
        for _ in range(min(batch, n - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, 115):  # EINPROGRESS
                raise OSError(err, os.strerror(err))
            sel.register(s, selectors.EVENT_WRITE)
            pending[s.fileno()] = s
        deadline = time.monotonic() + 30
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} connections not established in 30 s")
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                sel.unregister(s)
                del pending[s.fileno()]
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect: " + os.strerror(err))
                socks.append(s)
        if pid:
            wait_accepted(pid, fds, len(socks))
    sel.close()
    return socks


def wait_accepted(pid, before, n, timeout=30):
    """Until the proxy holds n more file descriptors than it did (every connection accepted)."""
    deadline = time.monotonic() + timeout
    while open_fds(pid) < before + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the proxy holds {open_fds(pid) - before} of {n} connections")
        time.sleep(0.002)


def answer_complete(buf):
    """Whether buf holds one whole answer (content-length framing); raises on a non-200."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].decode("latin-1")
    status = head.split("\r\n", 1)[0]
    if not status.startswith("HTTP/1.1 200"):
        raise RuntimeError(f"answer: {status!r}")
    length = None
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise RuntimeError("chunked answer: the benchmark's backend sends content-length")
    if length is None:
        raise RuntimeError("answer without content-length")
    return len(buf) >= end + 4 + length


def one_request_each(socks, host, path, concurrency):
    """One GET on every socket, at most `concurrency` in flight; each answer read whole."""
    request = f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    bufs = {}
    todo = iter(socks)
    in_flight = 0
    done = 0

    def start_next():
        nonlocal in_flight
        s = next(todo, None)
        if s is None:
            return
        s.setblocking(True)
        s.sendall(request)  # a few bytes: the send buffer takes them at once
        s.setblocking(False)
        bufs[s.fileno()] = bytearray()
        sel.register(s, selectors.EVENT_READ)
        in_flight += 1

    for _ in range(concurrency):
        start_next()
    deadline = time.monotonic() + 300
    while in_flight:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{in_flight} answers missing after 300 s")
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("the proxy closed a connection before answering")
            buf = bufs[s.fileno()]
            buf += chunk
            if answer_complete(bytes(buf)):
                sel.unregister(s)
                del bufs[s.fileno()]
                in_flight -= 1
                done += 1
                start_next()
    sel.close()
    return done


def closed_by_peer(socks):
    """How many of the idle sockets the proxy has closed (readable with EOF)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    for key, _ in sel.select(timeout=0):
        try:
            if not key.fileobj.recv(1, socket.MSG_PEEK):
                closed += 1
        except OSError:
            closed += 1
    sel.close()
    return closed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="the proxy process to measure")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("-n", type=int, default=1000, help="idle connections")
    ap.add_argument("--path", default="/")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    ap.add_argument("--warmup", type=int, default=2000, help="requests before the baseline")
    ap.add_argument("--label", default="proxy")
    ap.add_argument("--quiet", type=float, default=1.0, help="seconds between RSS readings")
    args = ap.parse_args()
    raise_nofile(args.n + args.concurrency)

    warm = connect_all(args.host, args.port, args.concurrency)
    for _ in range(max(1, args.warmup // args.concurrency)):
        one_request_each(warm, args.host, args.path, args.concurrency)
    for s in warm:
        s.close()
    time.sleep(args.quiet)

    base = settle(args.pid, args.quiet, 10)
    socks = connect_all(args.host, args.port, args.n, args.pid)
    fresh = settle(args.pid, args.quiet, 20)
    one_request_each(socks, args.host, args.path, args.concurrency)
    used = settle(args.pid, args.quiet, 20)
    closed = closed_by_peer(socks)
    for s in socks:
        s.close()
    n = args.n
    print(
        f"label={args.label} n={n} base_kib={base} fresh_kib={fresh} used_kib={used} "
        f"fresh_per_conn_kib={(fresh - base) / n:.2f} used_per_conn_kib={(used - base) / n:.2f} "
        f"closed={closed}",
        flush=True,
    )
    if closed:
        print(f"{closed} idle connections were closed by the proxy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
