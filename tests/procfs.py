"""What /proc says of processes and TCP sockets, for tests that check who holds what."""

from __future__ import annotations

import os
from pathlib import Path

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


def children(pid: int) -> list[int]:
    """``pid``'s direct children."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_inodes(table: str, port: int, state: str) -> set[int]:
    """Inodes of the IPv4 TCP sockets in ``table`` (the text of a /proc/.../net/tcp)
    whose local port is ``port`` and whose state is ``state``."""
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes
