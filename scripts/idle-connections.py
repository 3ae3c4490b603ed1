#!/usr/bin/env python3
"""Resident memory that idle keep-alive client connections add to a running gateway.

Usage: idle-connections.py N PORT PID [plain|tls|h2c|tls-h2]
Opens N connections to 127.0.0.1:PORT one after the other and keeps them all open, then
prints how much the resident memory (VmRSS) of process PID grew. Each connection first
sends one request (GET /healthz) and reads its answer; `h2c` and `tls-h2` instead open an
HTTP/2 connection (its preface and SETTINGS) and read the gateway's SETTINGS. `tls` and
`tls-h2` speak TLS (ALPN http/1.1 or h2; the certificate is not checked) to a gateway
serving TLS. Needs `ulimit -n` above N (and the gateway's limits.max_connections at least N).
"""
import resource
import socket
import ssl
import sys
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
MODES = ("plain", "tls", "h2c", "tls-h2")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"no process {pid}")


def open_idle(port, mode, tls):
    s = socket.create_connection(("127.0.0.1", port))
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")
    s.settimeout(5)
    if mode.endswith("h2") or mode == "h2c":
        s.sendall(H2_PREFACE)
        if not s.recv(4096):
            raise SystemExit("no HTTP/2 SETTINGS")
    else:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        if not s.recv(4096).startswith(b"HTTP/1.1 200"):
            raise SystemExit("unexpected answer")
    return s


def main():
    if len(sys.argv) not in (4, 5) or (len(sys.argv) == 5 and sys.argv[4] not in MODES):
        raise SystemExit(__doc__)
    n, port, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) == 5 else "plain"
    tls = None
    if mode.startswith("tls"):
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["h2"] if mode == "tls-h2" else ["http/1.1"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
    before = rss_mib(pid)
    conns = [open_idle(port, mode, tls) for _ in range(n)]
    time.sleep(1)
    grown = rss_mib(pid) - before
    print(f"{n} idle keep-alive connections ({mode}): +{grown:.1f} MiB ({grown * 1024 / n:.1f} KiB each)")
    del conns


if __name__ == "__main__":
    main()
