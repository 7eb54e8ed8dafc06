"""Listing instances a page at a time, as Nova's list APIs do (limit and marker):
the registry on every backend, ``meta169 instance list`` and ``GET /v1/instances``.
No listing reads every instance unless asked to walk them all."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.errors import ValidationError
from meta169.model import Instance, Network, Port, Subnet
from meta169.registry import Batch, Registry, iter_instances, open_registry
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import get, meta169_argv, run_cli

TOTAL = 2500  # two full pages of the default 1000 and a partial one
TOKEN = "pagination-token-0123456789"


def _instances(count: int) -> list[Instance]:
    # uuids in an order unrelated to the names, as real ones are.
    return [
        Instance(
            uuid=f"{(i * 7919) % 100_000:08d}-0000-4000-8000-{i:012d}",
            name=f"vm-{i}",
            ports=(Port("net-a", f"fa:16:3e:00:{i >> 8:02x}:{i & 255:02x}", (ipaddress.ip_address("10.0.0.10") + i,)),),
        )
        for i in range(count)
    ]


def _fill(registry: Registry, count: int = TOTAL) -> list[str]:
    net = Network(id="net-a", subnets=(Subnet(cidr=ipaddress.ip_network("10.0.0.0/20")),))
    instances = _instances(count)
    registry.apply_batch(Batch(networks=[net], instances=instances))
    return sorted(i.uuid for i in instances)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "memory":
        opened: Registry = MemoryRegistry()
    elif request.param == "sqlite":
        opened = open_registry(f"sqlite://{tmp_path / 'registry.db'}", create=True)
    else:
        opened = open_registry(str(request.getfixturevalue("postgres_url")))
    yield opened
    opened.close()


def test_registry_list_pages_follow_the_marker_in_uuid_order(registry: Registry) -> None:
    uuids = _fill(registry)
    first = registry.list_instances(limit=1000)
    assert [i.uuid for i in first] == uuids[:1000]
    second = registry.list_instances(limit=1000, marker=first[-1].uuid)
    assert [i.uuid for i in second] == uuids[1000:2000]
    # Each page carries the instances whole, ports included.
    assert second[0] == registry.get_instance(uuids[1000])
    last = registry.list_instances(limit=1000, marker=second[-1].uuid)
    assert [i.uuid for i in last] == uuids[2000:]
    assert registry.list_instances(limit=1000, marker=uuids[-1]) == []
    assert registry.list_instances(limit=0) == []
    assert registry.count_instances() == TOTAL


def test_registry_list_marker_removed_between_pages_still_pages(registry: Registry) -> None:
    uuids = _fill(registry, 30)
    page = registry.list_instances(limit=10)
    registry.delete_instance(page[-1].uuid)
    assert [i.uuid for i in registry.list_instances(limit=10, marker=page[-1].uuid)] == uuids[10:20]


def test_registry_list_negative_limit_is_refused(registry: Registry) -> None:
    with pytest.raises(ValidationError):
        registry.list_instances(limit=-1)


def test_registry_iter_instances_walks_every_page(registry: Registry) -> None:
    uuids = _fill(registry, 250)
    assert [i.uuid for i in iter_instances(registry, page=100)] == uuids
    assert [i.uuid for i in iter_instances(registry, page=100, marker=uuids[9])] == uuids[10:]
    # A last page exactly full ends with one empty read.
    assert len(list(iter_instances(registry, page=125))) == 250


@pytest.fixture
def filled(tmp_path: Path) -> tuple[str, list[str]]:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    registry = open_registry(url, create=True)
    try:
        return url, _fill(registry)
    finally:
        registry.close()


def test_instance_list_shows_one_page_by_default(filled: tuple[str, list[str]]) -> None:
    url, uuids = filled
    result = run_cli(url, "instance", "list")
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == uuids[:1000]
    assert f"--marker {uuids[999]}" in result.stderr
    result = run_cli(url, "instance", "list", "--limit", "2", "--marker", uuids[999], "--json")
    assert [row["uuid"] for row in json.loads(result.stdout)] == uuids[1000:1002]


def test_instance_list_all_walks_every_page(filled: tuple[str, list[str]]) -> None:
    url, uuids = filled
    result = run_cli(url, "instance", "list", "--all", "--json", "--limit", "700")
    assert [row["uuid"] for row in json.loads(result.stdout)] == uuids
    assert result.stderr == ""


@pytest.fixture
def admin(filled: tuple[str, list[str]], tmp_path: Path) -> Iterator[tuple[tuple[str, int], list[str]]]:
    url, uuids = filled
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    proc = subprocess.Popen(
        meta169_argv("--registry", url, "admin", "--listen", "127.0.0.1:0", "--token-file", str(token_file)),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"listening on (\S+):(\d+)", line)
    assert match, line + proc.stderr.read()
    try:
        yield (match.group(1), int(match.group(2))), uuids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc.stderr.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_admin_list_pages_with_a_link_to_the_next(admin: tuple[tuple[str, int], list[str]]) -> None:
    addr, uuids = admin
    seen: list[str] = []
    path: str | None = "/v1/instances"
    pages = 0
    while path is not None:
        status, headers, body = get(addr, path, headers=_auth())
        assert status == 200
        page = json.loads(body)
        assert len(page) <= 1000
        seen += [entry["uuid"] for entry in page]
        pages += 1
        link = headers.get("link")
        path = None if link is None else re.fullmatch(r'<([^>]+)>; rel="next"', link).group(1)  # type: ignore[union-attr]
    assert seen == uuids
    assert pages == 3


@pytest.mark.parametrize(
    ("query", "status", "count"),
    [("?limit=5", 200, 5), ("?limit=5000", 200, 1000), ("?limit=" + "9" * 40, 200, 1000), ("?limit=0", 200, 0),
     ("?limit=-1", 400, None), ("?limit=many", 400, None), ("?limit=%C2%B2", 400, None), ("?page=2", 400, None)],
)  # fmt: skip
def test_admin_list_query(admin: tuple[tuple[str, int], list[str]], query: str, status: int, count: int | None) -> None:
    addr, _ = admin
    got, _, body = get(addr, "/v1/instances" + query, headers=_auth())
    assert got == status
    if count is not None:
        assert len(json.loads(body)) == count
