"""The hostile suite as data, and the lab helpers it shares with the IMDSv2 tests.

The tables say what a hostile guest (or a forger on the host who lacks a secret)
sends and which exact status it must get; ``test_hostile_lab.py`` runs them against
a real lab. Every reply body is also checked against what only the *other* VMs
own (uuid, user data, SSH key), so a wrong status and a leak both fail.

Helpers:
- :func:`instance_policy` changes one VM's registry entry (metadata options, AZ)
  through the lab's registry and waits until ``serve`` shows it, then restores it;
- :func:`vm_raw` sends raw bytes from inside a VM (framing attacks), and
  :func:`responses` splits what came back;
- :func:`assert_no_leak` and :func:`get_token` are what every case uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

from meta169.http.stamp import sign
from meta169.lab import Lab
from meta169.lab import plan as lp
from meta169.lab.plan import VMPlan
from meta169.model import Caller, Instance, MetadataOptions
from meta169.registry import open_registry
from tests.e2e.lab_fixture import METADATA_V4, METADATA_V6, vm_request

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
ID_PATH = "/latest/meta-data/instance-id"
USER_DATA_PATH = "/latest/user-data"
OS_META_PATH = "/openstack/latest/meta_data.json"
V6_HOST = f"{METADATA_V6}%eth0"

# --- what must never leak ---------------------------------------------------------------


def leak_markers(lab: Lab, vm: str) -> dict[bytes, str]:
    """Byte strings only VMs other than ``vm`` own, each mapped to what it is."""
    out: dict[bytes, str] = {}
    for other in lab.vms:
        if other.name == vm:
            continue
        inst = lp.instance(lab.plan, other)
        out[other.uuid.encode()] = f"{other.name}'s uuid"
        assert inst.user_data is not None
        out[f"vm {other.name}\n".encode()] = f"{other.name}'s user data"
        out[inst.keys[0].data.split()[1].encode()] = f"{other.name}'s SSH key"
    return out


def assert_no_leak(lab: Lab, vm: str, body: bytes, context: object = "") -> None:
    found = [what for marker, what in leak_markers(lab, vm).items() if marker in body]
    assert not found, f"{vm} was shown {found} ({context}): {body[:300]!r}"


def own_user_data(lab: Lab, vm: str) -> bytes:
    data = lp.instance(lab.plan, lab.vm(vm)).user_data
    assert data is not None
    return data


def get_token(lab: Lab, vm: str, ttl: int = 21600, *, host: str = METADATA_V4) -> str:
    reply = vm_request(lab, vm, TOKEN_PATH, method="PUT", headers={TTL_HEADER: str(ttl)}, host=host)
    assert reply.status == 200, (vm, reply.status, reply.body[:200])
    assert reply.headers.get(TTL_HEADER.lower()) == str(ttl), reply.headers
    return reply.body.decode()


# --- registry changes seen through serve -------------------------------------------------


def wait_until(check: Callable[[], bool], *, what: str, timeout: float = 10.0) -> float:
    """Poll ``check`` until true; returns the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            if check():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def _policy_marker(lab: Lab, vm: str) -> str | None:
    """The ``policy`` key of ``vm``'s meta_data.json as serve shows it now (None: absent)."""
    token = vm_request(lab, vm, TOKEN_PATH, method="PUT", headers={TTL_HEADER: "60"})
    if token.status != 200:
        return "<no token>"
    reply = vm_request(lab, vm, OS_META_PATH, headers={TOKEN_HEADER: token.body.decode()})
    if reply.status != 200:
        return "<no metadata>"
    marker = reply.json().get("meta", {}).get("policy")
    return None if marker is None else str(marker)


@contextlib.contextmanager
def instance_policy(lab: Lab, vm: str, options: MetadataOptions | None = None, **fields: object) -> Iterator[Instance]:
    """``vm``'s registry entry with ``options`` (and other Instance ``fields``) while inside.

    Writes through the lab's own registry, as an operator's import would, and waits
    until serve answers from the new entry (its poller runs every 0.5 s); restores
    the lab's entry afterwards, also on failure, and waits for that too.
    """
    base = lp.instance(lab.plan, lab.vm(vm))
    nonce = secrets.token_hex(4)
    changed = dataclasses.replace(
        base,
        metadata_options=options,
        metadata={**base.metadata, "policy": nonce},
        **fields,  # type: ignore[arg-type]
    )
    registry = open_registry(lab.plan.paths.registry_url)
    try:
        registry.put_instance(changed)
        if options is not None and options.http_endpoint == "disabled":
            wait_until(
                lambda: vm_request(lab, vm, ID_PATH, timeout=2).status == 403,
                what=f"serve applies http_endpoint=disabled to {vm}",
            )
        else:
            wait_until(lambda: _policy_marker(lab, vm) == nonce, what=f"serve shows {vm}'s new entry")
        yield changed
    finally:
        registry.put_instance(base)
        registry.close()
        wait_until(lambda: _policy_marker(lab, vm) is None, what=f"serve shows {vm}'s entry restored")


# --- raw HTTP from inside a VM ----------------------------------------------------------------


@dataclass(frozen=True)
class RawReply:
    data: bytes
    closed: bool  # the server closed the connection (else: our read timed out)
    seconds: float


def vm_raw(
    lab: Lab,
    vm: str,
    chunks: bytes | tuple[bytes, ...],
    *,
    host: str = METADATA_V4,
    port: int = 80,
    timeout: float = 5.0,
    pause: float = 0.0,
) -> RawReply:
    """Send ``chunks`` (``pause`` seconds apart) from inside ``vm``; read until close or timeout."""
    parts = (chunks,) if isinstance(chunks, bytes) else chunks

    def go() -> RawReply:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addr = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
        start = time.monotonic()
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            got = b""
            for i, part in enumerate(parts):
                if i and pause:
                    # Wait for the server between parts; once it has answered (or
                    # closed), stop sending: more bytes would only draw a reset.
                    sock.settimeout(pause)
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        chunk = None
                    except ConnectionResetError:
                        return RawReply(got, True, time.monotonic() - start)
                    sock.settimeout(timeout)
                    if chunk is not None:
                        got += chunk
                        if not chunk:
                            return RawReply(got, True, time.monotonic() - start)
                        break
                try:
                    sock.sendall(part)
                except (BrokenPipeError, ConnectionResetError):
                    break
            sock.settimeout(timeout)
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return RawReply(got, False, time.monotonic() - start)
                except ConnectionResetError:
                    return RawReply(got, True, time.monotonic() - start)
                if not chunk:
                    return RawReply(got, True, time.monotonic() - start)
                got += chunk

    return lab.call(vm, go)


@dataclass(frozen=True)
class Parsed:
    status: int
    headers: Mapping[str, str]
    body: bytes


def responses(data: bytes) -> list[Parsed]:
    """Split a byte stream of HTTP/1.1 replies (each with Content-Length) into replies."""
    out: list[Parsed] = []
    rest = data
    while rest:
        head, sep, tail = rest.partition(b"\r\n\r\n")
        assert sep, f"truncated reply head: {rest[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, code, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append(Parsed(int(code), headers, tail[:length]))
        rest = tail[length:]
    return out


def request_bytes(method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request that asks the server to close after answering."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 169.254.169.254"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- case tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forgery:
    """A guest claims another identity in headers; it must get exactly its own data (200)."""

    id: str
    caller: str
    victim: str
    headers: Callable[[VMPlan], dict[str, str]]  # given the victim
    host: str = METADATA_V4


def _stamp(v: VMPlan) -> dict[str, str]:
    scope = {"X-Meta169-Router-ID": "router-a"} if v.mode == "router" else {"X-Meta169-Network-ID": v.network_id}
    return {"X-Meta169-Caller-IP": str(v.ip), **scope}


FORGERIES: tuple[Forgery, ...] = (
    Forgery("x_forwarded_for_other_vm", "a1", "a2", lambda v: {"X-Forwarded-For": str(v.ip)}),
    Forgery("x_forwarded_for_chain", "b1", "b2", lambda v: {"X-Forwarded-For": f"{v.ip}, 127.0.0.1"}),
    Forgery("forwarded_rfc7239", "a1", "a2", lambda v: {"Forwarded": f"for={v.ip};proto=http;by=10.0.0.1"}),
    Forgery("x_real_ip", "a2", "a1", lambda v: {"X-Real-IP": str(v.ip)}),
    Forgery("client_ip_headers", "b2", "b1", lambda v: {"X-Client-IP": str(v.ip), "True-Client-IP": str(v.ip)}),
    Forgery("meta169_caller_ip", "a1", "a2", lambda v: {"X-Meta169-Caller-IP": str(v.ip)}),
    # Same IP, other tenant: only the network in the stamp would tell a1 from b1.
    Forgery("meta169_network_id_other_tenant", "a1", "b1", _stamp),
    Forgery("meta169_router_id_other_tenant", "b1", "a1", _stamp),
    Forgery(
        "meta169_forged_signature",
        "a1",
        "a2",
        lambda v: {**_stamp(v), "X-Meta169-Signature": f"v1 ts={int(time.time())} nonce={'0' * 24} sig={'0' * 64}"},
    ),
    Forgery(
        "meta169_mixed_case",
        "a2",
        "a1",
        lambda v: {"x-META169-caller-ip": str(v.ip), "X-meta169-ROUTER-id": "router-a"},
    ),
    Forgery("meta169_stamp_over_ipv6", "b2", "a2", _stamp, host=V6_HOST),
    Forgery(
        "neutron_network_id",
        "a1",
        "b2",
        lambda v: {"X-Neutron-Network-ID": v.network_id, "X-Forwarded-For": str(v.ip)},
    ),
    Forgery(
        "neutron_router_id",
        "b1",
        "a2",
        lambda v: {"X-Neutron-Router-ID": "router-a", "X-Forwarded-For": str(v.ip)},
    ),
    Forgery(
        "ovn_headers",
        "a1",
        "b1",
        lambda v: {"X-OVN-Network-ID": v.network_id, "X-OVN-Instance-ID": v.uuid, "X-Forwarded-For": str(v.ip)},
    ),
    Forgery(
        "x_instance_id_with_signature",
        "a1",
        "b1",
        lambda v: {
            "X-Instance-ID": v.uuid,
            "X-Tenant-ID": v.project_id,
            "X-Instance-ID-Signature": "0" * 64,
            "X-Forwarded-For": str(v.ip),
        },
    ),
    Forgery("x_tenant_id", "b2", "a2", lambda v: {"X-Tenant-ID": v.project_id, "X-Instance-ID": v.uuid}),
)


def flip_char(token: str, index: int) -> str:
    """``token`` with the character at ``index`` changed to another base64url character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    old = token[index]
    new = alphabet[(alphabet.index(old) + 7) % 64]
    return token[:index] + new + token[index + 1 :]


def same_bits_last_char(token: str) -> str:
    """A non-canonical spelling: the last character changed only in the bits the
    base64 decoder ignores (62 characters carry 46 bytes: 4 spare bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(token[-1])
    return token[:-1] + alphabet[index ^ 0x01]


Tokens = Mapping[str, str]


@dataclass(frozen=True)
class RawCase:
    """Raw bytes from a VM through the lab proxy; every reply must carry ``statuses``."""

    id: str
    caller: str
    build: Callable[[Tokens], bytes]
    statuses: tuple[int, ...]
    # Every 200 reply must be exactly the caller's own instance id.
    own: bool = False


def _get(path: str, headers: Mapping[str, str] | None = None) -> Callable[[Tokens], bytes]:
    return lambda _t: request_bytes("GET", path, headers)


def _with_token(path: str, token: Callable[[Tokens], str]) -> Callable[[Tokens], bytes]:
    return lambda t: request_bytes("GET", path, {TOKEN_HEADER: token(t)})


def _put_token(headers: Mapping[str, str], path: str = TOKEN_PATH) -> Callable[[Tokens], bytes]:
    return lambda _t: request_bytes("PUT", path, headers)


TOKEN_CASES: tuple[RawCase, ...] = (
    RawCase("other_vm_token", "a1", _with_token(USER_DATA_PATH, lambda t: t["a2"]), (401,)),
    # a1 and b1 share 10.0.0.11: the token is bound to the instance, not the address.
    RawCase("other_tenant_same_ip_token", "a1", _with_token(USER_DATA_PATH, lambda t: t["b1"]), (401,)),
    RawCase("other_tenant_token_isolated", "b2", _with_token(OS_META_PATH, lambda t: t["a2"]), (401,)),
    RawCase("tampered_token_uuid", "a1", _with_token(ID_PATH, lambda t: flip_char(t["a1"], 12)), (401,)),
    RawCase("tampered_token_mac", "b1", _with_token(ID_PATH, lambda t: flip_char(t["b1"], 50)), (401,)),
    RawCase("tampered_token_spare_bits", "a2", _with_token(ID_PATH, lambda t: same_bits_last_char(t["a2"])), (401,)),
    RawCase("padded_token", "a1", _with_token(ID_PATH, lambda t: t["a1"] + "=="), (401,)),
    RawCase("garbage_token", "b2", _with_token(USER_DATA_PATH, lambda _t: "A" * 62), (401,)),
    RawCase(
        "duplicate_token_headers",
        "a1",
        lambda t: request_bytes("GET", USER_DATA_PATH, {TOKEN_HEADER: t["a1"], TOKEN_HEADER.lower(): t["a2"]}),
        (401,),
    ),
    RawCase("own_token_control", "b1", _with_token(ID_PATH, lambda t: t["b1"]), (200,), own=True),
    RawCase("token_put_x_forwarded_for", "a1", _put_token({TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.12"}), (403,)),
    RawCase(
        "token_put_x_forwarded_for_isolated", "b2", _put_token({TTL_HEADER: "60", "X-Forwarded-For": "1.2.3.4"}), (403,)
    ),
    RawCase("token_put_dated_path", "a1", _put_token({TTL_HEADER: "60"}, "/2021-03-23/api/token"), (403,)),
    RawCase("token_put_old_dated_path", "b1", _put_token({TTL_HEADER: "60"}, "/2009-04-04/api/token"), (403,)),
    RawCase("token_path_get", "a2", lambda _t: request_bytes("GET", TOKEN_PATH, {TTL_HEADER: "60"}), (405,)),
    RawCase("token_path_post", "b2", lambda _t: request_bytes("POST", TOKEN_PATH, {TTL_HEADER: "60"}, b"x"), (405,)),
    RawCase("token_path_delete", "a1", lambda _t: request_bytes("DELETE", TOKEN_PATH, {TTL_HEADER: "60"}), (405,)),
    RawCase("token_ttl_0", "a1", _put_token({TTL_HEADER: "0"}), (400,)),
    RawCase("token_ttl_21601", "b1", _put_token({TTL_HEADER: "21601"}), (400,)),
    RawCase("token_ttl_missing", "a2", _put_token({}), (400,)),
    RawCase("token_ttl_not_integer", "b2", _put_token({TTL_HEADER: "1e3"}), (400,)),
)

_BIG = "a" * 9000

FRAMING_CASES: tuple[RawCase, ...] = (
    RawCase("header_too_large", "a1", _get(ID_PATH, {"X-Big": _BIG}), (431,)),
    RawCase("header_too_large_isolated", "b1", _get(ID_PATH, {"X-Big": _BIG}), (431,)),
    RawCase("too_many_headers", "a2", _get(ID_PATH, {f"X-H{i}": "v" for i in range(100)}), (431,)),
    RawCase(
        "body_too_large_declared",
        "a1",
        lambda _t: b"POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        (413,),
    ),
    RawCase(
        "body_too_large_chunked",
        "b2",
        lambda _t: (
            b"POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 2
            + b"0\r\n\r\n"
        ),
        (413,),
    ),
    RawCase("malformed_request_line", "a1", lambda _t: b"GARBAGE\r\n\r\n", (400,)),
    RawCase("bad_http_version", "b1", lambda _t: b"GET /latest/meta-data/ HTTP/9.9\r\nHost: x\r\n\r\n", (400,)),
    RawCase("nul_in_path", "a2", lambda _t: b"GET /latest/\x00meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    RawCase(
        "content_length_with_chunked",
        "a1",
        lambda _t: (
            b"POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        (400,),
    ),
    RawCase(
        "duplicate_content_length",
        "b2",
        lambda _t: (
            b"POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        ),
        (400,),
    ),
    RawCase("url_too_long", "a1", _get("/" + "a" * 5000), (414,)),
    RawCase("connect_method", "b1", lambda _t: b"CONNECT 10.0.0.12:22 HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    RawCase("upgrade_request", "a2", _get(ID_PATH, {"Connection": "upgrade", "Upgrade": "websocket"}), (400,)),
    RawCase("absolute_uri_other_host", "a1", _get("http://10.0.0.12/latest/meta-data/instance-id"), (404,)),
    RawCase("path_traversal", "b1", _get("/latest/meta-data/../../openstack/latest/meta_data.json"), (404,)),
    RawCase("encoded_path_traversal", "a2", _get("/latest/meta-data/%2e%2e/%2e%2e/latest/user-data"), (404,)),
    RawCase(
        "pipelined_forgery",
        "a1",
        lambda _t: (
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
            + request_bytes("GET", ID_PATH, {"X-Meta169-Caller-IP": "10.0.0.12", "X-Meta169-Router-ID": "router-a"})
        ),
        (200, 200),
        own=True,
    ),
)


# --- forgers on the host: serve's TCP proxy listener and its Neutron listener -------------


@dataclass(frozen=True)
class StampedCaller:
    """What the proxy stamps, spelled as given (the real Caller normalises ::ffff:a.b.c.d,
    so a forger's mapped spelling is built with this instead)."""

    ip: str
    network_id: str | None = None
    router_id: str | None = None


WireRequest = tuple[str, str, dict[str, str]]  # method, path, headers


def stamp(
    secret: bytes,
    who: StampedCaller,
    method: str,
    path: str,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """The identity headers and HMAC the proxy would send for ``who`` (signed with ``secret``)."""
    headers = {"X-Meta169-Caller-IP": who.ip}
    if who.network_id is not None:
        headers["X-Meta169-Network-ID"] = who.network_id
    else:
        assert who.router_id is not None
        headers["X-Meta169-Router-ID"] = who.router_id
    headers["X-Meta169-Signature"] = sign(secret, cast(Caller, who), method, path, now=now)
    return headers


A1 = StampedCaller("10.0.0.11", router_id="router-a")  # tenant a is served through its router
B1 = StampedCaller("10.0.0.11", network_id="net-b")  # same IP, isolated tenant b


@dataclass(frozen=True)
class WireCase:
    """Requests sent in order to one of serve's loopback listeners; exact statuses expected.

    ``build`` gets the lab and the listener's secret. A 200 must be ``owner``'s
    instance id (every case asks for the instance id when it expects 200)."""

    id: str
    build: Callable[[Lab, bytes], list[WireRequest]]
    statuses: tuple[int, ...]
    owner: str = ""


def _stamped(who: StampedCaller, *, skew: float = 0.0) -> Callable[[Lab, bytes], list[WireRequest]]:
    """One instance-id GET stamped for ``who``, its clock ``skew`` seconds off."""
    return lambda _lab, secret: [("GET", ID_PATH, stamp(secret, who, "GET", ID_PATH, now=time.time() + skew))]


def _twice(who: StampedCaller, *, skew: float = 0.0) -> Callable[[Lab, bytes], list[WireRequest]]:
    """The same stamped request sent twice: a captured stamp replayed."""

    def build(_lab: Lab, secret: bytes) -> list[WireRequest]:
        headers = stamp(secret, who, "GET", ID_PATH, now=time.time() + skew)
        return [("GET", ID_PATH, headers), ("GET", ID_PATH, dict(headers))]

    return build


def _altered(change: Callable[[dict[str, str]], WireRequest]) -> Callable[[Lab, bytes], list[WireRequest]]:
    """A valid stamp for a1's instance-id GET, then changed by ``change``."""
    return lambda _lab, secret: [change(stamp(secret, A1, "GET", ID_PATH))]


def _drop_signature(h: dict[str, str]) -> WireRequest:
    return ("GET", ID_PATH, {k: v for k, v in h.items() if k != "X-Meta169-Signature"})


def _scope_to_net_b(h: dict[str, str]) -> WireRequest:
    out = {k: v for k, v in h.items() if k != "X-Meta169-Router-ID"}
    return ("GET", ID_PATH, {**out, "X-Meta169-Network-ID": "net-b"})


STAMP_CASES: tuple[WireCase, ...] = (
    WireCase("stamp_valid_control", _stamped(A1), (200,), owner="a1"),
    WireCase("stamp_replayed_at_once", _twice(A1), (200, 403), owner="a1"),
    WireCase("stamp_replayed_inside_window", _twice(B1, skew=-20), (200, 403), owner="b1"),
    WireCase("stamp_replayed_outside_window", _twice(A1, skew=-60), (403, 403)),
    WireCase("stamp_from_the_future", _stamped(A1, skew=60), (403,)),
    WireCase(
        "stamp_caller_ip_swapped",
        _altered(lambda h: ("GET", ID_PATH, {**h, "X-Meta169-Caller-IP": "10.0.0.12"})),
        (403,),
    ),
    WireCase("stamp_scope_swapped", _altered(_scope_to_net_b), (403,)),
    WireCase("stamp_path_swapped", _altered(lambda h: ("GET", USER_DATA_PATH, h)), (403,)),
    WireCase("stamp_method_swapped", _altered(lambda h: ("PUT", ID_PATH, {**h, TTL_HEADER: "60"})), (403,)),
    WireCase("stamp_missing_signature", _altered(_drop_signature), (403,)),
    WireCase(
        "stamp_malformed", _altered(lambda h: ("GET", ID_PATH, {**h, "X-Meta169-Signature": "v1 sig=00"})), (403,)
    ),
    WireCase(
        "stamp_wrong_secret",
        lambda _lab, _secret: [("GET", ID_PATH, stamp(b"not-the-shared-secret-0123456789", A1, "GET", ID_PATH))],
        (403,),
    ),
    # An IPv4 client seen on a dual-stack socket is ::ffff:a.b.c.d: it must be that
    # IPv4 instance in the stamped scope, and never an instance elsewhere.
    WireCase(
        "ipv4_mapped_caller_router", _stamped(StampedCaller("::ffff:10.0.0.11", router_id="router-a")), (200,), "a1"
    ),
    WireCase(
        "ipv4_mapped_caller_network", _stamped(StampedCaller("::ffff:10.0.0.12", network_id="net-b")), (200,), "b2"
    ),
    WireCase("ipv4_mapped_caller_unknown", _stamped(StampedCaller("::ffff:10.0.0.99", router_id="router-a")), (404,)),
)


def neutron_headers(
    secret: bytes, instance_id: str, tenant: str, *, sign_as: str | None = None, xff: str = "10.0.0.11"
) -> dict[str, str]:
    """What a stock Neutron metadata agent sends [neutron common/utils.py sign_instance_id]."""
    signature = hmac.new(secret, (sign_as or instance_id).encode(), hashlib.sha256).hexdigest()
    return {
        "X-Instance-ID": instance_id,
        "X-Tenant-ID": tenant,
        "X-Instance-ID-Signature": signature,
        "X-Forwarded-For": xff,
    }


def _neutron(vm: str, tenant: str | None = None, **kw: str) -> Callable[[Lab, bytes], list[WireRequest]]:
    def build(lab: Lab, secret: bytes) -> list[WireRequest]:
        plan = lab.vm(vm)
        return [("GET", ID_PATH, neutron_headers(secret, plan.uuid, tenant or plan.project_id, **kw))]

    return build


def _neutron_other_signature(lab: Lab, secret: bytes) -> list[WireRequest]:
    a1, b1 = lab.vm("a1"), lab.vm("b1")
    return [("GET", ID_PATH, neutron_headers(secret, b1.uuid, b1.project_id, sign_as=a1.uuid))]


def _neutron_wrong_secret(lab: Lab, _secret: bytes) -> list[WireRequest]:
    a1 = lab.vm("a1")
    return [("GET", ID_PATH, neutron_headers(b"guessed-secret-0123456789abcdef", a1.uuid, a1.project_id))]


def _neutron_no_signature(lab: Lab, secret: bytes) -> list[WireRequest]:
    a1 = lab.vm("a1")
    headers = neutron_headers(secret, a1.uuid, a1.project_id)
    del headers["X-Instance-ID-Signature"]
    return [("GET", ID_PATH, headers)]


def _neutron_unknown(_lab: Lab, secret: bytes) -> list[WireRequest]:
    ghost = "00000000-0000-4000-8000-000000000000"
    return [("GET", ID_PATH, neutron_headers(secret, ghost, "proj-a"))]


def _neutron_token_put_forwarded(lab: Lab, secret: bytes) -> list[WireRequest]:
    a1 = lab.vm("a1")
    # The agent appends the guest's address; a second hop came from inside the guest.
    headers = neutron_headers(secret, a1.uuid, a1.project_id, xff="192.168.77.2, 10.0.0.11")
    return [("PUT", TOKEN_PATH, {**headers, TTL_HEADER: "60"})]


NEUTRON_CASES: tuple[WireCase, ...] = (
    WireCase("neutron_signed_control", _neutron("b2"), (200,), owner="b2"),
    WireCase("neutron_signature_for_other_instance", _neutron_other_signature, (403,)),
    WireCase("neutron_signature_wrong_secret", _neutron_wrong_secret, (403,)),
    WireCase("neutron_tenant_mismatch", _neutron("a1", tenant="proj-b"), (404,)),
    WireCase("neutron_tenant_mismatch_isolated", _neutron("b1", tenant="proj-a"), (404,)),
    WireCase("neutron_missing_signature", _neutron_no_signature, (400,)),
    WireCase("neutron_unknown_instance", _neutron_unknown, (404,)),
    WireCase("neutron_token_put_forwarded_by_guest", _neutron_token_put_forwarded, (403,)),
)
