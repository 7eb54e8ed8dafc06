"""Listeners that accept every waiting connection per wake-up (http.acceptor), on
uvloop as serve and the proxy run them, and on asyncio's own loop."""

from __future__ import annotations

import asyncio
import queue
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, ClassVar

import pytest
import uvloop

from meta169.http.acceptor import Listener

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


class Echo(asyncio.Protocol):
    """Answers one line with its upper case, then closes."""

    made: ClassVar[list[Echo]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]
        self.transport.close()


def _listening(family: socket.AddressFamily, where: Path) -> tuple[socket.socket, object]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        sock.bind(str(where))
        address: object = str(where)
    else:
        sock.bind(("127.0.0.1", 0))
        address = sock.getsockname()
    sock.listen(128)
    return sock, address


async def _talk(family: socket.AddressFamily, address: object, text: bytes) -> bytes:
    if family == socket.AF_UNIX:
        reader, writer = await asyncio.open_unix_connection(str(address))
    else:
        host, port = address  # type: ignore[misc]
        reader, writer = await asyncio.open_connection(host, port)
    writer.write(text)
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return got


@pytest.mark.parametrize("loop_name", list(LOOPS))
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
def test_acceptor_takes_every_waiting_connection_in_one_wakeup(
    tmp_path: Path, loop_name: str, family: socket.AddressFamily
) -> None:
    sock, address = _listening(family, tmp_path / "l.sock")
    # Ten clients connect before the loop runs: the kernel holds them in the backlog.
    clients = []
    for _ in range(10):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.connect(address)  # type: ignore[arg-type]
        clients.append(c)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        Echo.made.clear()
        listener = Listener(loop, sock, Echo)
        listener._ready()  # one readiness event
        await asyncio.sleep(0.05)  # connection_made runs on the loop
        assert len(Echo.made) == 10
        for i, c in enumerate(clients):
            c.setblocking(False)
            c.sendall(b"hello %d" % i)
        for i, c in enumerate(clients):
            assert await asyncio.wait_for(loop.sock_recv(c, 100), 5) == b"HELLO %d" % i
        listener.close()

    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            runner.run(body())
    finally:
        for c in clients:
            c.close()
        sock.close()


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_acceptor_serves_then_stops_on_close(tmp_path: Path, loop_name: str) -> None:
    sock, address = _listening(socket.AF_INET, tmp_path)

    async def body() -> None:
        listener = Listener(asyncio.get_running_loop(), sock, Echo, burst=2)
        assert listener.is_serving() and listener.sockets == (sock,)
        replies = await asyncio.gather(*(_talk(socket.AF_INET, address, b"x%d" % i) for i in range(20)))
        assert sorted(replies) == sorted(b"X%d" % i for i in range(20))
        listener.close()
        listener.close()  # twice is harmless
        await listener.wait_closed()
        assert not listener.is_serving() and listener.sockets == ()
        with pytest.raises(ConnectionRefusedError):
            await _talk(socket.AF_INET, address, b"late")

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(body())


def test_acceptor_refuses_a_burst_below_one(tmp_path: Path) -> None:
    sock, _ = _listening(socket.AF_INET, tmp_path)

    async def body() -> None:
        with pytest.raises(ValueError):
            Listener(asyncio.get_running_loop(), sock, Echo, burst=0)

    try:
        asyncio.run(body())
    finally:
        sock.close()


SERVER = textwrap.dedent(
    """
    import asyncio, logging, os, resource, socket, sys
    import uvloop
    from meta169.http.acceptor import Listener

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data.upper())
            self.transport.close()

    async def main():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        Listener(asyncio.get_running_loop(), sock, Echo)
        # Room for a few connections at a time (the listing's own descriptor is
        # counted too), fewer than the test opens.
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(sock.getsockname()[1], flush=True)
        await asyncio.sleep(60)

    uvloop.run(main())
    """
)
CLIENTS = 8  # more than the server has descriptors for


def _lines(stream: IO[str], into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_acceptor_out_of_descriptors_pauses_and_recovers(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    stderr: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stderr, stderr), daemon=True)
    reader.start()
    seen: list[str] = []
    clients: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        # The clients connect and stay silent: the server holds every connection it
        # accepts (Echo answers only once it has data), so with all of them waiting in
        # the backlog it runs out of descriptors for sure.
        for _ in range(CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        while not any("pausing" in line for line in seen):
            line = stderr.get(timeout=10)
            assert line is not None, "".join(seen)
            seen.append(line)
        # Now every client talks. The connections the server holds are answered and
        # closed, it goes on accepting after the pause, and so on until every client
        # is answered: it never spins or drops the listener.
        for i, c in enumerate(clients):
            c.sendall(b"client %d" % i)
        for i, c in enumerate(clients):
            assert c.recv(100) == b"CLIENT %d" % i
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    while (line := stderr.get(timeout=10)) is not None:
        seen.append(line)
    err = "".join(seen)
    assert "pausing" in err and "Too many open files" in err, err
