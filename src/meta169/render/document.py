"""One served document, and the small helpers that make listings and JSON bodies."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

TEXT: Final = "text/plain"
JSON: Final = "application/json"
OCTETS: Final = "application/octet-stream"

RANDOM_SEED_BYTES: Final = 512
# Its base64 text, spliced into meta_data.json.
SEED_TEXT_BYTES: Final = (RANDOM_SEED_BYTES + 2) // 3 * 4


@dataclass(frozen=True, slots=True)
class Document:
    """A pre-rendered reply body.

    When ``fresh`` is set the server calls it once per request and serves its result
    instead of ``body`` (meta_data.json's random_seed must differ on every read);
    ``body`` then holds one such rendering, of the same length.
    """

    content_type: str
    body: bytes
    fresh: Callable[[], bytes] | None = None

    def payload(self) -> bytes:
        """The bytes to send for one request."""
        return self.fresh() if self.fresh is not None else self.body


@dataclass(frozen=True, slots=True)
class SeededJSON:
    """JSON bytes with a fresh random_seed spliced in between ``head`` and ``tail``.

    Splicing keeps the hot path free of JSON encoding: the seed is base64, which
    never needs escaping inside a JSON string.
    """

    head: bytes
    tail: bytes

    def __call__(self) -> bytes:
        seed = base64.b64encode(_random_seed())
        return b"".join((self.head, seed, self.tail))


SEED_POOL: Final = 64


def seed_pool_bytes() -> bytes:
    """SEED_POOL seeds' worth of random bytes: the AES-256-CTR keystream under a key
    fresh from the OS CSPRNG for every pool, then dropped, so no seed says anything
    about another unless AES falls. The kernel's generator costs about 1.4 us per
    512-byte seed here and AES-NI about 0.2, and meta_data.json is asked often."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    return encryptor.update(bytes(RANDOM_SEED_BYTES * SEED_POOL)) + encryptor.finalize()


class _SeedPool:
    """Fresh seeds, generated SEED_POOL at a time. Every seed is used once."""

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def forget(self) -> None:
        self._buffer = b""
        self._offset = 0

    def take(self) -> bytes:
        if self._offset + RANDOM_SEED_BYTES > len(self._buffer):
            self._buffer = seed_pool_bytes()
            self._offset = 0
        start = self._offset
        self._offset = start + RANDOM_SEED_BYTES
        return self._buffer[start : start + RANDOM_SEED_BYTES]


_seed_pool = _SeedPool()
_random_seed = _seed_pool.take
# A forked worker must not hand out the seeds its parent still holds.
os.register_at_fork(after_in_child=_seed_pool.forget)


# Given every document a renderer makes, returns the one to keep: an equal document
# the caller already holds (sites share their small documents), or the same one.
Share = Callable[[Document], Document]


def same(doc: Document) -> Document:
    """The :data:`Share` that keeps every document as made."""
    return doc


def listing(entries: Iterable[str]) -> Document:
    """A text/plain listing: one entry per line, no trailing newline."""
    # As Nova's ec2_md_print and AWS print them; clients split on lines.
    return Document(TEXT, "\n".join(entries).encode())


def dump_json(value: Any) -> bytes:
    """JSON bytes as Nova's jsonutils.dump_as_bytes makes them (json.dumps defaults)."""
    return json.dumps(value).encode()


def json_document(value: Any) -> Document:
    """An application/json Document of ``value``."""
    return Document(JSON, dump_json(value))


def seeded_json_document(head: dict[str, Any], tail: dict[str, Any]) -> Document:
    """``{**head, "random_seed": <fresh>, **tail}`` as a Document with ``fresh`` set."""
    # json.dumps of a dict is "{...}": drop the brace on the side we splice at.
    prefix = dump_json(head)[:-1] + b', "random_seed": "' if head else b'{"random_seed": "'
    suffix = b'"' + (b", " + dump_json(tail)[1:] if tail else b"}")
    seeded = SeededJSON(prefix, suffix)
    return Document(JSON, seeded(), seeded)
