"""The compiled wire layer (``_wire.c``): serve's fast path, the proxy's stamping, the
framing of serve's replies, and the rate-limit bucket it shares with Python.

A booting guest asks for the same few dozen documents everyone asks for; once the
Python path has answered a document of a version for a caller, it records in that
caller's *wire table* the encoded replies it gives for every document of that
version, and the next request for any of them is answered by one call into
``_wire.c``: recognise the request, find the table and the path, take a token from
the instance's bucket, assemble the reply. Anything else (percent-encoding, bodies,
odd framing, misses, and every header the Python path reads) is declined and
answered by the Python path, which stays the single definition of behaviour: the
fast path only ever gives an answer that path gives (the tests compare them for
every document of a site).

Where the rules come from: ``_wire.c`` itself knows only HTTP/1.1 framing (RFC 9112:
the request line, header syntax, Content-Length, Transfer-Encoding, Connection,
Upgrade, Expect) and serve's :class:`~meta169.http.limits.Limits`, counted as
``HTTPProtocol`` counts them. Which request headers make a request the Python
path's is data passed in by :func:`fast_path`'s caller: ``owned`` (exact lower-case
names) and ``owned_prefixes``, both defined once next to the code that reads those
headers (``api.metadata.PYTHON_OWNED_HEADERS`` / ``PYTHON_OWNED_PREFIXES``: the IMDSv2
token and TTL headers, Neutron's and X-Forwarded-For, every ``X-Meta169-*``), and
on a proxy listener ``stamp``, the names of the proxy's stamp (``http.stamp``),
read instead of declined; likewise ``token``, the IMDSv2 token header's name, read
and checked against ``tokens`` (below) when both are given. Names are matched
case-insensitively on the wire. The proxy's :func:`stamper` likewise gets its drop
lists from ``proxy.server``. Every reply or request the C code assembles is written
into a buffer it sized first, with each write checked against that size.

Tables (owned by the metadata application's site cache, which drops them together
with the cached site):

- ``sites``: caller address text -> ``(wire, uuid)`` or ``(wire, uuid,
  tokens_required)``, for one network or router (a direct listener, keyed by the
  TCP peer); a proxy listener gets two maps of these, by network id and by router
  id, and keys by the stamp the trusted proxy sent (``X-Meta169-Caller-IP`` with
  ``X-Meta169-Network-ID`` or ``-Router-ID``). With ``tokens_required`` True (an
  instance with IMDSv2 ``http_tokens: required``) a request without a token is
  declined (the Python path answers 401);
- ``wire``: request path bytes (before ``?``) -> ``(head, body)``, or
  ``(head, prefix, suffix)`` for a document whose body is ``prefix + <fresh
  base64 random seed> + suffix`` (meta_data.json, see ``render.document``); either
  may end with a small int, the reply's metrics class (0..15), whose counter in the
  FastPath goes up each time the reply is repeated.

And, not per caller, ``tokens`` (owned by the metadata application, filled by
``api.tokens.Validated``): IMDSv2 token bytes -> ``(instance uuid, expiry in Unix
seconds)``, the tokens the Python path found valid. A request carrying the token
header is answered only when this holds the value sent (once, trimmed) for the
uuid of the caller's slot with the expiry still ahead by the wall clock, checked
before the rate-limit bucket; any other token (forged, expired, another
instance's, or just not seen yet) is declined, and the Python path judges it.

Counters (read at scrape time, never a Python call per request): :func:`fast_stats`
gives a FastPath's answers per class and, when it was made with ``latency_bounds``,
the time spent inside ``answer()`` per request in those buckets; :func:`stamped`
gives the number of requests a Stamper forwarded.

The proxy has its own compiled step, :func:`stamper`: a simple guest request becomes
the stamped upstream request the Python ``ProxyApp`` would have written.

When the extension is not built (no C compiler), :func:`compiled` is False,
:func:`fast_path` and :func:`stamper` return None and every request takes the
Python path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Protocol

# (head, body), or (head, prefix, suffix) around a fresh random seed; each maybe
# followed by its metrics class.
WireEntry = (
    tuple[bytes, bytes] | tuple[bytes, bytes, bytes] | tuple[bytes, bytes, int] | tuple[bytes, bytes, bytes, int]
)
WireTable = dict[bytes, WireEntry]
# (wire, instance uuid), or (wire, instance uuid, whether IMDSv2 tokens are required)
SiteSlot = tuple[WireTable, str] | tuple[WireTable, str, bool]
SiteSlots = dict[str, SiteSlot]
# IMDSv2 token bytes -> (instance uuid, expiry in Unix seconds), all found valid.
TokenTable = dict[bytes, tuple[str, int]]
# (replies, keep-alive), or (replies, True, offset where the Python path goes on).
Answer = Callable[[bytes, str], "tuple[bytes, bool] | tuple[bytes, bool, int] | None"]
# (upstream request, HEAD asked, keep-alive, request target)
Forward = Callable[[bytes, str], "tuple[bytes, bool, bool, bytes] | None"]
# (answers per class, latency bucket counts with +Inf last, latency sum in seconds)
FastStats = Callable[[], tuple[tuple[int, ...], tuple[int, ...], float]]


class BucketLike(Protocol):
    def take(self, now: float) -> float: ...
    def full(self, now: float) -> bool: ...


class PyBucket:
    """One instance's token bucket (the C ``Bucket`` does the same arithmetic)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError("a bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> float:
        """0.0 when allowed; else the seconds until the next request would be."""
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens >= 1.0 - 1e-9:  # float refill must not lose a token to rounding
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.last) * self.rate >= self.burst


try:
    from meta169.http import _wire  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the Python path serves everything
    _wire = None


def compiled() -> bool:
    """Whether the extension is in use."""
    return _wire is not None


# The proxy's framing of serve's plain replies (proxy.upstream has the Python twin).
reply_frame: Callable[[bytes, int], tuple[int, int] | int] | None = _wire.reply_frame if _wire is not None else None
Bucket: Callable[[float, float, float], BucketLike] = _wire.Bucket if _wire is not None else PyBucket


def set_seed_source(source: Callable[[], bytes] | None) -> None:
    """Where the compiled path gets pools of random seed bytes (None: getrandom)."""
    if _wire is not None:
        _wire.set_seed_source(source)


def fast_path(
    sites: SiteSlots | dict[str, SiteSlots],
    buckets: dict[str, BucketLike] | None,
    *,
    max_header_bytes: int,
    max_headers: int,
    max_url_bytes: int,
    owned: Iterable[str],
    owned_prefixes: Iterable[str],
    routers: dict[str, SiteSlots] | None = None,
    stamp: tuple[str, str, str] | None = None,
    latency_bounds: tuple[float, ...] | None = None,
    tokens: TokenTable | None = None,
    token_header: str | None = None,
) -> Answer | None:
    """The compiled ``answer(data, peer)`` over these tables, or None without the
    extension.

    A request carrying any header named in ``owned`` or starting with one of
    ``owned_prefixes`` (lower case; matched case-insensitively) is declined. With
    ``routers`` it serves a proxy listener: ``sites`` is then the network-id map,
    ``stamp`` names the caller IP, network id and router id headers, and ``peer`` is
    ignored in favour of that stamp; the stamp is read even where it is also owned.
    ``latency_bounds`` (increasing upper bounds in seconds) turns on timing each
    call: two clock reads per call, none without. With ``tokens`` and
    ``token_header`` (lower case, given together) a request carrying that header is
    answered when ``tokens`` vouches for its value, as the module docstring says;
    the header is read even where it is also owned.
    """
    if _wire is None:
        return None
    fast = _wire.FastPath(
        sites,
        buckets,
        max_header_bytes,
        max_headers,
        max_url_bytes,
        _encoded(tuple(owned)),
        _encoded(tuple(owned_prefixes)),
        routers,
        None if stamp is None else tuple(n.encode("latin-1") for n in stamp),
        latency_bounds,
        tokens,
        None if token_header is None else token_header.encode("latin-1"),
    )
    answer: Answer = fast.answer
    return answer


def fast_stats(answer: Answer) -> FastStats | None:
    """The counters of the FastPath behind ``answer`` (from :func:`fast_path`)."""
    stats: FastStats | None = getattr(getattr(answer, "__self__", None), "stats", None)
    return stats


def stamped(forward: Forward) -> Callable[[], int]:
    """How many requests the Stamper behind ``forward`` (from :func:`stamper`) forwarded."""
    owner = getattr(forward, "__self__", None)

    def count() -> int:
        return int(getattr(owner, "forwarded", 0))

    return count


@functools.cache
def _encoded(names: frozenset[str] | tuple[str, ...]) -> tuple[bytes, ...]:
    # One tuple shared by every listener's FastPath or Stamper (a proxy may have thousands).
    return tuple(sorted(set(n.encode("latin-1") for n in names)))


def stamper(
    *,
    drop: frozenset[str],
    prefixes: tuple[str, ...],
    marker_for: str,
    marker: str,
    before: str,
    after: str,
    max_header_bytes: int,
    max_headers: int,
    max_url_bytes: int,
) -> Forward | None:
    """The compiled ``forward(data, peer)`` of the proxy, or None without the extension.

    ``drop`` and ``prefixes`` name (lower case) the headers never forwarded; the one
    named ``marker_for`` leaves the line ``marker`` in its place; ``before`` and
    ``after`` surround the caller's address at the end of the head.
    """
    if _wire is None:
        return None
    fast = _wire.Stamper(
        _encoded(drop),
        _encoded(prefixes),
        marker_for.encode("latin-1"),
        marker.encode("latin-1"),
        before.encode("latin-1"),
        after.encode("latin-1"),
        max_header_bytes,
        max_headers,
        max_url_bytes,
    )
    forward: Forward = fast.forward
    return forward
