"""Hypothesis strategies for request heads: the names and values that matter to our
parsers, mixed with arbitrary tokens and latin-1 text."""

from __future__ import annotations

from hypothesis import strategies as st

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~"
NAMES = [
    "Host", "Accept", "Connection", "connection", "X-Forwarded-For", "User-Agent", "X-Meta169-Caller-IP",
    "x-neutron-x", "X-aws-ec2-metadata-token", "Content-Length", "Expect", "Keep-Alive", "Forwarded",
    "X-Instance-ID-Signature", "TE", "X",
]  # fmt: skip
NAME = st.sampled_from(NAMES) | st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
VALUE = st.sampled_from(["close", "keep-alive", "Keep-Alive", "0", "", " padded "]) | st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=20
)
TARGET = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda t: "/" + t)
