"""The operator's identity key: make it, store it, load it, and sign documents with it.

Owns the RSA key and self-signed certificate that sign EC2 instance identity
documents, their files on disk, and the three signatures AWS serves beside the
document. Knows nothing about HTTP or the registry: ``render`` calls the signer with
the document bytes.

What is served (EC2 user guide, "Instance identity documents" / "Verify the instance
identity document"):

- ``signature``: base64 of the RSA PKCS#1 v1.5 SHA-256 signature over the document
  bytes, checked with ``openssl dgst -sha256 -verify``.
- ``pkcs7``: base64 DER PKCS#7 SignedData with the document attached, no PEM armour,
  checked with ``openssl smime -verify``. AWS signs this one with DSA and SHA-1, a
  legacy choice; we sign it with the same RSA key and SHA-256.
- ``rsa2048``: the same PKCS#7 SignedData (AWS: RSA-2048 and SHA-256). Since ours
  already is exactly that, both names serve one signature.
"""

from __future__ import annotations

import base64
import datetime
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from meta169.errors import ConfigError, ValidationError
from meta169.secretfile import read_secret_file

KEY_FILE = "identity-key.pem"
CERT_FILE = "identity-cert.pem"
KEY_SIZES = (2048, 3072)
CERT_VALIDITY = datetime.timedelta(days=3650)
DEFAULT_ACCOUNT = "000000000000"
# PEM's line width (RFC 7468 section 2); AWS wraps these bodies the same way, and
# OpenSSL's PEM reader needs short lines once a guest adds the BEGIN/END armour.
BASE64_WIDTH = 64

# Attached content (AWS's pkcs7 carries the document), the exact bytes (Binary: no
# MIME CRLF canonicalization, which would change what the digest covers), no S/MIME
# capabilities attribute (meaningless here) and no embedded certificate: a verifier
# must bring the operator's certificate, as with AWS's -certfile.
_PKCS7_OPTIONS = (
    pkcs7.PKCS7Options.Binary,
    pkcs7.PKCS7Options.NoCapabilities,
    pkcs7.PKCS7Options.NoCerts,
)


@dataclass(frozen=True, slots=True)
class IdentityKey:
    """An RSA private key and the self-signed certificate of its public half."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise ValidationError("the identity key must be an RSA key")
        if self.private_key.key_size not in KEY_SIZES:
            raise ValidationError(f"the identity key has {self.private_key.key_size} bits; use one of {KEY_SIZES}")
        if self.certificate.public_key() != self.private_key.public_key():
            raise ValidationError("the certificate does not belong to the identity key")

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def default_identity_dir(*, euid: int, home: Path, xdg_data_home: str | None = None) -> Path:
    """Where the identity key lives when no directory is given.

    root: /var/lib/meta169/identity; anyone else: $XDG_DATA_HOME/meta169/identity
    (~/.local/share when unset or relative, as the XDG Base Directory spec says), the
    same rule as the default registry. The caller reads the environment.
    """
    if euid == 0:
        base = Path("/var/lib")
    elif xdg_data_home and Path(xdg_data_home).is_absolute():
        base = Path(xdg_data_home)
    else:
        base = home / ".local" / "share"
    return base / "meta169" / "identity"


def make_identity_key(
    account_id: str = DEFAULT_ACCOUNT,
    *,
    bits: int = 2048,
    now: datetime.datetime | None = None,
) -> IdentityKey:
    """A fresh key and a certificate valid for ten years from ``now``."""
    if bits not in KEY_SIZES:
        raise ValidationError(f"key size {bits}: use one of {KEY_SIZES}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    start = now if now is not None else datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meta169"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meta169 instance identity {account_id}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour of slack for guests whose clock is behind the host's.
        .not_valid_before(start - datetime.timedelta(hours=1))
        .not_valid_after(start + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IdentityKey(key, cert)


def generate_identity_key(
    directory: Path,
    *,
    account_id: str = DEFAULT_ACCOUNT,
    bits: int = 2048,
) -> IdentityKey:
    """Make a key and certificate and write them to ``directory``.

    The key goes to ``identity-key.pem`` (mode 0600), the certificate to
    ``identity-cert.pem`` (0644). Existing files are never overwritten.
    """
    key = make_identity_key(account_id, bits=bits)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    for path in (key_path, cert_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists; remove it to make a new identity key")
    key_pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new(key_path, key_pem, 0o600)
        try:
            _write_new(cert_path, key.cert_pem, 0o644)
        except OSError:
            key_path.unlink()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot write the identity key to {directory}: {exc.strerror}") from exc
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never follow or replace a file someone put there; the mode is set at
    # creation, so the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # the umask may have narrowed the certificate's mode


def load_identity_certificate(directory: Path) -> x509.Certificate:
    """The certificate in ``directory`` (no access to the private key needed)."""
    path = directory / CERT_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror} (make one with: meta169 identity init --dir {directory})"
        ) from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate") from exc


def load_identity_key(directory: Path) -> IdentityKey:
    """Load the key and certificate written by :func:`generate_identity_key`.

    The key file must be readable by its owner only, like every secret meta169
    reads (:func:`meta169.secretfile.read_secret_file`); errors are :class:`ConfigError`.
    """
    key_path = directory / KEY_FILE
    key_pem = read_secret_file(key_path, what="identity key")
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:  # cryptography's signal for an encrypted key
        raise ConfigError(f"identity key: {key_path} is encrypted; store it unencrypted (mode 0600)") from exc
    except ValueError as exc:
        raise ConfigError(f"identity key: {key_path} is not a PEM private key") from exc
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ConfigError(f"identity key: {key_path} is not an RSA key")
    certificate = load_identity_certificate(directory)
    try:
        return IdentityKey(private_key, certificate)
    except ValidationError as exc:
        raise ConfigError(f"identity key in {directory}: {exc}") from exc


def wrap_base64(raw: bytes) -> str:
    """Base64 in lines of 64 characters, no trailing newline (as AWS serves them)."""
    return "\n".join(textwrap.wrap(base64.b64encode(raw).decode("ascii"), BASE64_WIDTH))


@dataclass(frozen=True, slots=True)
class RsaIdentitySigner:
    """Signs identity documents with an :class:`IdentityKey`.

    Implements :class:`meta169.render.options.IdentitySigner`: returns
    ``(signature, pkcs7, rsa2048)`` as base64 text.
    """

    key: IdentityKey

    def __call__(self, document: bytes, /) -> tuple[str, str, str]:
        private_key = self.key.private_key
        signature = private_key.sign(document, padding.PKCS1v15(), hashes.SHA256())
        signed_data = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document)
            .add_signer(self.key.certificate, private_key, hashes.SHA256(), rsa_padding=padding.PKCS1v15())
            .sign(serialization.Encoding.DER, _PKCS7_OPTIONS)
        )
        pkcs7_b64 = wrap_base64(signed_data)
        return wrap_base64(signature), pkcs7_b64, pkcs7_b64
