"""The owner of each registry object: stored by every backend, and added to databases
built by the first schema (SQLite and PostgreSQL) by migration 002."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from meta169.model import Instance, Network, Port, Router, Subnet, parse_ip, parse_network
from meta169.registry import Registry, open_registry, sqlalchemy_url
from meta169.registry.memory import MemoryRegistry
from meta169.registry.schema import load_migrations, migrate
from meta169.registry.sql import create_engine

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"


def test_sync_registry_sources_old_database_gets_the_source_column(sql_url: str) -> None:
    # A database as meta169 left it before sources existed, holding one of each.
    first = load_migrations()[0]
    assert first.name == "initial"
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        migrate(engine, [first])
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO networks (id, project_id, name, mtu) VALUES ('net-a', 'p', 'a', 1500)"))
            conn.execute(
                sa.text(
                    "INSERT INTO subnets (network_id, seq, cidr, gateway, dhcp, dns, host_routes, ipv6_mode) "
                    "VALUES ('net-a', 0, '10.0.0.0/24', '10.0.0.1', :t, '[]', '[]', NULL)"
                ),
                {"t": True},
            )
            conn.execute(sa.text("INSERT INTO routers (id, project_id) VALUES ('router-a', 'p')"))
            conn.execute(
                sa.text("INSERT INTO router_networks (router_id, network_id, seq) VALUES ('router-a', 'net-a', 0)")
            )
            conn.execute(
                sa.text(
                    "INSERT INTO instances (uuid, name, hostname, project_id, availability_zone, region, "
                    "instance_type, image_id, launch_index, created_at, metadata_json, keys_json, user_data, "
                    "vendor_data_json, tags_json, security_groups_json, metadata_options_json, architecture) "
                    f"VALUES ('{UUID}', 'old', 'old', 'p', 'nova', 'RegionOne', 'm1.small', '', 0, "
                    "'1970-01-01T00:00:00+00:00', '{}', '[]', NULL, NULL, '{}', '[]', NULL, 'x86_64')"
                )
            )
    finally:
        engine.dispose()

    registry = open_registry(sql_url)  # applies 002
    try:
        assert registry.get_network("net-a").source == "inventory"
        assert registry.get_router("router-a").source == "inventory"
        old = registry.get_instance(UUID)
        assert (old.name, old.source) == ("old", "inventory")
        registry.put_instance(Instance(uuid=UUID, name="old", source="libvirt:qemu:///system"))
        assert registry.get_instance(UUID).source == "libvirt:qemu:///system"
    finally:
        registry.close()
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        with engine.connect() as conn:
            versions = [tuple(r) for r in conn.execute(sa.text("SELECT version, name FROM schema_version ORDER BY 1"))]
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes("instances")}
    finally:
        engine.dispose()
    assert versions[:2] == [(1, "initial"), (2, "sources")]
    assert "instances_source" in indexes


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    if request.param == "memory":
        return MemoryRegistry()
    url = f"sqlite://{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    registry = open_registry(str(url), create=True)
    request.addfinalizer(registry.close)
    return registry


def test_sync_registry_sources_every_backend_keeps_each_owner(any_registry: Registry) -> None:
    network = Network("net-a", subnets=(Subnet(parse_network("10.0.0.0/24")),), source="openstack:cloud-1")
    router = Router("router-a", ("net-a",), source="file:/etc/meta169/a.yaml")
    instance = Instance(
        uuid=UUID,
        name="web",
        ports=(Port("net-a", "fa:16:3e:00:00:01", (parse_ip("10.0.0.5"),)),),
        source="libvirt:qemu+ssh://host/system",
    )
    any_registry.put_network(network)
    any_registry.put_router(router)
    any_registry.put_instance(instance)
    assert any_registry.get_network("net-a") == network
    assert any_registry.get_router("router-a") == router
    assert any_registry.get_instance(UUID) == instance
    any_registry.put_instance(Instance(uuid=UUID, name="web", source="admin"))
    assert any_registry.get_instance(UUID).source == "admin"
