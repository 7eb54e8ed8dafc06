"""IMDSv2 session tokens: sealing, binding, expiry, rotation, TTL parsing."""

from __future__ import annotations

import pytest

from meta169.api import tokens
from meta169.api.tokens import KeyRing, TokenKey
from meta169.errors import ConfigError

A = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
B = "11111111-1111-4111-8111-111111111111"
NOW = 1_800_000_000.0
RING = KeyRing((TokenKey(1, b"k" * 32),))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", None),
        ("1", 1),
        ("21600", 21600),
        ("21601", None),
        ("-5", None),
        ("abc", None),
        ("1.5", None),
        (" 60 ", 60),
        ("9999999999", None),
    ],
)
def test_tokens_parse_ttl(value: str | None, expected: int | None) -> None:
    assert tokens.parse_ttl(value) == expected


def test_tokens_valid_for_own_instance_until_expiry() -> None:
    token = tokens.issue(RING, A, 60, now=NOW)
    assert tokens.is_valid(RING, token, A, now=NOW + 59)
    assert not tokens.is_valid(RING, token, A, now=NOW + 60)


def test_tokens_bound_to_instance() -> None:
    assert not tokens.is_valid(RING, tokens.issue(RING, A, 60, now=NOW), B, now=NOW)


def test_tokens_differ_per_issue() -> None:
    assert tokens.issue(RING, A, 60, now=NOW) != tokens.issue(RING, A, 60, now=NOW)


@pytest.mark.parametrize("position", [0, 5, 20, 40, -2, -1])
def test_tokens_tampered_byte_is_rejected(position: int) -> None:
    token = tokens.issue(RING, A, 60, now=NOW)
    chars = list(token)
    chars[position] = "A" if chars[position] != "A" else "B"
    assert not tokens.is_valid(RING, "".join(chars), A, now=NOW)


@pytest.mark.parametrize("garbage", ["", "x", "!!!!", "a" * 200, "AAAA" * 16])
def test_tokens_garbage_is_rejected(garbage: str) -> None:
    assert not tokens.is_valid(RING, garbage, A, now=NOW)


def test_tokens_rotation_grace_period() -> None:
    old = KeyRing((TokenKey(1, b"o" * 32),))
    rotated = KeyRing((TokenKey(2, b"n" * 32), TokenKey(1, b"o" * 32)))
    retired = KeyRing((TokenKey(2, b"n" * 32),))
    token = tokens.issue(old, A, 600, now=NOW)
    assert tokens.is_valid(rotated, token, A, now=NOW)
    assert not tokens.is_valid(retired, token, A, now=NOW)
    assert tokens.is_valid(old, tokens.issue(rotated, A, 600, now=NOW), A, now=NOW) is False


def test_tokens_other_node_with_same_ring_accepts() -> None:
    node1 = KeyRing.parse("7:" + "ab" * 32 + "\n", source="k")
    node2 = KeyRing.parse("# shared\n7:" + "ab" * 32 + "\n", source="k")
    assert tokens.is_valid(node2, tokens.issue(node1, A, 60, now=NOW), A, now=NOW)


@pytest.mark.parametrize("text", ["", "x", "1:zz", "1:abcd", "300:" + "ab" * 32, "1:" + "ab" * 32 + "\n1:" + "cd" * 32])
def test_tokens_bad_key_file_is_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        KeyRing.parse(text, source="keys")
