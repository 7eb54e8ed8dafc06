"""Signing and verifying instance identity documents: pure, no files."""

from __future__ import annotations

import base64
import datetime
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from meta169.errors import ValidationError
from meta169.identity import IdentityKey, RsaIdentitySigner, make_identity_key, verify_document
from meta169.render.options import IdentitySigner

DOCUMENT = json.dumps(
    {"accountId": "000000000000", "instanceId": "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10", "region": "RegionOne"},
    indent=2,
    separators=(",", " : "),
).encode()
# DER of OBJECT IDENTIFIER 1.2.840.113549.1.7.2 (id-signedData), RFC 5652 section 5.1.
SIGNED_DATA_OID = bytes.fromhex("06092a864886f70d010702")


@pytest.fixture(scope="module")
def key() -> IdentityKey:
    return make_identity_key("123456789012")


@pytest.fixture(scope="module")
def other_key() -> IdentityKey:
    return make_identity_key("999999999999")


@pytest.fixture(scope="module")
def signed(key: IdentityKey) -> tuple[str, str, str]:
    return RsaIdentitySigner(key)(DOCUMENT)


def _der(text: str) -> bytes:
    return base64.b64decode("".join(text.split()))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _pkcs7(key: IdentityKey, document: bytes, *options: pkcs7.PKCS7Options) -> str:
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(document)
        .add_signer(key.certificate, key.private_key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, *options])
    )
    return _b64(der)


def test_identity_signer_implements_render_protocol(key: IdentityKey) -> None:
    assert isinstance(RsaIdentitySigner(key), IdentitySigner)


def test_identity_signer_round_trip_verifies_every_form(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    signature, p7, rsa2048 = signed
    result = verify_document(DOCUMENT, signature, p7, key.cert_pem, rsa2048_b64=rsa2048)
    assert result.valid
    assert [(c.name, c.ok) for c in result.checks] == [("signature", True), ("pkcs7", True), ("rsa2048", True)]
    assert "SHA-256" in result.checks[1].detail
    assert result.document == DOCUMENT and not result.document_from_pkcs7


def test_identity_signer_pkcs7_is_der_signed_data_carrying_the_document(signed: tuple[str, str, str]) -> None:
    der = _der(signed[1])
    assert der[0] == 0x30  # ContentInfo SEQUENCE
    assert SIGNED_DATA_OID in der[:20]
    # attached, byte for byte: OCTET STRING (tag 4) of the exact document, no CRLF canonicalization
    assert bytes([0x04, len(DOCUMENT)]) + DOCUMENT in der
    assert b"\r\n" not in der


def test_identity_signer_bodies_are_wrapped_base64_without_armour(signed: tuple[str, str, str]) -> None:
    signature, p7, rsa2048 = signed
    for body in signed:
        lines = body.split("\n")
        assert all(0 < len(line) <= 64 for line in lines)
        assert not body.endswith("\n") and "-----" not in body
        base64.b64decode("".join(lines), validate=True)
    assert len(_der(signature)) == 256  # one RSA-2048 block
    assert p7 == rsa2048  # both are SHA-256 RSA SignedData: one signature, served twice


def test_identity_signer_signature_is_deterministic_pkcs1v15(key: IdentityKey) -> None:
    signer = RsaIdentitySigner(key)
    assert signer(DOCUMENT)[0] == signer(DOCUMENT)[0]
    assert signer(DOCUMENT)[0] != signer(DOCUMENT + b" ")[0]


@pytest.mark.parametrize(
    "tampered",
    [
        DOCUMENT + b"\n",
        DOCUMENT.replace(b"000000000000", b"000000000001"),
        DOCUMENT.replace(b"  ", b" ", 1),
        b"",
    ],
    ids=["trailing-newline", "account", "whitespace", "empty"],
)
def test_identity_verify_tampered_document_fails(
    key: IdentityKey, signed: tuple[str, str, str], tampered: bytes
) -> None:
    assert tampered != DOCUMENT
    signature, p7, rsa2048 = signed
    result = verify_document(tampered, signature, p7, key.cert_pem, rsa2048_b64=rsa2048)
    assert not result.valid
    assert [c.ok for c in result.checks] == [False, False, False]
    assert "different document" in result.checks[1].detail


def test_identity_verify_wrong_cert_fails(other_key: IdentityKey, signed: tuple[str, str, str]) -> None:
    signature, p7, _ = signed
    result = verify_document(DOCUMENT, signature, p7, other_key.cert_pem)
    assert not result.valid
    assert [c.ok for c in result.checks] == [False, False]
    assert "does not verify" in result.checks[1].detail


def test_identity_verify_pkcs7_by_another_key_fails(key: IdentityKey, other_key: IdentityKey) -> None:
    forged = RsaIdentitySigner(other_key)(DOCUMENT)[1]
    assert not verify_document(DOCUMENT, None, forged, key.cert_pem).valid
    assert not verify_document(None, None, forged, key.cert_pem).valid


def test_identity_verify_takes_the_document_from_the_pkcs7(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    signature, p7, _ = signed
    result = verify_document(None, signature, p7, key.cert_pem)
    assert result.valid and result.document_from_pkcs7
    assert result.document == DOCUMENT


def test_identity_verify_content_swapped_inside_pkcs7_fails(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    swapped_doc = DOCUMENT.replace(b"000000000000", b"666666666666")
    der = _der(signed[1]).replace(DOCUMENT, swapped_doc)  # same length, DER stays well-formed
    assert swapped_doc != DOCUMENT and swapped_doc in der
    result = verify_document(None, None, _b64(der), key.cert_pem)
    assert result.document == swapped_doc
    assert not result.valid
    assert "messageDigest" in result.checks[0].detail


def test_identity_verify_flipped_signature_bit_fails(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    raw = bytearray(_der(signed[0]))
    raw[100] ^= 0x01
    result = verify_document(DOCUMENT, _b64(bytes(raw)), None, key.cert_pem)
    assert not result.valid
    assert "does not match" in result.checks[0].detail
    der = bytearray(_der(signed[1]))
    der[-10] ^= 0x01  # inside the signature OCTET STRING, the last field
    assert not verify_document(DOCUMENT, None, _b64(bytes(der)), key.cert_pem).valid


def test_identity_verify_accepts_pem_armour(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    armoured = f"-----BEGIN PKCS7-----\n{signed[1]}\n-----END PKCS7-----\n"
    assert verify_document(DOCUMENT, None, armoured, key.cert_pem).valid


def test_identity_verify_without_signed_attributes(key: IdentityKey) -> None:
    bare = _pkcs7(key, DOCUMENT, pkcs7.PKCS7Options.NoAttributes, pkcs7.PKCS7Options.NoCerts)
    assert verify_document(DOCUMENT, None, bare, key.cert_pem).valid
    der = _der(bare).replace(DOCUMENT, DOCUMENT.replace(b"Region", b"Regiox"))
    assert not verify_document(None, None, _b64(der), key.cert_pem).valid


def test_identity_verify_detached_pkcs7_needs_the_document(key: IdentityKey) -> None:
    detached = _pkcs7(key, DOCUMENT, pkcs7.PKCS7Options.DetachedSignature)
    assert verify_document(DOCUMENT, None, detached, key.cert_pem).valid
    assert not verify_document(DOCUMENT + b" ", None, detached, key.cert_pem).valid
    alone = verify_document(None, None, detached, key.cert_pem)
    assert not alone.valid and "no document" in alone.checks[0].detail


def test_identity_verify_ignores_an_embedded_certificate(key: IdentityKey, other_key: IdentityKey) -> None:
    # The pkcs7 brings its signer's certificate; only the operator's one counts.
    with_cert = _pkcs7(other_key, DOCUMENT)
    assert not verify_document(DOCUMENT, None, with_cert, key.cert_pem).valid
    assert verify_document(DOCUMENT, None, with_cert, other_key.cert_pem).valid


def test_identity_verify_ec_certificate() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(DOCUMENT)
        .add_signer(cert, private, hashes.SHA384())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    signature = private.sign(DOCUMENT, ec.ECDSA(hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    result = verify_document(DOCUMENT, _b64(signature), _b64(der), cert_pem)
    assert result.valid, result.checks
    assert "SHA-384" in result.checks[1].detail


def _length_prefixed(tag: int, value: bytes) -> bytes:
    assert len(value) < 0x80
    return bytes([tag, len(value)]) + value


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not base64 at all!", "not base64"),
        ("", "expected type"),
        (_b64(b"\x30\x82\x01\x00\x02\x01\x00"), "truncated"),
        (_b64(b"\x30\x80\x00\x00"), "indefinite length"),
        (_b64(b"\x30\x85\x01\x00\x00\x00\x00"), "bad length"),
        (_b64(b"\x1f\x01\x00"), "high tag"),
        (_b64(_length_prefixed(0x30, bytes.fromhex("06092a864886f70d010701") + b"\xa0\x00")), "not PKCS#7 SignedData"),
        (_b64(_length_prefixed(0x30, SIGNED_DATA_OID)), "content missing"),
        (_b64(_length_prefixed(0x30, SIGNED_DATA_OID + b"\xa0\x02\x30\x00")), "version missing"),
        (_b64(b"\x30\x00" * 2), "expected type"),
    ],
    ids=[
        "base64",
        "empty",
        "truncated",
        "ber",
        "long-length",
        "high-tag",
        "data-not-signed",
        "no-content",
        "empty-signed-data",
        "two-elements",
    ],
)
def test_identity_verify_malformed_pkcs7_is_reported_not_raised(key: IdentityKey, body: str, reason: str) -> None:
    result = verify_document(DOCUMENT, None, body, key.cert_pem)
    assert not result.valid
    (check,) = result.checks
    assert check.detail.startswith("malformed:") and reason in check.detail, check.detail


def test_identity_verify_truncated_real_pkcs7_fails(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    der = _der(signed[1])
    for cut in (1, 2, 40, len(der) // 2, len(der) - 1):
        assert not verify_document(DOCUMENT, None, _b64(der[:cut]), key.cert_pem).valid


def test_identity_verify_malformed_signature_is_reported(key: IdentityKey) -> None:
    result = verify_document(DOCUMENT, "@@@", None, key.cert_pem)
    assert not result.valid and result.checks[0].detail == "malformed: not base64"


def test_identity_verify_rejects_unusable_inputs(key: IdentityKey, signed: tuple[str, str, str]) -> None:
    with pytest.raises(ValidationError, match="not a PEM"):
        verify_document(DOCUMENT, signed[0], None, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="nothing to verify"):
        verify_document(DOCUMENT, None, None, key.cert_pem)
    with pytest.raises(ValidationError, match="no document"):
        verify_document(None, signed[0], None, key.cert_pem)
