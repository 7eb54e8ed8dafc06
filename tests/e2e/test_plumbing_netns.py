"""Namespaces for real: sockets opened inside, metadata addresses, veths between namespaces.

All traffic stays between namespaces these tests create; none has a link to the
host namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Callable

import pytest

from meta169.errors import PlumbingError, ValidationError
from meta169.plumbing import netns as nsmod
from meta169.plumbing.command import run

pytestmark = pytest.mark.e2e

METADATA = ipaddress.ip_address("169.254.169.254")
METADATA_V6 = ipaddress.ip_address("fe80::a9fe:a9fe")


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _links(ns: str) -> set[str]:
    out = run(nsmod.ip_argv(ns, "-o", "link", "show")).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _pair(netns: Callable[[], str], veth: Callable[..., tuple[str, str]]) -> tuple[str, str, str, str]:
    """Two namespaces joined by one veth: (server ns, its end, client ns, its end), 10.0.0.3 and .5."""
    server_ns, client_ns = netns(), netns()
    server_if, client_if = veth(server_ns, client_ns)
    nsmod.add_address(server_ns, server_if, ipaddress.ip_interface("10.0.0.3/24"))
    nsmod.add_address(client_ns, client_if, ipaddress.ip_interface("10.0.0.5/24"))
    # Isolation: each namespace holds lo and its veth end, nothing bridged to the host.
    assert _links(server_ns) == {"lo", server_if}
    assert _links(client_ns) == {"lo", client_if}
    return server_ns, server_if, client_ns, client_if


def _serve_once(server: socket.socket, seen: dict[str, object]) -> threading.Thread:
    def serve() -> None:
        conn, peer = server.accept()
        with conn:
            seen["peer"] = peer[0]
            seen["data"] = conn.recv(64)
            conn.sendall(b"pong")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _ping(client_ns: str, address: tuple[object, ...], family: socket.AddressFamily) -> bytes:
    def connect() -> bytes:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(address)
            sock.sendall(b"ping")
            return sock.recv(64)

    return nsmod.call_in_netns(client_ns, connect)


def test_netns_open_socket_binds_metadata_address_reachable_from_peer(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    server_ns, server_if, client_ns, _ = _pair(netns, veth)
    assert nsmod.add_metadata_address(server_ns, server_if) is True
    assert nsmod.add_metadata_address(server_ns, server_if) is False  # idempotent
    assert ipaddress.ip_interface("169.254.169.254/32") in nsmod.addresses(server_ns, server_if)
    nsmod.add_route(client_ns, ipaddress.ip_network("169.254.169.254/32"), via=ipaddress.ip_address("10.0.0.3"))

    before = _thread_netns()
    server = nsmod.open_socket_in_netns(server_ns, socket.AF_INET, socket.SOCK_STREAM, METADATA, 80)
    assert _thread_netns() == before  # the caller's thread never moved
    seen: dict[str, object] = {}
    with server:
        assert server.getsockname() == ("169.254.169.254", 80)
        thread = _serve_once(server, seen)
        assert _ping(client_ns, ("169.254.169.254", 80), socket.AF_INET) == b"pong"
        thread.join(5)
    assert seen == {"peer": "10.0.0.5", "data": b"ping"}


def test_netns_open_socket_ipv6_link_local_metadata_address(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    server_ns, server_if, client_ns, client_if = _pair(netns, veth)
    assert nsmod.add_metadata_address(server_ns, server_if, family=6, nodad=True) is True
    assert nsmod.add_metadata_address(server_ns, server_if, family=6, nodad=True) is False
    nsmod.wait_for_dad(client_ns, client_if)  # the client's own fe80:: source address

    server = nsmod.open_socket_in_netns(
        server_ns, socket.AF_INET6, socket.SOCK_STREAM, METADATA_V6, 80, interface=server_if, freebind=True
    )
    seen: dict[str, object] = {}
    with server:
        thread = _serve_once(server, seen)
        scope = nsmod.call_in_netns(client_ns, lambda: socket.if_nametoindex(client_if))
        assert _ping(client_ns, ("fe80::a9fe:a9fe", 80, 0, scope), socket.AF_INET6) == b"pong"
        thread.join(5)
    assert str(seen["peer"]).startswith("fe80::")
    assert nsmod.remove_metadata_address(server_ns, server_if, family=6) is True
    assert nsmod.remove_metadata_address(server_ns, server_if, family=6) is False


def test_netns_remove_metadata_address_is_idempotent(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    server_ns, server_if, _, _ = _pair(netns, veth)
    nsmod.add_metadata_address(server_ns, server_if)
    assert nsmod.remove_metadata_address(server_ns, server_if) is True
    assert nsmod.remove_metadata_address(server_ns, server_if) is False
    left = nsmod.addresses(server_ns, server_if)
    assert ipaddress.ip_interface("169.254.169.254/32") not in left
    assert ipaddress.ip_interface("10.0.0.3/24") in left


def test_netns_open_socket_reports_unbindable_address(netns: Callable[[], str]) -> None:
    ns = netns()
    with pytest.raises(PlumbingError, match=r"cannot bind 169\.254\.169\.254:80"):
        nsmod.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM, METADATA, 80)
    # With freebind the same bind succeeds before the address exists.
    nsmod.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM, METADATA, 80, freebind=True).close()


def test_netns_call_in_missing_namespace_fails() -> None:
    with pytest.raises(PlumbingError, match="no network namespace"):
        nsmod.call_in_netns("m169t-does-not-exist", lambda: None)


def test_netns_call_in_netns_propagates_errors_and_keeps_caller_namespace(netns: Callable[[], str]) -> None:
    ns = netns()
    before = _thread_netns()
    inside = nsmod.call_in_netns(ns, _thread_netns)
    assert inside != before
    with pytest.raises(ValidationError, match="boom"):
        nsmod.call_in_netns(ns, lambda: (_ for _ in ()).throw(ValidationError("boom")))
    assert _thread_netns() == before
