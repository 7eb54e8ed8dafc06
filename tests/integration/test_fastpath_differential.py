"""The compiled fast path against the Python path it stands in for.

Requests go through serve's own Python path (``MetadataApp`` behind a real
``HTTPProtocol``, bytes in, bytes out) and through the ``FastPath`` built over the
tables that path fills. Whatever the request carries, the fast path either
declines or writes the very bytes the Python path writes (bar the Date line and
the random seed, fresh on every reply). Both listener kinds are driven: a network
listener keyed by the TCP peer and a proxy socket keyed by the proxy's stamp, with
the longest ids and address text either can hold; each with an instance whose
IMDSv2 tokens are optional and one where they are required, and requests carrying
valid, expired, forged, truncated, repeated, other instances' and not yet seen
tokens.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.api import metadata, tokens
from meta169.api.cache import SiteCache
from meta169.api.metadata import NOT_ON_THE_FAST_PATH, PYTHON_OWNED_HEADERS, PYTHON_OWNED_PREFIXES, MetadataApp
from meta169.api.tokens import TOKEN_HEADER, KeyRing
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import Binding
from meta169.http.message import Request
from meta169.http.protocol import HTTPProtocol
from meta169.model import Instance, MetadataOptions, Network, Port, SSHKey, Subnet, parse_ip, parse_network
from meta169.registry.memory import MemoryRegistry
from meta169.render import RenderOptions
from tests.capabilities import require
from tests.counters import SUMMARY
from tests.http_parse import RecordingTransport
from tests.unit.http_strategies import NAME, VALUE

UUID = "5e0c2d9a-8d8c-4f6e-9c1a-0d9c2b7f1a11"
# A second instance on the same network, whose validated token the first must not use.
OTHER_UUID = "7a1f3c22-2b4d-4e8f-8a0b-6c5d4e3f2a10"
OTHER_PEER = "fdff:ffff:ffff:ffff::2"
# The longest a network id may be (model.check_id) and the longest address text: as
# the kernel writes an IPv6 peer (39 characters) and as a stamp may spell the same
# address (45, the last 32 bits dotted).
LONG_ID = "n" * 128
PEER_V6 = "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
STAMP_V6 = "fdff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
LIMITS = Limits()
DOCUMENTS = [
    "/",
    "/latest/meta-data/",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/hostname",
    "/latest/user-data",
    "/openstack/latest/meta_data.json",
    "/openstack/latest/vendor_data.json",
    "/openstack/2018-08-27/network_data.json",
]
OTHER_PATHS = ["/nope", "/latest/api/token", "/openstack/latest/password"]


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built (needs gcc and Python headers)")


def _registry(http_tokens: str) -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(Network(id=LONG_ID, subnets=(Subnet(cidr=parse_network("fdff:ffff:ffff:ffff::/64")),)))
    options = MetadataOptions(http_tokens=http_tokens)  # type: ignore[arg-type]
    reg.put_instance(
        Instance(
            uuid=UUID,
            name="web-1",
            project_id="proj-a",
            metadata={"role": "web"},
            keys=(SSHKey(name="ops", data="ssh-ed25519 AAAAC3Nz ops@example"),),
            user_data=b"#cloud-config\nhostname: web-1\n",
            vendor_data={"motd": "hello"},
            ports=(Port(network_id=LONG_ID, mac="fa:16:3e:00:00:05", ips=(parse_ip(PEER_V6),)),),
            metadata_options=options,
        )
    )
    reg.put_instance(
        Instance(
            uuid=OTHER_UUID,
            name="web-2",
            project_id="proj-a",
            ports=(Port(network_id=LONG_ID, mac="fa:16:3e:00:00:06", ips=(parse_ip(OTHER_PEER),)),),
            metadata_options=options,
        )
    )
    return reg


@dataclass
class Served:
    """One listener of serve, its Python path and its compiled path."""

    loop: asyncio.AbstractEventLoop
    app: MetadataApp
    fast: wire.Answer
    ring: KeyRing
    peer: str  # the TCP peer: the caller on a network listener, nothing on a proxy socket
    stamp: str  # the proxy's stamp lines on a proxy socket
    required: bool  # the instances' IMDSv2 http_tokens is "required"
    # Token header values by kind: "valid" (found valid by the Python path), "expired"
    # (recorded while valid, expired since), "other" (the other instance's, found
    # valid for it), "forged", "truncated", "empty".
    kinds: dict[str, str]
    validated: tokens.Validated  # the listener's table of tokens found valid

    def request(
        self, method: str, target: str, extra: str = "", *, stamp: str | None = None, auth: bool | None = None
    ) -> bytes:
        """A request as a client sends it; ``auth`` adds the valid token's header line
        (by default where tokens are required, for the answer not to be a 401)."""
        stamp = self.stamp if stamp is None else stamp
        if auth or (auth is None and self.required):
            extra = f"{TOKEN_HEADER}: {self.kinds['valid']}\r\n{extra}"
        return f"{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n{stamp}{extra}\r\n".encode("latin-1")

    def python(self, data: bytes, peer: str | None = None) -> bytes | None:
        """What serve's Python path writes for ``data``; None while it waits for more bytes."""
        handled: list[Request] = []

        def handler(req: Request) -> Any:
            handled.append(req)
            return self.app(req)

        transport = RecordingTransport(self.peer if peer is None else peer)
        proto = HTTPProtocol(handler, LIMITS, loop=self.loop)
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(data)
        deadline = time.monotonic() + 10
        while handled and not transport.written:
            assert time.monotonic() < deadline, "the Python path never answered"
            self.loop.run_until_complete(asyncio.sleep(0.001))
        proto.connection_lost(None)
        return b"".join(transport.written) or None

    def compiled(self, data: bytes) -> bytes | None:
        answer = self.fast(data, self.peer)
        if answer is None:
            return None
        assert len(answer) == 2, answer  # one complete request: all of it answered
        return answer[0]


@pytest.fixture(
    scope="module",
    params=[("network", "optional"), ("network", "required"), ("proxy", "optional"), ("proxy", "required")],
    ids="-".join,
)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    kind, http_tokens = request.param
    loop = asyncio.new_event_loop()
    cache = SiteCache(_registry(http_tokens), RenderOptions())
    ring = KeyRing.generate()
    validated = tokens.Validated()
    if kind == "network":
        app = MetadataApp(cache, Binding("network", LONG_ID), token_keys=ring, validated_tokens=validated)
        peer, stamp, other_peer, other_stamp = PEER_V6, "", OTHER_PEER, ""
    else:
        app = MetadataApp(cache, Binding("proxy"), token_keys=ring, validated_tokens=validated)
        peer, stamp = "", f"X-Meta169-Caller-IP: {STAMP_V6}\r\nX-Meta169-Network-ID: {LONG_ID}\r\n"
        other_peer, other_stamp = "", f"X-Meta169-Caller-IP: {OTHER_PEER}\r\nX-Meta169-Network-ID: {LONG_ID}\r\n"
    fast = app.fast_path(LIMITS)
    assert fast is not None
    valid = tokens.issue(ring, UUID, tokens.MAX_TTL)
    long_ago = time.time() - 7200
    expired = tokens.issue(ring, UUID, 60, now=long_ago)
    expiry = tokens.valid_until(ring, expired, UUID, now=long_ago)
    assert expiry is not None
    validated.add(expired, UUID, expiry, now=long_ago)  # as the Python path recorded it, an hour ago
    other = tokens.issue(ring, OTHER_UUID, tokens.MAX_TTL)
    kinds = {
        "valid": valid,
        "expired": expired,
        "other": other,
        "forged": tokens.issue(KeyRing.generate(), UUID, tokens.MAX_TTL),
        "truncated": valid[:-1],
        "empty": "",
    }
    served = Served(loop, app, fast, ring, peer, stamp, http_tokens == "required", kinds, validated)
    # The other instance's token, found valid for it by the Python path.
    got = served.python(
        served.request(
            "GET", "/latest/meta-data/instance-id", f"{TOKEN_HEADER}: {other}\r\n", stamp=other_stamp, auth=False
        ),
        other_peer,
    )
    assert got is not None and got.endswith(OTHER_UUID.encode())
    assert {other.encode(), expired.encode()} <= validated.table.keys()
    try:
        yield served
    finally:
        cache.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def _normalised(reply: bytes) -> bytes:
    reply = re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", reply)
    return re.sub(rb'"random_seed": "[A-Za-z0-9+/=]*"', b'"random_seed": "-"', reply)


def _is_owned(name: str) -> bool:
    lower = name.lower()
    return lower in PYTHON_OWNED_HEADERS or lower.startswith(PYTHON_OWNED_PREFIXES)


# -- the property ---------------------------------------------------------------------------

_OWNED_NAMES = sorted(PYTHON_OWNED_HEADERS | NOT_ON_THE_FAST_PATH) + [
    prefix + rest
    for prefix in PYTHON_OWNED_PREFIXES
    for rest in ("caller-ip", "network-id", "router-id", "guest-forwarded", "signature", "hop-limit", "")
]
_CASES = st.sampled_from([str.lower, str.upper, str.title, str.swapcase])


@st.composite
def _header(draw: st.DrawFn, valid: str, values: list[str]) -> tuple[str, str]:
    kind = draw(st.sampled_from(["owned", "token", "token", "unknown", "framing"]))
    if kind == "owned":
        name, value = draw(st.sampled_from(_OWNED_NAMES)), draw(VALUE)
    elif kind == "token":
        # The valid token as often as all the others together: the answers to compare.
        name, value = TOKEN_HEADER, draw(st.just(valid) | st.sampled_from(values))
    elif kind == "unknown":
        name, value = draw(NAME), draw(VALUE)
    else:
        name = draw(st.sampled_from(["Connection", "Content-Length", "Accept", "User-Agent"]))
        value = draw(st.sampled_from(["close", "keep-alive", "Keep-Alive", "0", "", "*/*", "curl/8"]))
    separator = draw(st.sampled_from([": ", ":", ":\t", ":  "]))
    return draw(_CASES)(name) + separator, value


def _count(what: str) -> None:
    SUMMARY[what] = str(int(SUMMARY.get(what, "0")) + 1)


def _must_decline(served: Served, headers: list[tuple[str, str]]) -> bool:
    """Whether the Python path alone may judge a request with these headers: any it
    owns but the token header; a token other than one valid token; no token where
    tokens are required."""
    names = [name.rstrip(": \t").lower() for name, _ in headers]
    sent = [value.strip(" \t") for (_, value), name in zip(headers, names, strict=True) if name == TOKEN_HEADER]
    if any(_is_owned(name) for name in names if name != TOKEN_HEADER):
        return True
    if sent:
        return len(sent) > 1 or sent[0] != served.kinds["valid"]
    return served.required


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fastpath_declines_or_repeats_the_python_path(served: Served, data: st.DataObject) -> None:
    # A token no request has carried yet: declined until the Python path has checked it.
    unseen = tokens.issue(served.ring, UUID, 3600)
    method = data.draw(st.sampled_from(["GET", "HEAD"]))
    path = data.draw(st.sampled_from(DOCUMENTS + OTHER_PATHS))
    target = path + data.draw(st.sampled_from(["", "/", "?x=1", "?a=%41"]))
    headers = data.draw(st.lists(_header(served.kinds["valid"], [*served.kinds.values(), unseen]), max_size=6))
    extra = "".join(f"{name}{value}\r\n" for name, value in headers)
    request = served.request(method, target, extra, auth=False)
    served.python(served.request("GET", target, auth=True))  # warms the caller's table, if a document
    compiled = served.compiled(request)
    python = served.python(request)
    if _must_decline(served, headers):
        # Every header the Python path reads is its to judge, bar a token it has found valid.
        assert compiled is None, request
    if compiled is None:
        return
    _count("fast-path differential answers compared")
    if any(name.rstrip(": \t").lower() == TOKEN_HEADER for name, _ in headers):
        _count("fast-path differential answers compared, with an IMDSv2 token")
    assert python is not None, request
    assert _normalised(compiled) == _normalised(python), request


def test_fastpath_differential_compares_real_answers(served: Served) -> None:
    # The property above only compares what the fast path answers: show that is not
    # nothing, with headers it does not own, in any case, spaced any way, and with
    # the valid token spelled any way the Python path reads as the same value.
    target = "/openstack/latest/meta_data.json"
    token = served.kinds["valid"]
    served.python(served.request("GET", target, auth=True))
    for method, extra, auth in [
        ("GET", "", None),
        ("HEAD", "user-agent:Cloud-Init/22.4.2\r\n", None),
        ("GET", "ACCEPT: */*\r\nX-Unknown:\r\nx-unknown:  two \t\r\nConnection: close\r\n", None),
        # What Neutron's haproxy adds to every guest GET: still the fast path's.
        ("GET", "X-Forwarded-For: 10.0.0.11\r\nX-Neutron-Network-ID: net-a\r\n", None),
        # IMDSv2 clients (botocore, cloud-init on EC2) send the token with every request.
        ("GET", f"User-Agent: Botocore/1.31\r\nX-aws-ec2-metadata-token: {token}\r\n", False),
        ("HEAD", f"x-aws-ec2-metadata-token:{token}\r\n", False),
        ("GET", f"X-AWS-EC2-METADATA-TOKEN:\t {token} \t\r\nConnection: close\r\n", False),
    ]:
        request = served.request(method, target, extra, auth=auth)
        compiled, python = served.compiled(request), served.python(request)
        assert compiled is not None and python is not None
        assert _normalised(compiled) == _normalised(python)
        assert compiled != python or method == "HEAD"  # only the seed (and Date) differ


@pytest.mark.parametrize("kind", ["expired", "other", "forged", "truncated", "empty", "twice", "none"])
def test_fastpath_leaves_tokens_it_cannot_vouch_for_to_python(served: Served, kind: str) -> None:
    # Expired since it was checked, another instance's (checked for that one),
    # forged, cut short, sent twice, or missing where tokens are required: the
    # Python path answers, 401, and what it refused never enters the table.
    target = "/latest/meta-data/instance-id"
    served.python(served.request("GET", target, auth=True))
    assert served.compiled(served.request("GET", target, auth=True)) is not None
    if kind == "none":
        extra = ""
    elif kind == "twice":
        extra = f"{TOKEN_HEADER}: {served.kinds['valid']}\r\n" * 2
    else:
        extra = f"{TOKEN_HEADER}: {served.kinds[kind]}\r\n"
    request = served.request("GET", target, extra, auth=False)
    before = dict(served.validated.table)
    compiled, python = served.compiled(request), served.python(request)
    if kind == "none" and not served.required:
        assert compiled is not None and python is not None and _normalised(compiled) == _normalised(python)
        return
    assert compiled is None
    assert python is not None and python.startswith(b"HTTP/1.1 401 "), python
    assert served.validated.table == before


def test_fastpath_accepts_a_token_once_python_found_it_valid(served: Served) -> None:
    target = "/latest/meta-data/hostname"
    served.python(served.request("GET", target, auth=True))
    fresh = tokens.issue(served.ring, UUID, 60)
    request = served.request("GET", target, f"{TOKEN_HEADER}: {fresh}\r\n", auth=False)
    assert served.compiled(request) is None  # not seen yet: the seal is checked in Python
    python = served.python(request)
    assert python is not None and python.startswith(b"HTTP/1.1 200 ")
    compiled = served.compiled(request)
    assert compiled is not None and _normalised(compiled) == _normalised(python)


@pytest.mark.parametrize("name", sorted(PYTHON_OWNED_HEADERS) + [p + "x" for p in PYTHON_OWNED_PREFIXES])
def test_fastpath_declines_every_owned_header(served: Served, name: str) -> None:
    target = "/latest/meta-data/instance-id"
    served.python(served.request("GET", target))
    assert served.compiled(served.request("GET", target)) is not None
    for spelled in (name, name.upper(), name.title()):
        assert served.compiled(served.request("GET", target, f"{spelled}: 1\r\n")) is None, spelled


def test_fastpath_reads_its_owned_list_from_python(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve's list is the one definition: a header added to it in Python is declined
    # by the fast path built next, with no change to the C code.
    target = "/latest/meta-data/instance-id"
    served.python(served.request("GET", target))
    request = served.request("GET", target, "X-Brand-New: 1\r\n")
    assert served.compiled(request) is not None
    monkeypatch.setattr(metadata, "PYTHON_OWNED_HEADERS", PYTHON_OWNED_HEADERS | {"x-brand-new"})
    fast = served.app.fast_path(LIMITS)
    assert fast is not None
    assert fast(request, served.peer) is None
    assert fast(served.request("GET", target), served.peer) is not None  # the same tables, still answered


# -- at serve's limits ----------------------------------------------------------------------


def _python_count(head: bytes) -> int:
    """Header bytes as HTTPProtocol counts them: name + value (leading whitespace
    dropped, as httptools does) + 4 per header line."""
    lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    return sum(len(n) + len(v.lstrip(b" \t")) + 4 for n, _, v in (line.partition(b":") for line in lines))


def _check_bound(served: Served, at: bytes, over: bytes, status: bytes) -> None:
    served.python(served.request("GET", "/openstack/latest/meta_data.json"))
    served.python(served.request("GET", "/latest/meta-data/instance-id"))
    compiled, python = served.compiled(at), served.python(at)
    assert compiled is not None and python is not None, at[:200]
    assert _normalised(compiled) == _normalised(python)
    assert served.compiled(over) is None
    refused = served.python(over)
    assert refused is not None and refused.startswith(b"HTTP/1.1 " + status), refused


def test_fastpath_at_the_header_count_limit(served: Served) -> None:
    base = served.request("GET", "/latest/meta-data/instance-id")
    lines = base.count(b"\r\n") - 2  # header lines already there (Host, the stamp)
    fill = "".join(f"h{i}: v\r\n" for i in range(LIMITS.max_headers - lines))
    at = served.request("GET", "/latest/meta-data/instance-id", fill)
    assert at.count(b"\r\n") - 2 == LIMITS.max_headers
    _check_bound(served, at, served.request("GET", "/latest/meta-data/instance-id", fill + "h-over: v\r\n"), b"431")


def test_fastpath_at_the_header_bytes_limit(served: Served) -> None:
    # Headers written "name:value" count more in serve's tally than on the wire: at
    # its limit the head is still shorter than max_header_bytes, and one byte over
    # it only the tally catches.
    target = "/openstack/latest/meta_data.json"
    fill = "".join(f"h{i:02d}:v\r\n" for i in range(55))
    short = served.request("GET", target, fill + "pad:\r\n")
    pad = LIMITS.max_header_bytes - _python_count(short)
    at = served.request("GET", target, fill + "pad:" + "p" * pad + "\r\n")
    over = served.request("GET", target, fill + "pad:" + "p" * (pad + 1) + "\r\n")
    assert _python_count(at) == LIMITS.max_header_bytes and len(over) <= LIMITS.max_header_bytes
    _check_bound(served, at, over, b"431")


def test_fastpath_at_the_url_limit(served: Served) -> None:
    path = "/latest/meta-data/instance-id?"
    at = served.request("GET", path + "q" * (LIMITS.max_url_bytes - len(path)))
    over = served.request("GET", path + "q" * (LIMITS.max_url_bytes - len(path) + 1))
    _check_bound(served, at, over, b"414")


def test_fastpath_at_the_head_length_limit(served: Served) -> None:
    # The fast path bounds the whole head too (serve tallies only the headers): one
    # byte past it is declined and the Python path answers it as usual.
    target = "/latest/meta-data/instance-id"
    served.python(served.request("GET", target))
    short = served.request("GET", target, "user-agent: \r\n")
    at = served.request("GET", target, "user-agent: " + "u" * (LIMITS.max_header_bytes - len(short)) + "\r\n")
    assert len(at) == LIMITS.max_header_bytes
    compiled, python = served.compiled(at), served.python(at)
    assert compiled is not None and python is not None and _normalised(compiled) == _normalised(python)
    over = at.replace(b"uu", b"uuu", 1)
    python = served.python(over)
    assert served.compiled(over) is None and python is not None and python.startswith(b"HTTP/1.1 200")
