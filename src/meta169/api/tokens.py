"""IMDSv2 session tokens: stateless, sealed with a key, bound to instance and expiry.

A token is ``base64url(version | key id | expiry | instance uuid | nonce | mac)``
where ``mac`` is HMAC-SHA256 over everything before it, truncated to 16 bytes. No
server-side state: any ``serve`` process or node holding the key ring accepts any
other's tokens, and memory does not grow with tokens issued. Rotation: the ring's
first key seals, every key in it opens, so a retiring key stays listed for one
maximum TTL (6 h) as a grace period.

Rules from the EC2 user guide ("Use IMDSv2") and botocore's IMDSFetcher:
TTL 1..21600 seconds, 400 for a missing or bad TTL, 401 for an invalid or expired
token.

:class:`Validated` is the one piece of state: a bounded record of tokens this
process issued or has already found valid, which the compiled fast path (``http.wire``)
reads to accept a repeat without the HMAC; anything it does not hold is checked
here again. It is a cache of verdicts, never a source of validity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import math
import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from meta169.errors import ConfigError

TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
MIN_TTL = 1
MAX_TTL = 21600
_VERSION = 1
_HEAD = struct.Struct(">BBI16s8s")  # version, key id, expiry (unix s), uuid, nonce
_MAC_LEN = 16
_TOKEN_LEN = _HEAD.size + _MAC_LEN
# Unpadded base64url length of a token; only that exact spelling is accepted.
_TOKEN_CHARS = -(-_TOKEN_LEN * 4 // 3)


@dataclass(frozen=True, slots=True)
class TokenKey:
    id: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 255:
            raise ConfigError(f"token key id {self.id} outside 0..255")
        if len(self.secret) < 16:
            raise ConfigError(f"token key {self.id} is shorter than 16 bytes")


@dataclass(frozen=True, slots=True)
class KeyRing:
    keys: tuple[TokenKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("the token key ring is empty")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("token key ids must be unique")

    @classmethod
    def generate(cls) -> KeyRing:
        """A fresh random key: fine for one node (workers fork after it is made)."""
        return cls((TokenKey(0, os.urandom(32)),))

    @classmethod
    def parse(cls, text: str, *, source: str) -> KeyRing:
        """One ``ID:HEX`` per line, sealing key first; ``#`` comments."""
        keys: list[TokenKey] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            ident, sep, hexkey = line.partition(":")
            try:
                if not sep:
                    raise ValueError("expected ID:HEX")
                keys.append(TokenKey(int(ident), bytes.fromhex(hexkey.strip())))
            except ValueError as exc:
                raise ConfigError(f"{source}:{n}: {exc}") from None
        return cls(tuple(keys))

    def get(self, key_id: int) -> TokenKey | None:
        for key in self.keys:
            if key.id == key_id:
                return key
        return None


def load_key_ring(path: Path) -> KeyRing:
    from meta169.secretfile import read_secret_file

    return KeyRing.parse(read_secret_file(path, what="--token-key-file").decode(), source=str(path))


def parse_ttl(value: str | None) -> int | None:
    """The requested TTL, or None when missing or not an integer in 1..21600."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 6:
        return None
    ttl = int(value)
    return ttl if MIN_TTL <= ttl <= MAX_TTL else None


def issue(ring: KeyRing, instance_uuid: str, ttl: int, *, now: float | None = None) -> str:
    key = ring.keys[0]
    # Round up: truncating the clock would cut up to a second off, all of a TTL-1 token.
    expiry = math.ceil((time.time() if now is None else now) + ttl)
    head = _HEAD.pack(_VERSION, key.id, expiry, uuidlib.UUID(instance_uuid).bytes, os.urandom(8))
    mac = hmac.new(key.secret, head, hashlib.sha256).digest()[:_MAC_LEN]
    return base64.urlsafe_b64encode(head + mac).rstrip(b"=").decode()


def is_valid(ring: KeyRing, token: str, instance_uuid: str, *, now: float | None = None) -> bool:
    """True only for an unexpired token sealed by a key in the ring for this instance."""
    return valid_until(ring, token, instance_uuid, now=now) is not None


def valid_until(ring: KeyRing, token: str, instance_uuid: str, *, now: float | None = None) -> int | None:
    """The expiry (Unix seconds) of a valid token: unexpired, sealed by a key in the
    ring, for this instance; None for any other."""
    if len(token) != _TOKEN_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    # The decoder ignores the spare low bits of the last character, so 16 spellings
    # (and padded ones) would open the same token: accept only the canonical one,
    # or a tampered token with a changed last character passes.
    if len(raw) != _TOKEN_LEN or base64.urlsafe_b64encode(raw).rstrip(b"=") != token.encode("ascii", "replace"):
        return None
    head, mac = raw[: _HEAD.size], raw[_HEAD.size :]
    version, key_id, expiry, uuid_bytes, _ = _HEAD.unpack(head)
    if version != _VERSION:
        return None
    key = ring.get(key_id)
    if key is None:
        return None
    if not hmac.compare_digest(hmac.new(key.secret, head, hashlib.sha256).digest()[:_MAC_LEN], mac):
        return None
    if expiry <= (time.time() if now is None else now):
        return None
    if uuid_bytes != uuidlib.UUID(instance_uuid).bytes:
        return None
    return int(expiry)


# Bounds of a Validated table. A guest keeps a token per client (cloud-init one for
# its crawl, each SDK session its own) for up to 6 h; a guest minting tokens in a
# loop only evicts its own. ~300 bytes an entry: 64k entries are some 20 MB at most.
MAX_VALIDATED = 65536
PER_INSTANCE = 16


class Validated:
    """Tokens this process found valid, for the compiled fast path to accept again.

    ``table`` maps the token's bytes to ``(instance uuid, expiry)``; the fast path
    (``http.wire.fast_path``) answers a request carrying a token only when the table
    holds it for the instance its caller resolves to and the expiry is still ahead
    (the same rule as :func:`valid_until`); anything else goes to the Python path,
    which checks the seal and answers 401 or records the token again.

    Only tokens :func:`valid_until` accepted enter, each under the instance it was
    checked for, so forged tokens never take room. Bounded per instance (its oldest
    token makes way) and in total (expired tokens are swept, then the oldest eighth
    of the rest): forgetting a token costs only a trip through the Python path.
    Changed only in place: the fast path holds the dict.
    """

    __slots__ = ("_by_instance", "_max", "_per_instance", "table")

    def __init__(self, *, max_tokens: int = MAX_VALIDATED, per_instance: int = PER_INSTANCE) -> None:
        if max_tokens < 1 or per_instance < 1:
            raise ValueError("a token table holds at least one token, and one per instance")
        self._max = max_tokens
        self._per_instance = per_instance
        self.table: dict[bytes, tuple[str, int]] = {}
        # Per instance, its tokens in the order they were recorded (dicts as ordered sets).
        self._by_instance: dict[str, dict[bytes, None]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def add(self, token: str, instance_uuid: str, expiry: int, *, now: float | None = None) -> None:
        """Record ``token``, which :func:`valid_until` found valid for ``instance_uuid`` until ``expiry``."""
        key = token.encode("ascii")
        if key in self.table:
            return
        held = self._by_instance.get(instance_uuid)
        if held is not None and len(held) >= self._per_instance:
            self._drop(next(iter(held)))
        if len(self.table) >= self._max:
            self._sweep(time.time() if now is None else now)
        self.table[key] = (instance_uuid, expiry)
        self._by_instance.setdefault(instance_uuid, {})[key] = None

    def _sweep(self, now: float) -> None:
        # Expired tokens first; if the rest still fills more than 7/8 of the table, the
        # oldest of them too, so that a sweep is needed at most every max/8 additions.
        drop = [key for key, (_, expiry) in self.table.items() if expiry <= now]
        excess = len(self.table) - len(drop) - self._max * 7 // 8
        if excess > 0:
            gone = set(drop)
            drop.extend(itertools.islice((key for key in self.table if key not in gone), excess))
        for key in drop:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        uuid = self.table.pop(key)[0]
        held = self._by_instance[uuid]
        del held[key]
        if not held:
            del self._by_instance[uuid]
