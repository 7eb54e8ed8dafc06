"""Dynamic vendor data (Nova's DynamicJSON): request body, target parsing, failures."""

from __future__ import annotations

import base64
import json

import pytest

from meta169.api.vendordata import DynamicTarget, fetch, request_body
from meta169.errors import ConfigError
from meta169.model import Instance

INSTANCE = Instance(
    uuid="8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10",
    name="web-1",
    project_id="proj-a",
    image_id="img-1",
    metadata={"role": "web"},
    user_data=b"#cloud-config\n",
)


def test_vendordata_request_body_has_novas_fields() -> None:
    body = json.loads(request_body(INSTANCE))
    assert body == {
        "project-id": "proj-a",
        "instance-id": INSTANCE.uuid,
        "image-id": "img-1",
        "user-data": base64.b64encode(b"#cloud-config\n").decode(),
        "hostname": "web-1",
        "metadata": {"role": "web"},
        "boot-roles": "",
    }


@pytest.mark.parametrize("text", ["noequals", "=http://x", "name=ftp://x", "static=http://x"])
def test_vendordata_bad_target_is_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        DynamicTarget.parse(text)


def test_vendordata_failed_targets_are_left_out() -> None:
    def post(url: str, body: bytes, timeout: float) -> bytes:
        if "down" in url:
            raise OSError("connection refused")
        if "list" in url:
            return b"[1, 2]"
        if "garbage" in url:
            return b"{not json"
        return json.dumps({"url": url, "timeout": timeout}).encode()

    targets = [DynamicTarget.parse(f"{n}=http://127.0.0.1/{n}") for n in ("ok", "down", "list", "garbage")]
    assert fetch(targets, INSTANCE, timeout=1.5, post=post) == {"ok": {"url": "http://127.0.0.1/ok", "timeout": 1.5}}
