"""The proxy's identity stamp: header stripping rules and the per-request HMAC."""

from __future__ import annotations

import ipaddress

import pytest

from meta169.errors import HTTPError
from meta169.http.stamp import (
    HDR_SIGNATURE,
    REPLAY_WINDOW,
    ReplayGuard,
    is_identity_header,
    sign,
    stamp_headers,
    verify,
)
from meta169.model import Caller

SECRET = b"0123456789abcdef0123456789abcdef"
CALLER = Caller(ip=ipaddress.ip_address("10.0.0.11"), router_id="router-a")
NOW = 1_800_000_000


def _headers(caller: Caller, signature: str) -> dict[str, str]:
    out = dict(stamp_headers(caller))
    out[HDR_SIGNATURE] = signature
    return out


@pytest.mark.parametrize(
    ("name", "identity"),
    [
        ("x-forwarded-for", True),
        ("forwarded", True),
        ("x-real-ip", True),
        ("x-meta169-caller-ip", True),
        ("x-meta169-anything", True),
        ("x-neutron-network-id", True),
        ("x-neutron-router-id", True),
        ("x-ovn-network-id", True),
        ("x-instance-id", True),
        ("x-instance-id-signature", True),
        ("x-tenant-id", True),
        ("x-aws-ec2-metadata-token", False),
        ("x-aws-ec2-metadata-token-ttl-seconds", False),
        ("user-agent", False),
        ("accept", False),
    ],
)
def test_stamp_identity_header_classification(name: str, identity: bool) -> None:
    assert is_identity_header(name) is identity


def test_stamp_signature_verifies() -> None:
    sig = sign(SECRET, CALLER, "GET", "/latest/meta-data/", now=NOW)
    verify(SECRET, _headers(CALLER, sig), "GET", "/latest/meta-data/", ReplayGuard(), now=NOW + 1)


@pytest.mark.parametrize(
    ("method", "path", "caller", "secret"),
    [
        ("POST", "/latest/meta-data/", CALLER, SECRET),
        ("GET", "/latest/user-data", CALLER, SECRET),
        ("GET", "/latest/meta-data/", Caller(ip=ipaddress.ip_address("10.0.0.12"), router_id="router-a"), SECRET),
        ("GET", "/latest/meta-data/", Caller(ip=ipaddress.ip_address("10.0.0.11"), network_id="router-a"), SECRET),
        ("GET", "/latest/meta-data/", CALLER, b"another-secret-of-enough-length"),
    ],
    ids=["method", "path", "ip", "scope", "secret"],
)
def test_stamp_signature_binds_every_field(method: str, path: str, caller: Caller, secret: bytes) -> None:
    sig = sign(SECRET, CALLER, "GET", "/latest/meta-data/", now=NOW)
    with pytest.raises(HTTPError) as err:
        verify(secret, _headers(caller, sig), method, path, ReplayGuard(), now=NOW)
    assert err.value.status == 403


def test_stamp_replay_is_refused() -> None:
    guard = ReplayGuard()
    sig = sign(SECRET, CALLER, "GET", "/", now=NOW)
    verify(SECRET, _headers(CALLER, sig), "GET", "/", guard, now=NOW)
    with pytest.raises(HTTPError, match="replayed"):
        verify(SECRET, _headers(CALLER, sig), "GET", "/", guard, now=NOW + 2)


@pytest.mark.parametrize("skew", [REPLAY_WINDOW + 1, -(REPLAY_WINDOW + 1), 3600])
def test_stamp_outside_window_is_refused(skew: int) -> None:
    sig = sign(SECRET, CALLER, "GET", "/", now=NOW)
    with pytest.raises(HTTPError, match="window"):
        verify(SECRET, _headers(CALLER, sig), "GET", "/", ReplayGuard(), now=NOW + skew)


@pytest.mark.parametrize("value", ["", "v1", "v2 ts=1 nonce=a sig=b", "v1 ts=x nonce=a sig=b", "v1 nonce=a sig=b"])
def test_stamp_malformed_signature_is_refused(value: str) -> None:
    with pytest.raises(HTTPError) as err:
        verify(SECRET, _headers(CALLER, value), "GET", "/", ReplayGuard(), now=NOW)
    assert err.value.status == 403


def test_stamp_missing_signature_is_refused() -> None:
    with pytest.raises(HTTPError, match="missing"):
        verify(SECRET, dict(stamp_headers(CALLER)), "GET", "/", ReplayGuard(), now=NOW)


def test_stamp_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(capacity=100)
    for i in range(1000):
        assert guard.check_and_add(f"n{i}", NOW, NOW)
    assert guard._seen is not None and len(guard._seen) <= 100


def test_stamp_replay_guard_forgets_expired() -> None:
    guard = ReplayGuard()
    guard.check_and_add("old", NOW, NOW)
    guard.check_and_add("new", NOW + REPLAY_WINDOW + 5, NOW + REPLAY_WINDOW + 5)
    assert guard._seen is not None and "old" not in guard._seen
