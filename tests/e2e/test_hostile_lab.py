"""The hostile suite, run against a real lab.

Guests (lab VMs) attack through the real path: option 121 route, the router's
REDIRECT or the isolated DHCP namespace, ``meta169 proxy``, ``meta169 serve`` and the
lab's registry. Forgers on the host attack a second ``meta169 serve`` on loopback
that reads the same registry, with a TCP proxy listener (per-request HMAC) and a
Neutron listener (X-Instance-ID-Signature): they have no secret, or replay one.

Every case asserts the exact status and that no byte only another VM owns (uuid,
user data, SSH key) is in any reply. The cases are tables in ``hostile_cases``;
``test_hostile_case_count`` prints how many there are.
"""

from __future__ import annotations

import inspect
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meta169.lab import Lab
from meta169.lab import plan as lp
from meta169.model import MetadataOptions
from tests.counters import SUMMARY
from tests.e2e import hostile_cases as hc
from tests.e2e.lab_fixture import METADATA_V4, vm_connect, vm_request
from tests.integration.serving import ServeProcess, get, start_serve

pytestmark = pytest.mark.e2e

VMS = ("a1", "a2", "b1", "b2")


@pytest.fixture(scope="module")
def tokens(lab: Lab) -> dict[str, str]:
    """A 6-hour IMDSv2 token per VM, each obtained from inside that VM."""
    return {vm: hc.get_token(lab, vm) for vm in VMS}


@dataclass(frozen=True)
class Forgeable:
    """The loopback serve: its proxy and Neutron listeners and their secrets."""

    proxy: tuple[str, int]
    proxy_secret: bytes
    neutron: tuple[str, int]
    neutron_secret: bytes


def _secret_file(path: Path) -> bytes:
    value = secrets.token_hex(32)
    path.write_text(value)
    path.chmod(0o600)
    return value.encode()


@pytest.fixture(scope="module")
def forgeable(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forgeable]:
    """A second serve on 127.0.0.1 over the lab's registry (host namespace, loopback only)."""
    directory = tmp_path_factory.mktemp("hostile-secrets")
    proxy_secret = _secret_file(directory / "proxy.secret")
    neutron_secret = _secret_file(directory / "neutron.secret")
    srv: ServeProcess = start_serve(
        lab.plan.paths.registry_url,
        ["127.0.0.1:0=proxy", "127.0.0.1:0=neutron"],
        "--proxy-secret-file",
        str(directory / "proxy.secret"),
        "--neutron-secret-file",
        str(directory / "neutron.secret"),
    )
    try:
        yield Forgeable(srv.addresses[0], proxy_secret, srv.addresses[1], neutron_secret)
    finally:
        log = srv.stop()
        # Secrets never reach serve's log, even after it refused forgeries.
        assert proxy_secret.decode() not in log and neutron_secret.decode() not in log


def _check_body(lab: Lab, vm: str, status: int, body: bytes, context: object, *, own: bool) -> None:
    hc.assert_no_leak(lab, vm, body, context)
    if own and status == 200:
        assert body == lab.vm(vm).uuid.encode(), (context, body[:200])


# --- guests forging identity headers ------------------------------------------------------


@pytest.mark.parametrize("case", hc.FORGERIES, ids=lambda c: c.id)
def test_hostile_forged_identity(lab: Lab, case: hc.Forgery) -> None:
    headers = case.headers(lab.vm(case.victim))
    me = case.caller
    reply = vm_request(lab, me, hc.ID_PATH, host=case.host, headers=headers)
    assert (reply.status, reply.body) == (200, lab.vm(me).uuid.encode()), (headers, reply.body[:200])
    data = vm_request(lab, me, hc.USER_DATA_PATH, host=case.host, headers=headers)
    assert (data.status, data.body) == (200, hc.own_user_data(lab, me)), headers
    for body in (reply.body, data.body):
        hc.assert_no_leak(lab, me, body, headers)


# --- tokens, token PUT rules, framing: raw bytes from a guest --------------------------------


def _run_raw(lab: Lab, case: hc.RawCase, tokens: dict[str, str]) -> None:
    reply = hc.vm_raw(lab, case.caller, case.build(tokens), timeout=5)
    assert reply.closed, f"no close within 5 s; got {reply.data[:200]!r}"
    got = hc.responses(reply.data)
    assert tuple(r.status for r in got) == case.statuses, [(r.status, r.body[:100]) for r in got]
    for r in got:
        _check_body(lab, case.caller, r.status, r.body, case.id, own=case.own)


@pytest.mark.parametrize("case", hc.TOKEN_CASES, ids=lambda c: c.id)
def test_hostile_token(lab: Lab, tokens: dict[str, str], case: hc.RawCase) -> None:
    _run_raw(lab, case, tokens)


@pytest.mark.parametrize("case", hc.FRAMING_CASES, ids=lambda c: c.id)
def test_hostile_framing(lab: Lab, tokens: dict[str, str], case: hc.RawCase) -> None:
    _run_raw(lab, case, tokens)


def test_hostile_expired_token(lab: Lab) -> None:
    fresh = {vm: hc.get_token(lab, vm, ttl=1) for vm in ("a1", "b1")}
    for vm, token in fresh.items():
        ok = vm_request(lab, vm, hc.ID_PATH, headers={hc.TOKEN_HEADER: token})
        assert (ok.status, ok.body) == (200, lab.vm(vm).uuid.encode())
    time.sleep(2.1)  # expiry is at most issue time + TTL rounded up: 2 s
    for vm, token in fresh.items():
        for path in (hc.ID_PATH, hc.USER_DATA_PATH, hc.OS_META_PATH):
            reply = vm_request(lab, vm, path, headers={hc.TOKEN_HEADER: token})
            assert reply.status == 401, (vm, path, reply.body[:200])
            hc.assert_no_leak(lab, vm, reply.body, path)


def test_hostile_slowloris(lab: Lab) -> None:
    # One header line a second, never the blank line: the proxy must answer 408 once
    # its request timeout (10 s, http.limits.Limits) is up, and close.
    head = hc.request_bytes("GET", hc.ID_PATH).split(b"Connection")[0]
    trickle = (head, *(b"X-Slow-%d: a\r\n" % i for i in range(30)))
    reply = hc.vm_raw(lab, "b2", trickle, pause=1.0, timeout=5)
    assert reply.closed, reply.data[:200]
    got = hc.responses(reply.data)
    assert [r.status for r in got] == [408], reply.data[:200]
    assert 9.0 <= reply.seconds <= 13.0, reply.seconds
    hc.assert_no_leak(lab, "b2", reply.data, "slowloris")


# --- where a guest can and cannot go -------------------------------------------------------


def test_hostile_overlapping_ips(lab: Lab) -> None:
    # a1/b1 and a2/b2 share addresses; the network (router or DHCP namespace) tells them apart.
    for a, b in (("a1", "b1"), ("a2", "b2")):
        assert lab.vm(a).ip == lab.vm(b).ip
        for vm in (a, b):
            token = hc.get_token(lab, vm, ttl=60)
            for host in (METADATA_V4, hc.V6_HOST):
                for headers in ({}, {hc.TOKEN_HEADER: token}):
                    ident = vm_request(lab, vm, hc.ID_PATH, host=host, headers=headers)
                    data = vm_request(lab, vm, hc.USER_DATA_PATH, host=host, headers=headers)
                    assert (ident.status, ident.body) == (200, lab.vm(vm).uuid.encode()), (vm, host)
                    assert (data.status, data.body) == (200, hc.own_user_data(lab, vm)), (vm, host)
                    meta = vm_request(lab, vm, hc.OS_META_PATH, host=host, headers=headers)
                    assert meta.status == 200 and meta.json()["uuid"] == lab.vm(vm).uuid
                    for body in (ident.body, data.body, meta.body):
                        hc.assert_no_leak(lab, vm, body, (host, headers))


def test_hostile_disabled_endpoint(lab: Lab, tokens: dict[str, str]) -> None:
    with hc.instance_policy(lab, "a2", MetadataOptions(http_endpoint="disabled")):
        for path in (hc.ID_PATH, hc.USER_DATA_PATH, hc.OS_META_PATH, "/openstack", "/latest/meta-data/"):
            for headers in ({}, {hc.TOKEN_HEADER: tokens["a2"]}):
                reply = vm_request(lab, "a2", path, headers=headers)
                assert reply.status == 403, (path, headers, reply.body[:200])
                hc.assert_no_leak(lab, "a2", reply.body, path)
        put = vm_request(lab, "a2", hc.TOKEN_PATH, method="PUT", headers={hc.TTL_HEADER: "60"})
        assert put.status == 403 and hc.TTL_HEADER.lower() not in put.headers, (put.headers, put.body)
        hc.assert_no_leak(lab, "a2", put.body, "token PUT")
        assert vm_request(lab, "a2", hc.ID_PATH, host=hc.V6_HOST).status == 403
        # Only a2: its neighbour on the network and its twin address in tenant b are served.
        for other in ("a1", "b2"):
            reply = vm_request(lab, other, hc.ID_PATH)
            assert (reply.status, reply.body) == (200, lab.vm(other).uuid.encode())
    assert vm_request(lab, "a2", hc.ID_PATH).body == lab.vm("a2").uuid.encode()


PROXY_PORT_TARGETS = (
    ("a1", str(lp.GATEWAY_IP), TimeoutError),  # the router's DROP: silence
    ("a1", METADATA_V4, TimeoutError),  # only port 80 is redirected
    ("b1", str(lp.DHCP_IP), ConnectionRefusedError),  # isolated: nothing on 9697 at all
    ("b1", METADATA_V4, ConnectionRefusedError),
)


@pytest.mark.parametrize(
    ("vm", "host", "error"), PROXY_PORT_TARGETS, ids=["a1-gateway", "a1-metadata", "b1-dhcp", "b1-metadata"]
)
def test_hostile_proxy_port_direct(lab: Lab, vm: str, host: str, error: type[OSError]) -> None:
    with pytest.raises(OSError) as info:
        vm_connect(lab, vm, host, lp.PROXY_PORT, timeout=1.5)
    assert type(info.value) is error, info.value


def _inet_socket_inodes(pid: int) -> set[str]:
    """Inodes of the TCP sockets in ``pid``'s network namespace (/proc/PID/net/tcp{,6})."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            inodes.update(line.split()[9] for line in list(f)[1:])
    return inodes


def test_hostile_serve_socket_not_on_network(lab: Lab) -> None:
    # serve listens on a Unix socket only: no TCP socket a guest could ever reach,
    # and the socket file itself is root's and its group's, nobody else's.
    path = lab.plan.paths.serve_socket
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)
    record = lab.state.process("serve")
    assert record is not None
    fds = Path(f"/proc/{record.pid}/fd")
    own = {os.readlink(fd)[len("socket:[") : -1] for fd in fds.iterdir() if os.readlink(fd).startswith("socket:[")}
    assert own, "serve holds no sockets at all?"
    assert not own & _inet_socket_inodes(record.pid), "serve holds a TCP socket"
    # ...and the proxy talks to it over that file, not over TCP.
    proxy = lab.state.process("proxy")
    assert proxy is not None
    assert f"unix:{path}" in Path(f"/proc/{proxy.pid}/cmdline").read_bytes().decode().split("\0")


# --- forgers on the host, against serve's own listeners -------------------------------------


def _run_wire(lab: Lab, address: tuple[str, int], secret: bytes, case: hc.WireCase) -> None:
    requests = case.build(lab, secret)
    statuses = []
    for method, path, headers in requests:
        status, _, body = get(address, path, method=method, headers=headers)
        statuses.append(status)
        if case.owner:
            _check_body(lab, case.owner, status, body, case.id, own=True)
        else:
            hc.assert_no_leak(lab, "", body, case.id)
    assert tuple(statuses) == case.statuses


@pytest.mark.parametrize("case", hc.STAMP_CASES, ids=lambda c: c.id)
def test_hostile_proxy_stamp(lab: Lab, forgeable: Forgeable, case: hc.WireCase) -> None:
    _run_wire(lab, forgeable.proxy, forgeable.proxy_secret, case)


@pytest.mark.parametrize("case", hc.NEUTRON_CASES, ids=lambda c: c.id)
def test_hostile_neutron(lab: Lab, forgeable: Forgeable, case: hc.WireCase) -> None:
    _run_wire(lab, forgeable.neutron, forgeable.neutron_secret, case)


def test_hostile_neutron_token_bound_to_instance(lab: Lab, forgeable: Forgeable) -> None:
    a1, b1 = lab.vm("a1"), lab.vm("b1")
    as_a1 = hc.neutron_headers(forgeable.neutron_secret, a1.uuid, a1.project_id)
    as_b1 = hc.neutron_headers(forgeable.neutron_secret, b1.uuid, b1.project_id)
    status, _, token = get(forgeable.neutron, hc.TOKEN_PATH, method="PUT", headers={**as_a1, hc.TTL_HEADER: "60"})
    assert status == 200
    ok = get(forgeable.neutron, hc.ID_PATH, headers={**as_a1, hc.TOKEN_HEADER: token.decode()})
    assert ok[0::2] == (200, a1.uuid.encode())
    status, _, body = get(forgeable.neutron, hc.USER_DATA_PATH, headers={**as_b1, hc.TOKEN_HEADER: token.decode()})
    assert status == 401
    hc.assert_no_leak(lab, "", body, "a1's token as b1")


def test_hostile_lab_token_not_valid_on_other_node(lab: Lab, forgeable: Forgeable, tokens: dict[str, str]) -> None:
    # The loopback serve has its own random key ring: the lab's tokens mean nothing there.
    a1 = lab.vm("a1")
    headers = {**hc.neutron_headers(forgeable.neutron_secret, a1.uuid, a1.project_id), hc.TOKEN_HEADER: tokens["a1"]}
    status, _, body = get(forgeable.neutron, hc.ID_PATH, headers=headers)
    assert status == 401
    hc.assert_no_leak(lab, "", body, "foreign key ring")


# --- the count ------------------------------------------------------------------------------


def _count_cases() -> int:
    module = sys.modules[__name__]
    total = 0
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_hostile_") or name == "test_hostile_case_count":
            continue
        params = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        total += len(params[0].args[1]) if params else 1
    return total


def test_hostile_case_count(record_property: Callable[[str, object], None]) -> None:
    count = _count_cases()
    record_property("hostile_cases", count)
    SUMMARY["hostile cases against the lab"] = str(count)
    assert count >= 30
