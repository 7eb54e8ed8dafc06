"""The admin API as a real process over loopback: auth, CRUD, import, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving import get, meta169_argv, run_cli

TOKEN = "admin-token-0123456789abcdef"
INSTANCE = {
    "name": "api-1",
    "project_id": "proj-a",
    "keys": [{"name": "ops", "type": "ssh", "data": "ssh-ed25519 AAAAapi ops@x"}],
    "user_data": "#cloud-config\n",
    "ports": [{"network": "net-a", "mac": "fa:16:3e:00:00:51", "ips": ["10.0.0.51"]}],
}
UUID = "51515151-5151-4151-8151-515151515151"
NETWORKS = "networks:\n  - id: net-a\n    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]\n"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[tuple[str, int], str]]:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    (tmp_path / "net.yaml").write_text(NETWORKS)
    run_cli(url, "import", str(tmp_path / "net.yaml"))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    proc = subprocess.Popen(
        # Networks only: instances come through the API, so the registry starts empty.
        meta169_argv(
            "--registry", url, "admin", "--listen", "127.0.0.1:0", "--token-file", str(token_file), "--allow-empty"
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"listening on (\S+):(\d+)", line)
    assert match, line + proc.stderr.read()
    try:
        yield (match.group(1), int(match.group(2))), url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc.stderr.close()


def _auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **(extra or {})}


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic " + TOKEN, TOKEN])
def test_admin_requires_the_token(admin: tuple[tuple[str, int], str], header: str | None) -> None:
    addr, _ = admin
    headers = {} if header is None else {"Authorization": header}
    status, resp_headers, _ = get(addr, "/v1/instances", headers=headers)
    assert status == 401
    assert resp_headers["www-authenticate"] == "Bearer"


def test_admin_health_needs_no_token(admin: tuple[tuple[str, int], str]) -> None:
    status, _, body = get(admin[0], "/v1/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_admin_put_get_list_delete_instance(admin: tuple[tuple[str, int], str]) -> None:
    addr, url = admin
    status, _, body = get(
        addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=json.dumps(INSTANCE).encode()
    )
    assert status == 201, body
    assert json.loads(body)["ports"][0]["ips"] == ["10.0.0.51"]
    again = get(addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=json.dumps(INSTANCE).encode())
    assert again[0] == 200
    listed = json.loads(get(addr, "/v1/instances", headers=_auth())[2])
    assert [i["uuid"] for i in listed] == [UUID]
    # the CLI sees what the API wrote: one registry
    assert UUID in run_cli(url, "instance", "list").stdout
    assert get(addr, f"/v1/instances/{UUID}", method="DELETE", headers=_auth())[0] == 204
    assert get(addr, f"/v1/instances/{UUID}", headers=_auth())[0] == 404


def test_admin_invalid_instance_names_the_field(admin: tuple[tuple[str, int], str]) -> None:
    bad = {**INSTANCE, "ports": [{"network": "net-a", "mac": "fa:16:3e:00:00:52", "ips": ["not-an-ip"]}]}
    status, _, body = get(
        admin[0], f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=json.dumps(bad).encode()
    )
    assert status == 400
    err = json.loads(body)
    assert "ports[0].ips[0]" in err["field"]


def test_admin_uuid_mismatch_is_400(admin: tuple[tuple[str, int], str]) -> None:
    body = json.dumps({**INSTANCE, "uuid": "61616161-6161-4161-8161-616161616161"}).encode()
    assert get(admin[0], f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=body)[0] == 400


def test_admin_import_and_networks(admin: tuple[tuple[str, int], str]) -> None:
    addr, _ = admin
    doc = "networks:\n  - id: net-b\n    subnets: [{cidr: 10.1.0.0/24}]\nrouters:\n  - id: r1\n    networks: [net-b]\n"
    status, _, body = get(addr, "/v1/import", method="POST", headers=_auth(), body=doc.encode())
    assert status == 200, body
    nets = {n["id"] for n in json.loads(get(addr, "/v1/networks", headers=_auth())[2])}
    assert nets == {"net-a", "net-b"}
    assert json.loads(get(addr, "/v1/routers", headers=_auth())[2]) == [
        {"id": "r1", "project_id": "", "networks": ["net-b"]}
    ]


def test_admin_unknown_route_and_method(admin: tuple[tuple[str, int], str]) -> None:
    assert get(admin[0], "/v1/nothing", headers=_auth())[0] == 404
    assert get(admin[0], "/v1/networks", method="DELETE", headers=_auth())[0] == 405


def test_admin_get_then_put_keeps_architecture_and_port_id(admin: tuple[tuple[str, int], str]) -> None:
    """Regression: GET dropped ``architecture`` and the port ``id``, so a GET -> PUT round
    trip reset the architecture to x86_64 and replaced the port id with a MAC-derived one."""
    addr, _ = admin
    explicit = {
        **INSTANCE,
        "architecture": "aarch64",
        "ports": [{**INSTANCE["ports"][0], "id": "port-explicit"}],  # type: ignore[index]
    }
    status, _, _ = get(addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=json.dumps(explicit).encode())
    assert status == 201
    first = get(addr, f"/v1/instances/{UUID}", headers=_auth())[2]
    shown = json.loads(first)
    assert (shown["architecture"], shown["ports"][0]["id"]) == ("aarch64", "port-explicit")
    status, _, _ = get(addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=first)
    assert status == 200
    assert get(addr, f"/v1/instances/{UUID}", headers=_auth())[2] == first
