"""Check an instance identity document against the operator's certificate.

A pure function of bytes: no files, no network. Verifies the ``signature`` form
(PKCS#1 v1.5 over the document) and the ``pkcs7``/``rsa2048`` form (CMS SignedData,
RFC 5652) that meta169 serves, and also AWS's legacy ``pkcs7`` (DSA with SHA-1).

cryptography can build PKCS#7 but not verify it, so this module reads the few DER
fields needed (content, digest algorithm, signed attributes, signature) and leaves
every cryptographic step (digest, signature check) to cryptography.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa

from meta169.errors import ValidationError

# Inputs are a few KiB; refuse anything absurd before decoding it.
MAX_INPUT = 1 << 20

# DER tags (X.690 section 8): universal types and the context tags RFC 5652 uses.
_INTEGER, _OCTET_STRING, _OID, _SEQUENCE, _SET = 0x02, 0x04, 0x06, 0x30, 0x31
_CTX0, _CTX1 = 0xA0, 0xA1

# RFC 5652 section 3 / 5.4 and RFC 5911 OIDs.
_ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_ID_DATA = "1.2.840.113549.1.7.1"
_ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
# SHA-1 only to read AWS's legacy pkcs7; meta169 signs with SHA-256.
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.14.3.2.26": hashes.SHA1,
    "2.16.840.1.101.3.4.2.4": hashes.SHA224,
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}


@dataclass(frozen=True, slots=True)
class Check:
    """The verdict on one signature form (``signature``, ``pkcs7`` or ``rsa2048``)."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """All checks made, and the document they were made against."""

    document: bytes
    checks: tuple[Check, ...]
    document_from_pkcs7: bool = False

    @property
    def valid(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)


def verify_document(
    document: bytes | None,
    signature_b64: str | None,
    pkcs7_b64: str | None,
    cert_pem: bytes,
    *,
    rsa2048_b64: str | None = None,
) -> VerifyResult:
    """Verify the identity document with each signature form given.

    ``document`` is the exact bytes served at ``instance-identity/document``; when
    None it is taken from the (attached) PKCS#7 content. Every check must pass for
    :attr:`VerifyResult.valid`. Raises :class:`ValidationError` for a certificate
    that is not PEM, or when there is nothing to verify.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValidationError("the certificate is not a PEM X.509 certificate") from exc
    envelopes = [(name, text) for name, text in (("pkcs7", pkcs7_b64), ("rsa2048", rsa2048_b64)) if text is not None]
    if signature_b64 is None and not envelopes:
        raise ValidationError("nothing to verify: give a signature, a pkcs7 or an rsa2048")
    if document is None and not envelopes:
        raise ValidationError("no document: give the document (only a pkcs7 or rsa2048 carries one)")
    parsed: list[tuple[str, _SignedData | _Malformed]] = []
    for name, text in envelopes:
        try:
            parsed.append((name, _parse_signed_data(_unarmour(text))))
        except _Malformed as exc:
            parsed.append((name, exc))
    from_pkcs7 = False
    if document is None:
        carried = [p.content for _, p in parsed if isinstance(p, _SignedData) and p.content is not None]
        if carried:
            document, from_pkcs7 = carried[0], True
    checks: list[Check] = []
    subject = cert.subject.rfc4514_string()
    if signature_b64 is not None:
        checks.append(_check_signature(document, signature_b64, cert, subject))
    for name, item in parsed:
        if isinstance(item, _Malformed):
            checks.append(Check(name, False, f"malformed: {item}"))
        else:
            checks.append(_check_signed_data(name, item, document, cert, subject))
    return VerifyResult(document if document is not None else b"", tuple(checks), from_pkcs7)


def _check_signature(document: bytes | None, text: str, cert: x509.Certificate, subject: str) -> Check:
    if document is None:
        return Check("signature", False, "no document to check it against")
    try:
        raw = _b64decode(text)
    except _Malformed as exc:
        return Check("signature", False, f"malformed: {exc}")
    if not _signature_valid(cert.public_key(), raw, document, hashes.SHA256()):
        return Check("signature", False, f"does not match this document and the key of {subject}")
    return Check("signature", True, f"SHA-256 signature by {subject} is valid")


def _check_signed_data(
    name: str, sd: _SignedData, document: bytes | None, cert: x509.Certificate, subject: str
) -> Check:
    content = sd.content if sd.content is not None else document
    if content is None:
        return Check(name, False, "detached signature and no document to check it against")
    if document is not None and content != document:
        return Check(name, False, "carries a different document than the one given")
    reasons = []
    for signer in sd.signers:
        reason = _signer_problem(signer, content, cert)
        if reason is None:
            algorithm = signer.digest.name.upper().replace("SHA", "SHA-")
            return Check(name, True, f"PKCS#7 SignedData ({algorithm}) by {subject} is valid")
        reasons.append(reason)
    return Check(name, False, "; ".join(reasons) or "no signer")


def _signer_problem(signer: _Signer, content: bytes, cert: x509.Certificate) -> str | None:
    if signer.signed_attrs is None:
        signed = content
    else:
        # RFC 5652 section 5.4: with signed attributes the signature covers their
        # DER encoding as a SET OF (tag 0x31), not the [0] IMPLICIT tag they carry,
        # and the messageDigest attribute binds the content.
        if signer.content_type != _ID_DATA:
            return "the contentType attribute is not id-data"
        digest = hashes.Hash(signer.digest)
        digest.update(content)
        if signer.message_digest != digest.finalize():
            return "the messageDigest attribute does not match the content"
        signed = bytes([_SET]) + signer.signed_attrs[1:]
    if not _signature_valid(cert.public_key(), signer.signature, signed, signer.digest):
        return f"the signature does not verify with the key of {cert.subject.rfc4514_string()}"
    return None


def _signature_valid(public_key: object, signature: bytes, data: bytes, digest: hashes.HashAlgorithm) -> bool:
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(digest))
        elif isinstance(public_key, dsa.DSAPublicKey):
            public_key.verify(signature, data, digest)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# -- reading the SignedData ---------------------------------------------------------------------


class _Malformed(Exception):
    """The input is not the structure expected; the message says where."""


@dataclass(frozen=True, slots=True)
class _Signer:
    digest: hashes.HashAlgorithm
    signed_attrs: bytes | None  # the whole [0] element as received
    content_type: str | None
    message_digest: bytes | None
    signature: bytes


@dataclass(frozen=True, slots=True)
class _SignedData:
    content: bytes | None  # None: a detached signature
    signers: tuple[_Signer, ...]


@dataclass(frozen=True, slots=True)
class _Element:
    tag: int
    der: bytes  # tag, length and value
    value: bytes


def _unarmour(text: str) -> bytes:
    # Accept the body as served, or with the BEGIN/END PKCS7 lines a guest adds for openssl.
    lines = [line for line in text.splitlines() if not line.startswith("-----")]
    return _b64decode("".join(lines))


def _b64decode(text: str) -> bytes:
    if len(text) > MAX_INPUT:
        raise _Malformed("too large")
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Malformed("not base64") from exc


def _elements(data: bytes) -> list[_Element]:
    """The DER elements that exactly fill ``data`` (X.690 section 8.1, definite lengths)."""
    out: list[_Element] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise _Malformed("truncated")
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise _Malformed("unexpected high tag number")
        start = pos + 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise _Malformed("indefinite length (BER, not DER)")
        else:
            count = first & 0x7F
            if count > 4 or start + count > len(data):
                raise _Malformed("bad length")
            length = int.from_bytes(data[start : start + count], "big")
            start += count
        end = start + length
        if end > len(data):
            raise _Malformed("truncated")
        out.append(_Element(tag, data[pos:end], data[start:end]))
        pos = end
    return out


class _Fields:
    """Reads the fields of one SEQUENCE in order."""

    def __init__(self, element: _Element, what: str) -> None:
        if element.tag not in (_SEQUENCE, _SET):
            raise _Malformed(f"{what} is not a SEQUENCE")
        self._items = _elements(element.value)
        self._what = what
        self._at = 0

    def take(self, tag: int, name: str) -> _Element:
        item = self.optional(tag)
        if item is None:
            raise _Malformed(f"{self._what}: {name} missing or misplaced")
        return item

    def optional(self, tag: int) -> _Element | None:
        if self._at < len(self._items) and self._items[self._at].tag == tag:
            self._at += 1
            return self._items[self._at - 1]
        return None

    def done(self) -> None:
        if self._at != len(self._items):
            raise _Malformed(f"{self._what}: unexpected trailing fields")


def _single(data: bytes, tag: int, what: str) -> _Element:
    items = _elements(data)
    if len(items) != 1 or items[0].tag != tag:
        raise _Malformed(f"{what} is not one element of the expected type")
    return items[0]


def _decode_oid(value: bytes) -> str:
    """Dotted text of a DER OBJECT IDENTIFIER's contents (X.690 section 8.19)."""
    if not value or value[-1] & 0x80:
        raise _Malformed("bad object identifier")
    arcs: list[int] = []
    current = 0
    for byte in value:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    top = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (top, arcs[0] - 40 * top, *arcs[1:]))


def _parse_signed_data(der: bytes) -> _SignedData:
    # ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT content }   (RFC 5652 section 3)
    info = _Fields(_single(der, _SEQUENCE, "ContentInfo"), "ContentInfo")
    if _decode_oid(info.take(_OID, "contentType").value) != _ID_SIGNED_DATA:
        raise _Malformed("not PKCS#7 SignedData")
    explicit = info.take(_CTX0, "content")
    info.done()
    # SignedData ::= SEQUENCE { version, digestAlgorithms SET, encapContentInfo,
    #   [0] certificates OPTIONAL, [1] crls OPTIONAL, signerInfos SET }   (section 5.1)
    sd = _Fields(_single(explicit.value, _SEQUENCE, "SignedData"), "SignedData")
    sd.take(_INTEGER, "version")
    sd.take(_SET, "digestAlgorithms")
    encap = _Fields(sd.take(_SEQUENCE, "encapContentInfo"), "encapContentInfo")
    if _decode_oid(encap.take(_OID, "eContentType").value) != _ID_DATA:
        raise _Malformed("the signed content is not id-data")
    wrapper = encap.optional(_CTX0)
    encap.done()
    content = None if wrapper is None else _single(wrapper.value, _OCTET_STRING, "eContent").value
    sd.optional(_CTX0)
    sd.optional(_CTX1)
    signer_set = sd.take(_SET, "signerInfos")
    sd.done()
    signers = tuple(_parse_signer(item) for item in _elements(signer_set.value))
    if not signers:
        raise _Malformed("no signerInfos")
    return _SignedData(content, signers)


def _parse_signer(element: _Element) -> _Signer:
    # SignerInfo ::= SEQUENCE { version, sid, digestAlgorithm, [0] signedAttrs OPTIONAL,
    #   signatureAlgorithm, signature OCTET STRING, [1] unsignedAttrs OPTIONAL }   (section 5.3)
    fields = _Fields(element, "SignerInfo")
    fields.take(_INTEGER, "version")
    if fields.optional(0x80) is None:  # not [0] subjectKeyIdentifier: issuerAndSerialNumber
        fields.take(_SEQUENCE, "sid")
    algorithm = _Fields(fields.take(_SEQUENCE, "digestAlgorithm"), "digestAlgorithm")
    oid = _decode_oid(algorithm.take(_OID, "algorithm").value)
    digest_type = _DIGESTS.get(oid)
    if digest_type is None:
        raise _Malformed(f"unsupported digest algorithm {oid}")
    attrs = fields.optional(_CTX0)
    fields.take(_SEQUENCE, "signatureAlgorithm")
    signature = fields.take(_OCTET_STRING, "signature").value
    fields.optional(_CTX1)
    fields.done()
    content_type = message_digest = None
    if attrs is not None:
        values = _attributes(attrs)
        content_type = _decode_oid(_only_value(values, _ATTR_CONTENT_TYPE, _OID))
        message_digest = _only_value(values, _ATTR_MESSAGE_DIGEST, _OCTET_STRING)
    return _Signer(digest_type(), None if attrs is None else attrs.der, content_type, message_digest, signature)


def _attributes(attrs: _Element) -> dict[str, Sequence[_Element]]:
    # Attribute ::= SEQUENCE { attrType OID, attrValues SET OF ANY }; RFC 5652 section
    # 5.3 forbids repeating a type that must have one value, so a repeat is an error.
    found: dict[str, Sequence[_Element]] = {}
    for item in _elements(attrs.value):
        attr = _Fields(item, "Attribute")
        oid = _decode_oid(attr.take(_OID, "attrType").value)
        values = _elements(attr.take(_SET, "attrValues").value)
        attr.done()
        if oid in found:
            raise _Malformed(f"attribute {oid} appears twice")
        found[oid] = values
    return found


def _only_value(values: dict[str, Sequence[_Element]], oid: str, tag: int) -> bytes:
    items = values.get(oid)
    if items is None or len(items) != 1 or items[0].tag != tag:
        raise _Malformed(f"attribute {oid} missing or not one value")
    return items[0].value
