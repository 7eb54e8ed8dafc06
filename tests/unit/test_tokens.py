"""IMDSv2 session tokens: sealing, binding, expiry, rotation, TTL parsing."""

from __future__ import annotations

import pytest

from meta169.api import tokens
from meta169.api.tokens import KeyRing, TokenKey
from meta169.errors import ConfigError

A = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
B = "11111111-1111-4111-8111-111111111111"
NOW = 1_800_000_000.0
NOW_S = int(NOW)
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


def test_tokens_valid_until_gives_the_sealed_expiry() -> None:
    token = tokens.issue(RING, A, 60, now=NOW + 0.25)
    assert tokens.valid_until(RING, token, A, now=NOW) == NOW + 61  # rounded up, never cut
    assert tokens.valid_until(RING, token, B, now=NOW) is None
    assert tokens.valid_until(RING, token, A, now=NOW + 61) is None
    assert tokens.valid_until(RING, "forged", A, now=NOW) is None


def _validated(max_tokens: int, per_instance: int) -> tokens.Validated:
    return tokens.Validated(max_tokens=max_tokens, per_instance=per_instance)


def test_tokens_validated_maps_token_bytes_to_instance_and_expiry() -> None:
    table = _validated(8, 4)
    token = tokens.issue(RING, A, 60, now=NOW)
    table.add(token, A, NOW_S + 60, now=NOW)
    table.add(token, A, NOW_S + 60, now=NOW)  # again: one entry
    assert table.table == {token.encode(): (A, NOW_S + 60)}


def test_tokens_validated_instance_evicts_only_its_own_oldest() -> None:
    table = _validated(100, 3)
    table.add("b-only", B, NOW_S + 60, now=NOW)
    for n in range(10):
        table.add(f"a-{n}", A, NOW_S + 60, now=NOW)
    assert list(table.table) == [b"b-only", b"a-7", b"a-8", b"a-9"]


def test_tokens_validated_full_table_sweeps_expired_first() -> None:
    table = _validated(8, 8)
    for n in range(4):
        table.add(f"old-{n}", A, NOW_S - 1, now=NOW - 100)  # recorded while valid
    for n in range(4):
        table.add(f"live-{n}", B, NOW_S + 60, now=NOW)
    table.add("new", B, NOW_S + 60, now=NOW)
    assert set(table.table) == {b"live-0", b"live-1", b"live-2", b"live-3", b"new"}


def test_tokens_validated_stays_bounded_and_consistent() -> None:
    # Many instances, none expired: the oldest eighth makes way at each sweep.
    table = _validated(64, 4)
    uuids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(100)]
    for n in range(5000):
        table.add(f"t-{n}", uuids[n % len(uuids)], NOW_S + 60, now=NOW)
        assert len(table) <= 64
    assert f"t-{4999}".encode() in table.table
    # every entry is held under its instance and nothing else is (the per-instance bound's bookkeeping)
    held = table._by_instance
    assert sum(len(keys) for keys in held.values()) == len(table)
    assert all(table.table[key][0] == uuid for uuid, keys in held.items() for key in keys)
    assert all(len(keys) <= 4 for keys in held.values())


@pytest.mark.parametrize(("max_tokens", "per_instance"), [(0, 1), (1, 0)])
def test_tokens_validated_needs_room(max_tokens: int, per_instance: int) -> None:
    with pytest.raises(ValueError):
        _validated(max_tokens, per_instance)
