"""Dynamic vendor data: ask the operator's services about an instance (Nova's
DynamicJSON provider) for ``vendor_data2.json``.

Each target is ``NAME=URL``; on a cache miss the server POSTs the instance's facts as
JSON (the body Nova sends: project-id, instance-id, image-id, user-data, hostname,
metadata, boot-roles) and files the JSON object it gets back under NAME. A target
that fails or answers garbage is left out and logged, never fatal, as with Nova's
default ``vendordata_dynamic_failure_fatal = False``
[openstack/nova api/metadata/vendordata_dynamic.py].
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meta169.errors import ConfigError
from meta169.model import Instance

log = logging.getLogger("meta169.vendordata")

MAX_REPLY = 1 << 20


@dataclass(frozen=True, slots=True)
class DynamicTarget:
    name: str
    url: str

    @classmethod
    def parse(cls, text: str) -> DynamicTarget:
        name, sep, url = text.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"--vendordata-dynamic {text!r}: expected NAME=http(s)://...")
        if name == "static":
            raise ConfigError("--vendordata-dynamic: 'static' is reserved for the static vendor data")
        return cls(name, url)


def request_body(instance: Instance) -> bytes:
    return json.dumps(
        {
            "project-id": instance.project_id,
            "instance-id": instance.uuid,
            "image-id": instance.image_id,
            "user-data": base64.b64encode(instance.user_data).decode() if instance.user_data else None,
            "hostname": instance.hostname,
            "metadata": dict(instance.metadata),
            "boot-roles": "",
        }
    ).encode()


Poster = Callable[[str, bytes, float], bytes]


def _post(url: str, body: bytes, timeout: float) -> bytes:
    req = urllib.request.Request(  # noqa: S310 - the operator configures http(s) targets only
        url, data=body, method="POST", headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        data: bytes = resp.read(MAX_REPLY + 1)
    return data


def fetch(
    targets: Sequence[DynamicTarget], instance: Instance, *, timeout: float, post: Poster = _post
) -> Mapping[str, Any]:
    """The ``{name: object}`` part of vendor_data2.json; failed targets are omitted."""
    out: dict[str, Any] = {}
    body = request_body(instance)
    for target in targets:
        try:
            raw = post(target.url, body, timeout)
            if len(raw) > MAX_REPLY:
                raise ValueError("reply larger than 1 MiB")
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("reply is not a JSON object")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            log.warning("vendor data target %s (%s) failed for %s: %s", target.name, target.url, instance.uuid, exc)
            continue
        out[target.name] = value
    return out
