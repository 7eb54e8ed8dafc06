"""Secrets in configuration values: redacting them for display, and the registry password.

A value is shown redacted when its key names a secret (``password``, ``secret``,
``token``, ``key`` and the like, unless the key names a file or directory: the path
of a secret file is not the secret) or when the value carries one (a URL with a
password, in its user info or as libpq's ``password`` parameter).

PostgreSQL credentials never need to be in argv or a shared file: the password
file's content is joined to the registry URL here, in the process; ``~/.pgpass``,
``PGPASSFILE`` and service files (``postgresql:///?service=NAME``,
``PGSERVICEFILE``) are libpq's own and reach it untouched.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from meta169.errors import ConfigError

MASK = "***"

_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "token", "key", "credential", "credentials"})
_PATH_WORDS = frozenset({"file", "dir", "directory", "path"})
# libpq's connection parameters that hold a secret (libpq "Parameter Key Words").
_SECRET_PARAMS = ("password", "sslpassword")
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)(?:" + "|".join(_SECRET_PARAMS) + r")=)[^&]*")
_CONNINFO_SECRET = re.compile(r"(?i)\b((?:" + "|".join(_SECRET_PARAMS) + r")\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']*")
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


def is_secret_key(key: str) -> bool:
    """Whether the value of ``key`` is itself a secret (a path to one is not)."""
    words = re.split(r"[-_.]", key.lower())
    return words[-1] not in _PATH_WORDS and any(w in _SECRET_WORDS for w in words)


def redact(key: str, value: Any) -> Any:
    """``value`` fit to print under ``key``: whole secrets masked, passwords inside URLs masked."""
    if is_secret_key(key) and value not in (None, "", [], ()):
        return MASK
    return _redact_value(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it masked: ``postgresql://user:***@host/db``;
    libpq's ``password=`` parameter too, in a URL's query or a conninfo string."""
    if _URL.search(text):
        return _URL.sub(lambda m: _redact_one(m.group(0)), text)
    return _CONNINFO_SECRET.sub(lambda m: m.group(1) + MASK, text)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # unparseable: may still hold a password
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def url_has_password(url: str) -> bool:
    """Whether a registry URL carries a password (user info or a ``password`` parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        return True
    return any(name.lower() in _SECRET_PARAMS for name, _ in parse_qsl(parts.query, keep_blank_values=True))


def with_password(url: str, password: bytes) -> str:
    """``url`` with ``password`` in its user info: ``postgresql://user:PASSWORD@host/db``.

    User info rather than libpq's ``password`` parameter because SQLAlchemy hides
    only the former when it renders a URL into an error. A URL naming no user (a
    service file's, or libpq's default) gets an empty one, which is not passed on.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in _POSTGRES_SCHEMES or not sep:
        raise ConfigError("a registry password file is for postgresql:// registries; this registry URL is not one")
    if url_has_password(url):
        raise ConfigError("the registry URL carries a password and a password file is given; keep only the file")
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the registry password file is not UTF-8 text") from None
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    user = userinfo if at else ""
    return f"{scheme}://{user}:{quote(text, safe='')}@{hostport}{rest[end:]}"
