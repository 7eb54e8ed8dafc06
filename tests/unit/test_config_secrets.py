"""Secrets in configuration values: what is masked for display, and the registry password."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from meta169.config.secrets import MASK, is_secret_key, redact, redact_url, url_has_password, with_password
from meta169.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("metrics-token", True),
        ("neutron-secret", True),
        ("signing-key", True),
        ("password-file", False),
        ("secret-file", False),
        ("token-key-file", False),
        ("identity-key-dir", False),
        ("http-tokens", False),
        ("url", False),
        ("listen", False),
    ],
)
def test_config_secrets_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://meta169:hunter2@db/meta169", "postgresql://meta169:***@db/meta169"),
        (
            "postgresql://meta169:p%40ss@db:5432/meta169?sslmode=require",
            "postgresql://meta169:***@db:5432/meta169?sslmode=require",
        ),
        (
            "postgresql://meta169@db/meta169?password=x&sslmode=require",
            "postgresql://meta169@db/meta169?password=***&sslmode=require",
        ),
        ("postgresql://:pw@/?service=meta169", "postgresql://:***@/?service=meta169"),
        ("postgresql://meta169@db/meta169", "postgresql://meta169@db/meta169"),
        ("postgresql:///?service=meta169", "postgresql:///?service=meta169"),
        ("sqlite:///var/lib/meta169/registry.db", "sqlite:///var/lib/meta169/registry.db"),
        ("host=db user=meta169 password=hunter2 dbname=x", "host=db user=meta169 password=*** dbname=x"),
        ("unix:/run/meta169/serve.sock=proxy", "unix:/run/meta169/serve.sock=proxy"),
    ],
)
def test_config_secrets_redact_url(text: str, shown: str) -> None:
    assert redact_url(text) == shown
    assert "hunter2" not in redact("url", text)


def test_config_secrets_redact_whole_values_and_lists() -> None:
    assert redact("neutron-secret", "abc") == MASK
    assert redact("neutron-secret", None) is None
    assert redact("secret-file", "/etc/meta169/x.secret") == "/etc/meta169/x.secret"
    assert redact("vendordata-dynamic", ["a=http://u:p@h/x"]) == ["a=http://u:***@h/x"]
    assert redact("workers", 4) == 4


@pytest.mark.parametrize(
    ("url", "has"),
    [
        ("postgresql://u:p@h/d", True),
        ("postgresql://u:@h/d", True),
        ("postgresql://u@h/d?password=p", True),
        ("postgresql://u@h/d", False),
        ("postgresql:///?service=s", False),
        ("sqlite:///x.db", False),
    ],
)
def test_config_secrets_url_has_password(url: str, has: bool) -> None:
    assert url_has_password(url) is has


@pytest.mark.parametrize(
    ("url", "joined"),
    [
        ("postgresql://meta169@db/meta169", "postgresql://meta169:{}@db/meta169"),
        (
            "postgresql+psycopg://meta169@db:5432/m?sslmode=require",
            "postgresql+psycopg://meta169:{}@db:5432/m?sslmode=require",
        ),
        ("postgresql://db/meta169", "postgresql://:{}@db/meta169"),
        ("postgresql:///?service=meta169", "postgresql://:{}@/?service=meta169"),
    ],
)
def test_config_secrets_with_password_joins_into_user_info(url: str, joined: str) -> None:
    password = "p@ss:w/rd+ %é"
    out = with_password(url, password.encode())
    assert out == joined.format("p%40ss%3Aw%2Frd%2B%20%25%C3%A9")
    # SQLAlchemy reads back the exact password, and hides it when it renders the URL.
    parsed = sa.make_url(out)
    assert parsed.password == password
    assert password not in parsed.render_as_string(hide_password=True)
    assert url_has_password(out)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///var/lib/meta169/registry.db", "for postgresql:// registries"),
        ("memory://", "for postgresql:// registries"),
        ("postgresql://u:inline@h/d", "carries a password and a password file"),
    ],
)
def test_config_secrets_with_password_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_password(url, b"0123456789abcdef")


def test_config_secrets_with_password_needs_utf8() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        with_password("postgresql://u@h/d", b"\xff\xfe0123456789abcdef")
