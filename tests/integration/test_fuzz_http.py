"""Fuzz: malformed HTTP and hostile paths at serve and at the proxy.

Each example is sent over a real loopback connection. The server must answer with a
well-formed status line that is never 500, or close the connection, within a bound;
and it must still serve a normal request afterwards. The number of cases run is
printed (``-s`` shows it; it is also in the junit properties).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta169.api.config import ServeConfig
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, Subnet, parse_ip, parse_network
from meta169.proxy.upstream import Upstream, UpstreamSpec
from meta169.registry.memory import MemoryRegistry
from tests.counters import SUMMARY
from tests.integration.serving import get, in_process, proxy_in_process

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
STATUS = re.compile(rb"^HTTP/1\.1 (\d{3}) ")
COUNTS: dict[str, int] = {}


def _registry() -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(Network(id="net-a", subnets=(Subnet(cidr=parse_network("127.0.0.0/24")),)))
    reg.put_instance(
        Instance(
            uuid=UUID,
            name="web-1",
            user_data=b"#cloud-config\n",
            ports=(Port(network_id="net-a", mac="fa:16:3e:00:00:05", ips=(parse_ip("127.0.0.1"),)),),
        )
    )
    return reg


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, int]]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    sock_path = tmp / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(
            ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),
            ListenerSpec(ListenAddress(unix_path=sock_path), Binding("proxy")),
        ),
        rate_limit=None,
    )
    upstream = Upstream(UpstreamSpec(unix_path=sock_path, reply_timeout=2.0))
    with (
        in_process(config, _registry()) as addresses,
        proxy_in_process(upstream, Binding("network", "net-a")) as proxy,
    ):
        yield {"serve": (addresses[0].host, addresses[0].port), "proxy": proxy}
    print(f"\nfuzz cases run: {COUNTS}")


def _exchange(addr: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if len(out) > 1 << 20:
                    break
        except ConnectionResetError:
            pass
        return out


def _check(addr: tuple[str, int], payload: bytes) -> None:
    reply = _exchange(addr, payload)
    if reply:
        match = STATUS.match(reply)
        assert match, reply[:200]
        assert match.group(1) != b"500", (payload[:200], reply[:300])


METHODS = st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "G\x00T"])
SEGMENT = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n "), min_size=0, max_size=12)
PATH = st.one_of(
    st.lists(SEGMENT, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(
        [
            "/latest/meta-data/../../etc/passwd",
            "/%2e%2e/%2e%2e/",
            "/latest/meta-data/%00",
            "/latest/api/token",
            "/openstack/latest/password",
            "//latest//meta-data//",
            "/latest/meta-data/public-keys/0/openssh-key/",
            "/" + "a" * 3000,
            "/%ff%fe",
            "/latest/meta-data/?" + "x" * 100,
        ]
    ),
)
HEADER_NAME = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "X-Forwarded-For",
        "X-aws-ec2-metadata-token",
        "X-aws-ec2-metadata-token-ttl-seconds",
        "X-Meta169-Caller-IP",
        "X-Meta169-Network-ID",
        "Connection",
        "Expect",
    ]
)
HEADER_VALUE = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(METHODS)
    path = draw(PATH)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""]))
    headers = draw(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6))
    body = draw(st.binary(max_size=64))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("target", ["serve", "proxy"])
@FUZZ
@given(payload=requests())
def test_fuzz_structured_requests_never_500(targets: dict[str, tuple[str, int]], target: str, payload: bytes) -> None:
    COUNTS[f"{target}/structured"] = COUNTS.get(f"{target}/structured", 0) + 1
    _check(targets[target], payload)


@pytest.mark.parametrize("target", ["serve", "proxy"])
@FUZZ
@given(payload=st.binary(min_size=1, max_size=512))
def test_fuzz_random_bytes_never_500(targets: dict[str, tuple[str, int]], target: str, payload: bytes) -> None:
    COUNTS[f"{target}/bytes"] = COUNTS.get(f"{target}/bytes", 0) + 1
    _check(targets[target], payload)


@pytest.mark.parametrize("target", ["serve", "proxy"])
def test_fuzz_server_still_serves_afterwards(targets: dict[str, tuple[str, int]], target: str) -> None:
    status, _, body = get(targets[target], "/latest/meta-data/instance-id")
    assert (status, body) == (200, UUID.encode())
    cases = sum(v for k, v in COUNTS.items() if k.startswith(target))
    assert cases >= 300
    SUMMARY[f"fuzz cases run against {target}"] = f"{cases} (no 500, no hang)"
