"""What rendering needs beyond the instance: operator vendor data and identity signing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from meta169.errors import ValidationError


@runtime_checkable
class IdentitySigner(Protocol):
    """Signs an EC2 instance identity document.

    Given the exact document bytes served at ``dynamic/instance-identity/document``,
    returns ``(signature, pkcs7, rsa2048)``, each base64 text as AWS serves it at
    ``signature``, ``pkcs7`` and ``rsa2048``.
    """

    def __call__(self, document: bytes, /) -> tuple[str, str, str]: ...


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Deployment-wide inputs of :func:`meta169.render.build_site`.

    ``static_vendor_data`` is the operator's vendor data; an instance's own
    ``vendor_data`` keys override it in ``vendor_data.json``. ``vendor_data2_dynamic``
    maps a provider name to the JSON already fetched for it. ``account_id`` goes in
    the EC2 identity document. Without ``identity_signer`` the identity document is
    served unsigned and ``signature``/``pkcs7``/``rsa2048`` are not listed.
    """

    static_vendor_data: Mapping[str, Any] = field(default_factory=dict)
    vendor_data2_dynamic: Mapping[str, Any] = field(default_factory=dict)
    account_id: str = "000000000000"
    identity_signer: IdentitySigner | None = None

    def __post_init__(self) -> None:
        for name in ("static_vendor_data", "vendor_data2_dynamic"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValidationError(f"{name} must be a JSON object (string keys)")
        if not self.account_id or "\n" in self.account_id:
            raise ValidationError("account_id must be a non-empty single line")
