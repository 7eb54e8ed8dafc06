"""The token reply leaves with IP TTL = the instance's hop limit.

Proof by capture: tcpdump inside the VM's namespace records the packets the
metadata address sends to the VM; the one carrying the token must have TTL (IPv4)
or hop limit (IPv6) equal to ``http_put_response_hop_limit``, and an ordinary reply
the kernel's default 64. The proxy sets it on the guest-facing socket after serve
asks for it (api/metadata.py HDR_HOP_LIMIT, proxy/server.py, http/protocol.py _set_ttl).

Then one hop further: a "container" namespace routed behind a VM (veth, forwarding
and MASQUERADE in the VM, as Docker does). With hop limit 1 the token reply dies in
the VM's forwarding path, so the container's PUT gets no answer; with 2 it gets a
token. IMDSv1 GETs from the container still work while tokens are optional: the hop
limit only limits token replies (EC2 user guide, "instance metadata options").
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from meta169.lab import Lab
from meta169.model import HttpTokens, Instance, MetadataOptions
from meta169.plumbing import netns as nsmod
from meta169.plumbing.command import run
from tests.e2e import hostile_cases as hc
from tests.e2e.lab_fixture import METADATA_V4, Reply, vm_request

pytestmark = pytest.mark.e2e

# Packet headers as ``tcpdump -v`` prints them: "IP (tos 0x0, ttl 1, ..." or
# "IP6 (flowlabel 0x..., hlim 1, next-header TCP ...".
_PACKET_START = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d+ IP6? ", re.MULTILINE)
_TTL = re.compile(r"\b(?:ttl|hlim) (\d+)\b")


def _hops(lab: Lab, vm: str, hop: int, tokens: HttpTokens = "optional") -> contextlib.AbstractContextManager[Instance]:
    """``vm`` with this hop limit (and token mode) while inside; serve has picked it up."""
    return hc.instance_policy(lab, vm, MetadataOptions(http_tokens=tokens, http_put_response_hop_limit=hop))


def ns_request(
    ns: str,
    path: str,
    *,
    host: str = METADATA_V4,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One HTTP request from inside namespace ``ns`` (which need not be a lab VM)."""

    def go() -> Reply:
        conn = http.client.HTTPConnection(host, 80, timeout=timeout)
        try:
            conn.request(method, path, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    return nsmod.call_in_netns(ns, go)


# --- capture ----------------------------------------------------------------------------------


@contextlib.contextmanager
def capture(ns: str, iface: str, directory: Path) -> Iterator[Callable[[], str]]:
    """tcpdump in ``ns`` on ``iface``, packets from port 80; yields a reader of the capture
    as ``tcpdump -r -v -A`` prints it (call it after the traffic)."""
    pcap = directory / "capture.pcap"
    # Stay root (-Z root: the file is in our 0700 directory), hand over each packet at
    # once (--immediate-mode, -U), stop at 64 packets at the latest.
    tcpdump = ["tcpdump", "-Z", "root", "--immediate-mode", "-U", "-nn", "-i", iface, "-c", "64", "-w", str(pcap)]
    proc = subprocess.Popen(
        nsmod.in_netns(ns, [*tcpdump, "tcp src port 80"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        # tcpdump says "listening on <iface>" once the capture is armed.
        ready, _, _ = select.select([proc.stderr], [], [], 10)
        line = proc.stderr.readline() if ready else ""
        assert "listening on" in line, f"tcpdump did not start: {line!r}"

        def read() -> str:
            time.sleep(0.3)  # the last segments (FIN) reach the capture
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(5)
            return run(["tcpdump", "-r", str(pcap), "-nn", "-v", "-A"]).stdout

        yield read
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def ttl_of_packet_with(dump: str, needle: str) -> int:
    """TTL / hop limit of the one captured packet whose payload contains ``needle``."""
    starts = [m.start() for m in _PACKET_START.finditer(dump)] + [len(dump)]
    blocks = [dump[a:b] for a, b in itertools.pairwise(starts)]
    carrying = [b for b in blocks if needle in b]
    assert len(carrying) == 1, f"{len(carrying)} packets carry {needle!r}:\n{dump[:3000]}"
    match = _TTL.search(carrying[0].splitlines()[0])
    assert match, carrying[0][:300]
    return int(match.group(1))


CAPTURES = (
    ("a1", METADATA_V4, 1),
    ("a1", METADATA_V4, 3),
    ("b1", METADATA_V4, 1),
    ("b1", METADATA_V4, 3),
    ("a2", hc.V6_HOST, 2),
    ("b2", hc.V6_HOST, 5),
)


@pytest.mark.parametrize(
    ("vm", "host", "hop"), CAPTURES, ids=[f"{vm}-{'v6' if ':' in h else 'v4'}-hop{n}" for vm, h, n in CAPTURES]
)
def test_imdsv2_token_reply_ttl_is_hop_limit(lab: Lab, vm: str, host: str, hop: int) -> None:
    plan = lab.vm(vm)
    with (
        _hops(lab, vm, hop),
        tempfile.TemporaryDirectory(prefix="m169t-cap-") as tmp,
        capture(plan.netns, plan.iface, Path(tmp)) as read,
    ):
        token = hc.get_token(lab, vm, ttl=120, host=host)
        # A fresh connection for an ordinary reply: the kernel's default TTL.
        ident = vm_request(lab, vm, hc.ID_PATH, host=host, headers={hc.TOKEN_HEADER: token})
        assert (ident.status, ident.body) == (200, plan.uuid.encode())
        dump = read()
    assert ttl_of_packet_with(dump, token) == hop
    assert ttl_of_packet_with(dump, plan.uuid) == 64


# --- a container one hop behind the VM -------------------------------------------------------

_INNER = "192.168.77"  # the container's /24 inside the VM (not the lab's 10.0.0.0/24)


@dataclass(frozen=True)
class Container:
    vm: str
    netns: str


@pytest.fixture
def container(
    lab: Lab, request: pytest.FixtureRequest, netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> Iterator[Container]:
    """A namespace routed behind VM ``request.param`` with NAT, as a container host does."""
    vm = str(request.param)
    plan = lab.vm(vm)
    inner = netns()  # m169t-<rand>-0, removed by the fixture with its veth end
    outside, inside = veth(plan.netns, inner)
    nat = ["POSTROUTING", "-s", f"{_INNER}.0/24", "-o", plan.iface, "-j", "MASQUERADE"]
    try:
        run(nsmod.ip_argv(plan.netns, "addr", "add", f"{_INNER}.1/24", "dev", outside))
        run(nsmod.ip_argv(inner, "addr", "add", f"{_INNER}.2/24", "dev", inside))
        run(nsmod.ip_argv(inner, "route", "add", "default", "via", f"{_INNER}.1"))
        lab.exec(vm, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        lab.exec(vm, ["iptables", "-t", "nat", "-A", *nat], check=True)
        yield Container(vm, inner)
    finally:
        lab.exec(vm, ["iptables", "-t", "nat", "-D", *nat], check=False)
        lab.exec(vm, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=False)
        # The veth end in the VM goes with the container namespace (netns fixture).


def _put_token(ns: str, timeout: float) -> Reply:
    return ns_request(ns, hc.TOKEN_PATH, method="PUT", headers={hc.TTL_HEADER: "60"}, timeout=timeout)


@pytest.mark.parametrize("container", ["a1", "b1"], indirect=True)
def test_imdsv2_hop_limit_one_stops_container_token(lab: Lab, container: Container) -> None:
    vm = lab.vm(container.vm)
    with _hops(lab, container.vm, 1):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            _put_token(container.netns, timeout=2.0)
        assert time.monotonic() - started >= 1.9
        # The VM itself, one hop closer, gets its token at the same moment.
        assert len(hc.get_token(lab, container.vm, ttl=60)) > 40
        # IMDSv1 from the container still works (tokens optional): its replies have TTL 64.
        reply = ns_request(container.netns, hc.ID_PATH)
        assert (reply.status, reply.body) == (200, vm.uuid.encode())


@pytest.mark.parametrize("container", ["a1", "b1"], indirect=True)
def test_imdsv2_hop_limit_two_reaches_container(lab: Lab, container: Container) -> None:
    vm = lab.vm(container.vm)
    with _hops(lab, container.vm, 2):
        put = _put_token(container.netns, timeout=3.0)
        assert put.status == 200, put.body
        token = put.body.decode()
        reply = ns_request(container.netns, hc.ID_PATH, headers={hc.TOKEN_HEADER: token})
        # Through the VM's NAT the container is the VM: its token, its data.
        assert (reply.status, reply.body) == (200, vm.uuid.encode())
        hc.assert_no_leak(lab, container.vm, reply.body, "container")


@pytest.mark.parametrize("container", ["a2"], indirect=True)
def test_imdsv2_hop_limit_one_with_tokens_required_locks_container_out(lab: Lab, container: Container) -> None:
    with _hops(lab, container.vm, 1, tokens="required"):
        with pytest.raises(TimeoutError):
            _put_token(container.netns, timeout=2.0)
        for path in (hc.ID_PATH, hc.USER_DATA_PATH, hc.OS_META_PATH):
            reply = ns_request(container.netns, path)
            assert reply.status == 401, (path, reply.body[:200])
            hc.assert_no_leak(lab, "", reply.body, path)
