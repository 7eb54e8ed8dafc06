"""The identity key on disk: generation, permissions, loading."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from meta169.errors import ConfigError, ValidationError
from meta169.identity import (
    CERT_FILE,
    KEY_FILE,
    IdentityKey,
    RsaIdentitySigner,
    default_identity_dir,
    generate_identity_key,
    load_identity_certificate,
    load_identity_key,
    make_identity_key,
    verify_document,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    generate_identity_key(tmp_path / "identity", account_id="123456789012")
    return tmp_path / "identity"


def test_identity_generate_writes_private_key_0600_and_certificate(key_dir: Path) -> None:
    assert _mode(key_dir / KEY_FILE) == 0o600
    assert _mode(key_dir / CERT_FILE) == 0o644
    assert _mode(key_dir) == 0o700
    assert (key_dir / KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_identity_generate_then_load_signs_verifiably(key_dir: Path) -> None:
    key = load_identity_key(key_dir)
    signature, p7, _ = RsaIdentitySigner(key)(b'{"instanceId" : "i-1"}')
    published = load_identity_certificate(key_dir).public_bytes(serialization.Encoding.PEM)
    assert verify_document(b'{"instanceId" : "i-1"}', signature, p7, published).valid


def test_identity_certificate_names_the_account_and_lasts_ten_years(key_dir: Path) -> None:
    cert = load_identity_certificate(key_dir)
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "meta169 instance identity 123456789012"
    assert cert.issuer == cert.subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_identity_generate_refuses_to_overwrite(key_dir: Path) -> None:
    before = (key_dir / KEY_FILE).read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_identity_key(key_dir)
    assert (key_dir / KEY_FILE).read_bytes() == before


def test_identity_generate_refuses_a_planted_certificate_file(tmp_path: Path) -> None:
    (tmp_path / CERT_FILE).write_text("someone else's")
    with pytest.raises(ConfigError, match="already exists"):
        generate_identity_key(tmp_path)
    assert not (tmp_path / KEY_FILE).exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_identity_load_key_readable_by_others_is_config_error(key_dir: Path, mode: int) -> None:
    os.chmod(key_dir / KEY_FILE, mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_identity_key(key_dir)


def test_identity_load_missing_files_is_config_error(tmp_path: Path, key_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_identity_key(tmp_path / "nowhere")
    (key_dir / CERT_FILE).unlink()
    with pytest.raises(ConfigError, match="identity init"):
        load_identity_key(key_dir)


def test_identity_load_certificate_of_another_key_is_config_error(tmp_path: Path, key_dir: Path) -> None:
    other = generate_identity_key(tmp_path / "other")
    (key_dir / CERT_FILE).write_bytes(other.cert_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        load_identity_key(key_dir)


def test_identity_load_encrypted_key_is_config_error(key_dir: Path) -> None:
    key = load_identity_key(key_dir).private_key
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (key_dir / KEY_FILE).write_bytes(encrypted)
    with pytest.raises(ConfigError, match="encrypted"):
        load_identity_key(key_dir)


def test_identity_load_garbage_is_config_error(key_dir: Path) -> None:
    (key_dir / KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_identity_key(key_dir)
    (key_dir / CERT_FILE).write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_identity_certificate(key_dir)


def test_identity_key_rejects_small_or_mismatched_keys() -> None:
    good = make_identity_key()
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValidationError, match="1024 bits"):
        IdentityKey(small, good.certificate)
    with pytest.raises(ValidationError, match="does not belong"):
        IdentityKey(make_identity_key().private_key, good.certificate)
    with pytest.raises(ValidationError, match="key size 4096"):
        make_identity_key(bits=4096)


def test_identity_key_3072_bits() -> None:
    key = make_identity_key(bits=3072)
    assert key.private_key.key_size == 3072
    signature, p7, _ = RsaIdentitySigner(key)(b"{}")
    assert verify_document(b"{}", signature, p7, key.cert_pem).valid


def test_identity_key_repr_hides_the_private_key() -> None:
    assert "private_key" not in repr(make_identity_key())


@pytest.mark.parametrize(
    ("euid", "xdg", "expected"),
    [
        (0, "/srv/data", "/var/lib/meta169/identity"),
        (1000, None, "/home/u/.local/share/meta169/identity"),
        (1000, "/srv/data", "/srv/data/meta169/identity"),
        (1000, "relative/data", "/home/u/.local/share/meta169/identity"),
        (1000, "", "/home/u/.local/share/meta169/identity"),
    ],
)
def test_identity_default_dir(euid: int, xdg: str | None, expected: str) -> None:
    assert default_identity_dir(euid=euid, home=Path("/home/u"), xdg_data_home=xdg) == Path(expected)
