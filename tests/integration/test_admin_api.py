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


NET_B = {"name": "tenant-b", "project_id": "proj-b", "mtu": 1450, "subnets": [{"cidr": "10.1.0.0/24"}]}


def test_admin_put_get_list_delete_network(admin: tuple[tuple[str, int], str]) -> None:
    addr, url = admin
    body = json.dumps(NET_B).encode()
    status, _, created = get(addr, "/v1/networks/net-b", method="PUT", headers=_auth(), body=body)
    assert status == 201, created
    shown = json.loads(created)
    # The path gives the id; a network the API creates is the API's.
    assert (shown["id"], shown["mtu"], shown["source"]) == ("net-b", 1450, "admin")
    assert shown["subnets"][0]["cidr"] == "10.1.0.0/24"
    assert get(addr, "/v1/networks/net-b", method="PUT", headers=_auth(), body=body)[0] == 200
    assert json.loads(get(addr, "/v1/networks/net-b", headers=_auth())[2]) == shown
    assert {n["id"] for n in json.loads(get(addr, "/v1/networks", headers=_auth())[2])} == {"net-a", "net-b"}
    # the CLI sees what the API wrote: one registry
    assert json.loads(run_cli(url, "network", "show", "net-b").stdout) == shown
    assert get(addr, "/v1/networks/net-b", method="DELETE", headers=_auth())[0] == 204
    status, _, missing = get(addr, "/v1/networks/net-b", headers=_auth())
    assert (status, json.loads(missing)["error"]) == (404, "no network net-b")
    assert get(addr, "/v1/networks/net-b", method="DELETE", headers=_auth())[0] == 404


def test_admin_put_get_delete_router(admin: tuple[tuple[str, int], str]) -> None:
    addr, url = admin
    body = json.dumps({"networks": ["net-a"]}).encode()
    status, _, created = get(addr, "/v1/routers/r1", method="PUT", headers=_auth(), body=body)
    assert status == 201, created
    assert json.loads(created) == {"id": "r1", "project_id": "", "networks": ["net-a"], "source": "admin"}
    assert get(addr, "/v1/routers/r1", method="PUT", headers=_auth(), body=body)[0] == 200
    assert json.loads(get(addr, "/v1/routers/r1", headers=_auth())[2])["networks"] == ["net-a"]
    assert "r1" in run_cli(url, "router", "list").stdout
    assert get(addr, "/v1/routers/r1", method="DELETE", headers=_auth())[0] == 204
    assert get(addr, "/v1/routers/r1", headers=_auth())[0] == 404
    assert get(addr, "/v1/routers/r1", method="DELETE", headers=_auth())[0] == 404
    # its network stays
    assert get(addr, "/v1/networks/net-a", headers=_auth())[0] == 200


def test_admin_delete_network_in_use_is_409_naming_the_users(admin: tuple[tuple[str, int], str]) -> None:
    addr, _ = admin
    instance = json.dumps(INSTANCE).encode()
    assert get(addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=instance)[0] == 201
    status, _, body = get(addr, "/v1/networks/net-a", method="DELETE", headers=_auth())
    assert status == 409
    assert json.loads(body)["error"] == f"network net-a is used by instance {UUID} (api-1)"
    assert get(addr, f"/v1/instances/{UUID}", method="DELETE", headers=_auth())[0] == 204
    router = json.dumps({"networks": ["net-a"]}).encode()
    assert get(addr, "/v1/routers/r1", method="PUT", headers=_auth(), body=router)[0] == 201
    status, _, body = get(addr, "/v1/networks/net-a", method="DELETE", headers=_auth())
    assert status == 409
    assert json.loads(body)["error"] == "network net-a is used by router r1"
    assert get(addr, "/v1/networks/net-a", headers=_auth())[0] == 200
    assert get(addr, "/v1/routers/r1", method="DELETE", headers=_auth())[0] == 204
    assert get(addr, "/v1/networks/net-a", method="DELETE", headers=_auth())[0] == 204


def test_admin_put_router_is_checked_as_import_checks_it(admin: tuple[tuple[str, int], str]) -> None:
    addr, _ = admin
    body = json.dumps({"networks": ["net-a", "net-zz"]}).encode()
    status, _, answer = get(addr, "/v1/routers/r1", method="PUT", headers=_auth(), body=body)
    assert status == 400
    err = json.loads(answer)
    assert (err["entry"], err["field"]) == ("routers[0] (r1)", "networks[1]")
    assert "unknown network 'net-zz'" in err["error"]
    assert get(addr, "/v1/routers/r1", headers=_auth())[0] == 404


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/v1/networks/net-b", {**NET_B, "id": "net-c"}, "body id net-c does not match the path net-b"),
        ("/v1/routers/r1", {"id": "r2"}, "body id r2 does not match the path r1"),
        ("/v1/networks/net-b", [NET_B], "body must be one network as a JSON object"),
        ("/v1/networks/net-b", {**NET_B, "mtu": 20}, "request body, entry networks[0] (net-b), field mtu:"),
        ("/v1/routers/r1", {"networks": "net-a"}, "request body, entry routers[0] (r1), field networks:"),
    ],
)
def test_admin_put_invalid_network_or_router_is_400(
    admin: tuple[tuple[str, int], str], path: str, body: object, error: str
) -> None:
    status, _, answer = get(admin[0], path, method="PUT", headers=_auth(), body=json.dumps(body).encode())
    assert status == 400
    assert json.loads(answer)["error"].startswith(error)
    assert get(admin[0], path, headers=_auth())[0] == 404


def test_admin_put_network_keeps_its_owner(admin: tuple[tuple[str, int], str]) -> None:
    """net-a came from `meta169 import`: a PUT without a source replaces it and it stays
    the inventory's; a PUT claiming it for another source is refused, as an import is."""
    addr, _ = admin
    mine = {"subnets": [{"cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}], "mtu": 1400}
    status, _, body = get(addr, "/v1/networks/net-a", method="PUT", headers=_auth(), body=json.dumps(mine).encode())
    assert status == 200, body
    shown = json.loads(body)
    assert shown["mtu"] == 1400
    assert "source" not in shown  # the default, inventory
    claimed = json.dumps({**mine, "source": "admin"}).encode()
    status, _, body = get(addr, "/v1/networks/net-a", method="PUT", headers=_auth(), body=claimed)
    assert status == 409
    assert "is already in the registry from inventory" in json.loads(body)["error"]


def test_admin_put_network_leaving_a_port_outside_its_subnets_is_409(admin: tuple[tuple[str, int], str]) -> None:
    """A PUT used to replace net-a's subnets with ones that no longer held the address
    of an instance on it; the guest then got an address outside every subnet."""
    addr, _ = admin
    instance = json.dumps(INSTANCE).encode()
    assert get(addr, f"/v1/instances/{UUID}", method="PUT", headers=_auth(), body=instance)[0] == 201
    before = get(addr, "/v1/networks/net-a", headers=_auth())[2]
    shrunk = json.dumps({"subnets": [{"cidr": "10.0.0.128/25"}]}).encode()
    status, _, body = get(addr, "/v1/networks/net-a", method="PUT", headers=_auth(), body=shrunk)
    assert status == 409, body
    assert json.loads(body)["error"].startswith(
        f"network net-a: subnets 10.0.0.128/25 would leave ports of 1 instance outside every subnet: "
        f"{UUID} (api-1) at 10.0.0.51;"
    )
    assert get(addr, "/v1/networks/net-a", headers=_auth())[2] == before
    # A subnet that still holds it is written.
    wider = json.dumps({"subnets": [{"cidr": "10.0.0.0/16"}]}).encode()
    assert get(addr, "/v1/networks/net-a", method="PUT", headers=_auth(), body=wider)[0] == 200
