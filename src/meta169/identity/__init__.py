"""Signed EC2 instance identity documents: the operator's key, the signer, the verifier.

Owns the identity key and certificate files, signing the document bytes that
``render`` hands over, and verifying a document against the certificate. Knows
nothing about HTTP, the registry or how a document is laid out.
"""

from meta169.identity.signer import (
    CERT_FILE,
    KEY_FILE,
    IdentityKey,
    RsaIdentitySigner,
    default_identity_dir,
    generate_identity_key,
    load_identity_certificate,
    load_identity_key,
    make_identity_key,
)
from meta169.identity.verify import Check, VerifyResult, verify_document

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "Check",
    "IdentityKey",
    "RsaIdentitySigner",
    "VerifyResult",
    "default_identity_dir",
    "generate_identity_key",
    "load_identity_certificate",
    "load_identity_key",
    "make_identity_key",
    "verify_document",
]
