#!/usr/bin/env python3
"""Resident memory that idle keep-alive client connections add to a running gateway.

Usage: idle-connections.py N PORT PID
Opens N connections to 127.0.0.1:PORT one after the other, sends each one request
(GET /healthz) and reads its answer, keeps them all open, then prints how much the
resident memory (VmRSS) of process PID grew. Needs `ulimit -n` above N (and the
gateway's limits.max_connections at least N).
"""
import resource
import socket
import sys
import time


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"no process {pid}")


def main():
    n, port, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
    before = rss_mib(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        if not s.recv(4096).startswith(b"HTTP/1.1 200"):
            raise SystemExit("unexpected answer")
        conns.append(s)
    time.sleep(1)
    grown = rss_mib(pid) - before
    print(f"{n} idle keep-alive connections: +{grown:.1f} MiB ({grown * 1024 / n:.1f} KiB each)")


if __name__ == "__main__":
    main()
