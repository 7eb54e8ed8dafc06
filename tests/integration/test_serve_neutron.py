"""Compatibility with a stock Neutron metadata agent (Nova's handler contract), and
per-instance rate limits."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator

import pytest

from meta169.api.config import ServeConfig
from meta169.api.ratelimit import RateLimit
from meta169.errors import ConfigError
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, Subnet, parse_ip, parse_network
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import get, in_process

SECRET = b"neutron-shared-secret-0123456789"
A = "11111111-1111-4111-8111-111111111111"
B = "22222222-2222-4222-8222-222222222222"


def _registry() -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(Network(id="net-a", subnets=(Subnet(cidr=parse_network("10.0.0.0/24")),)))
    for uuid, project, ip, mac in (
        (A, "proj-a", "10.0.0.5", "fa:16:3e:00:00:0a"),
        (B, "proj-b", "10.0.0.6", "fa:16:3e:00:00:0b"),
    ):
        reg.put_instance(
            Instance(
                uuid=uuid,
                name=f"vm-{project}",
                project_id=project,
                user_data=f"secret of {project}".encode(),
                ports=(Port(network_id="net-a", mac=mac, ips=(parse_ip(ip),)),),
            )
        )
    return reg


def _sign(instance_id: str, secret: bytes = SECRET) -> str:
    return hmac.new(secret, instance_id.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def neutron() -> Iterator[tuple[str, int]]:
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("neutron")),),
        neutron_secret=SECRET,
        poll_interval=0.05,
    )
    with in_process(config, _registry()) as addresses:
        yield (addresses[0].host, addresses[0].port)


def _headers(instance_id: str | None = A, tenant: str | None = "proj-a", sig: str | None = None) -> dict[str, str]:
    out = {"X-Forwarded-For": "10.0.0.5"}
    if instance_id is not None:
        out["X-Instance-ID"] = instance_id
    if tenant is not None:
        out["X-Tenant-ID"] = tenant
    if sig is not None or instance_id is not None:
        out["X-Instance-ID-Signature"] = sig if sig is not None else _sign(instance_id or "")
    return out


def test_neutron_signed_request_is_served(neutron: tuple[str, int]) -> None:
    assert get(neutron, "/latest/user-data", headers=_headers())[0:3:2] == (200, b"secret of proj-a")
    assert get(neutron, "/openstack/latest/meta_data.json", headers=_headers())[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Tenant-ID": "proj-a", "X-Instance-ID-Signature": _sign(A)},
        {"X-Instance-ID": A, "X-Instance-ID-Signature": _sign(A)},
        {"X-Instance-ID": A, "X-Tenant-ID": "proj-a"},
    ],
    ids=["no-instance-id", "no-tenant", "no-signature"],
)
def test_neutron_missing_header_is_400(neutron: tuple[str, int], headers: dict[str, str]) -> None:
    assert get(neutron, "/latest/user-data", headers=headers)[0] == 400


@pytest.mark.parametrize(
    "sig",
    [_sign(B), _sign(A, b"wrong-secret-wrong-secret-wrong!"), _sign(A).upper(), "", "00" * 32],
    ids=["other-instance", "wrong-secret", "uppercase", "empty", "zeros"],
)
def test_neutron_bad_signature_is_403(neutron: tuple[str, int], sig: str) -> None:
    status, _, body = get(neutron, "/latest/user-data", headers=_headers(sig=sig))
    assert status == 403
    assert b"secret of" not in body


def test_neutron_tenant_mismatch_is_404(neutron: tuple[str, int]) -> None:
    status, _, body = get(neutron, "/latest/user-data", headers=_headers(A, "proj-b"))
    assert status == 404
    assert b"secret of" not in body


def test_neutron_unknown_instance_is_404(neutron: tuple[str, int]) -> None:
    ghost = "33333333-3333-4333-8333-333333333333"
    assert get(neutron, "/latest/user-data", headers=_headers(ghost, "proj-a"))[0] == 404


def test_neutron_listener_refuses_empty_secret() -> None:
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("neutron")),),
    )
    with pytest.raises(ConfigError, match="secret"), in_process(config, _registry()):
        pass


def test_ratelimit_429_with_retry_after() -> None:
    reg = MemoryRegistry()
    reg.put_network(Network(id="lo", subnets=(Subnet(cidr=parse_network("127.0.0.0/24")),)))
    reg.put_instance(
        Instance(
            uuid=A, name="a", ports=(Port(network_id="lo", mac="fa:16:3e:00:00:01", ips=(parse_ip("127.0.0.1"),)),)
        )
    )
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "lo")),),
        rate_limit=RateLimit(rate=1, burst=5),
    )
    with in_process(config, reg) as addresses:
        addr = (addresses[0].host, addresses[0].port)
        statuses = [get(addr, "/latest/meta-data/instance-id")[0] for _ in range(5)]
        assert statuses == [200] * 5
        status, headers, _ = get(addr, "/latest/meta-data/instance-id")
        assert status == 429
        assert headers["retry-after"] == "1"
