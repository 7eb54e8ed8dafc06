"""Work inside many namespaces from one short-lived process: ``python -m bench.nsctl``.

Spawning ``ip netns exec`` a thousand times costs seconds; one process that
``setns(2)``-es from namespace to namespace does the same in milliseconds. It runs
as a child so the benchmark's own process never leaves the host namespace.

    lo-up           bring ``lo`` up in each namespace named on stdin
    probe PORT PATH [ADDR]
                    GET http://ADDR:PORT/PATH (ADDR defaults to 127.0.0.1) inside each
                    namespace on stdin; print one JSON object: status counts, the
                    first failure and the first reply's body

Only addresses inside namespaces the benchmark created are ever contacted.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000  # <sched.h>
SIOCGIFFLAGS = 0x8913  # <linux/sockios.h>
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1  # <net/if.h>
PREFIX = "m169b-"
DEADLINE = 120.0  # seconds for the whole command, however many namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def enter(name: str) -> None:
    if not name.startswith(PREFIX) or "/" in name:
        raise SystemExit(f"nsctl: refusing namespace {name!r} (not the benchmark's)")
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


def get(address: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((address, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: metadata\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 and line[1].isdigit() else 0), body


def main(argv: list[str]) -> int:
    names = [n.strip() for n in sys.stdin if n.strip()]
    deadline = time.monotonic() + DEADLINE
    counts: dict[str, int] = {}
    first_failure = ""
    first_body = ""
    for name in names:
        if time.monotonic() > deadline:
            first_failure = first_failure or "deadline reached"
            break
        enter(name)
        if argv[0] == "lo-up":
            lo_up()
            continue
        try:
            code, body = get(argv[3] if len(argv) > 3 else "127.0.0.1", int(argv[1]), argv[2])
            status = str(code)
            first_body = first_body or body[:300].decode("utf-8", "replace")
        except OSError as exc:
            status = type(exc).__name__
        counts[status] = counts.get(status, 0) + 1
        if status != "200" and not first_failure:
            first_failure = f"{name}: {status}"
    print(json.dumps({"counts": counts, "first_failure": first_failure, "first_body": first_body}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
