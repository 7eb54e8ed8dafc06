"""Parsing inventory files: the example as-is, every optional field, every error class."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from meta169.errors import InventoryError, ValidationError
from meta169.inventory import load_inventory, parse_inventory
from meta169.model import (
    HostRoute,
    Instance,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"
UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"

EXPECTED_NETWORK = Network(
    id="net-a",
    project_id="proj-a",
    subnets=(
        Subnet(
            cidr=ipaddress.ip_network("10.0.0.0/24"),
            gateway=ipaddress.ip_address("10.0.0.1"),
            dhcp=True,
            dns=(ipaddress.ip_address("10.0.0.2"),),
        ),
    ),
)
EXPECTED_INSTANCE = Instance(
    uuid=UUID,
    name="web-1",
    hostname="web-1",
    project_id="proj-a",
    availability_zone="nova",
    instance_type="m1.small",
    image_id="img-ubuntu-24.04",
    metadata={"role": "web"},
    keys=(SSHKey("ops", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example", "ssh"),),
    user_data=b"#cloud-config\nhostname: web-1\n",
    vendor_data={"cloud-init": "#cloud-config\npackages: [htop]\n"},
    ports=(Port("net-a", "fa:16:3e:00:00:05", (ipaddress.ip_address("10.0.0.5"),)),),
)


def test_inventory_example_file_parses_as_is() -> None:
    inventory = load_inventory(EXAMPLE)
    assert inventory.source == str(EXAMPLE)
    assert inventory.networks == (EXPECTED_NETWORK,)
    assert inventory.routers == (Router("router-a", ("net-a",)),)
    assert inventory.instances == (EXPECTED_INSTANCE,)


def test_inventory_json_and_sniffed_formats_agree_with_yaml(tmp_path: Path) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    as_json = tmp_path / "inventory.json"
    as_json.write_text(json.dumps(document))
    no_extension_json = tmp_path / "inventory"
    no_extension_json.write_text(json.dumps(document, indent=2))
    no_extension_yaml = tmp_path / "inventory.txt"
    no_extension_yaml.write_text(EXAMPLE.read_text())
    expected = load_inventory(EXAMPLE)
    for path in (as_json, no_extension_json, no_extension_yaml):
        parsed = load_inventory(path)
        assert (parsed.networks, parsed.routers, parsed.instances) == (
            expected.networks,
            expected.routers,
            expected.instances,
        ), path


def test_inventory_accepts_every_optional_field() -> None:
    text = textwrap.dedent(
        """
        networks:
          - id: net-6
            name: tenant six
            mtu: 1450
            subnets:
              - cidr: 2001:db8::/64
                gateway: 2001:db8::1
                ipv6_mode: dhcpv6-stateless
                dns: ["2001:db8::53"]
              - cidr: 10.6.0.0/24
                dhcp: false
                host_routes:
                  - {destination: 192.168.0.0/16, nexthop: 10.6.0.254}
        routers:
          - {id: router-6, project_id: proj-6, networks: [net-6]}
        instances:
          - uuid: 8D1A3C52-3F0E-4C4E-9A53-2F6A3C1B7E10
            name: Web Six
            region: north
            launch_index: 2
            created_at: 2024-05-01T12:00:00+02:00
            tags: {env: prod}
            security_groups: [default, web]
            architecture: aarch64
            metadata_options:
              http_tokens: required
              http_put_response_hop_limit: 2
            user_data_b64: AAEC/w==
            keys:
              - {name: cert, type: x509, data: "-----BEGIN CERTIFICATE-----"}
            ports:
              - network: net-6
                mac: FA-16-3E-00-00-06
                ips: ["2001:db8::6", 10.6.0.6]
                id: port-6
                device_number: 1
        """
    )
    inventory = parse_inventory(text, source="six.yaml")
    (net,) = inventory.networks
    assert net == Network(
        id="net-6",
        name="tenant six",
        mtu=1450,
        subnets=(
            Subnet(
                cidr=ipaddress.ip_network("2001:db8::/64"),
                gateway=ipaddress.ip_address("2001:db8::1"),
                ipv6_mode="dhcpv6-stateless",
                dns=(ipaddress.ip_address("2001:db8::53"),),
            ),
            Subnet(
                cidr=ipaddress.ip_network("10.6.0.0/24"),
                dhcp=False,
                host_routes=(HostRoute(ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_address("10.6.0.254")),),
            ),
        ),
    )
    assert inventory.routers == (Router("router-6", ("net-6",), project_id="proj-6"),)
    (inst,) = inventory.instances
    assert inst.uuid == UUID
    assert inst.hostname == "web-six"
    assert (inst.region, inst.launch_index, inst.architecture) == ("north", 2, "aarch64")
    assert inst.created_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert inst.created_at.utcoffset() == timedelta(hours=2)
    assert inst.tags == {"env": "prod"}
    assert inst.security_groups == ("default", "web")
    assert inst.metadata_options == MetadataOptions(http_tokens="required", http_put_response_hop_limit=2)
    assert inst.user_data == b"\x00\x01\x02\xff"
    assert inst.keys == (SSHKey("cert", "-----BEGIN CERTIFICATE-----", "x509"),)
    assert inst.ports == (
        Port(
            "net-6",
            "fa:16:3e:00:00:06",
            (ipaddress.ip_address("2001:db8::6"), ipaddress.ip_address("10.6.0.6")),
            id="port-6",
            device_number=1,
        ),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("'2024-05-01T12:00:00'", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("'2024-05-01 12:00:00-05:00'", datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-5)))),
    ],
)
def test_inventory_created_at_forms(value: str, expected: datetime) -> None:
    text = f"instances: [{{uuid: {UUID}, name: a, created_at: {value}}}]"
    (inst,) = parse_inventory(text).instances
    assert inst.created_at == expected
    assert inst.created_at.tzinfo is not None


def test_inventory_empty_document_is_an_empty_inventory() -> None:
    inventory = parse_inventory("", source="empty.yaml")
    assert (inventory.networks, inventory.routers, inventory.instances) == ((), (), ())


def _instance_yaml(**fields: str) -> str:
    """The example instance with some top-level fields replaced (values are YAML)."""
    base = {
        "uuid": UUID,
        "name": "web-1",
        "ports": '[{network: net-a, mac: "fa:16:3e:00:00:05", ips: [10.0.0.5]}]',
    }
    base.update(fields)
    lines = "".join(f"    {k}: {v}\n" for k, v in base.items() if v != "<drop>")
    return "instances:\n  -\n" + lines


NET = "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]}\n"

# (inventory text, entry, field, part of the message)
ERRORS = [
    pytest.param(
        _instance_yaml(user_dta="x"), "instances[0] (web-1)", "user_dta", "did you mean 'user_data'", id="typo"
    ),
    pytest.param(_instance_yaml(uuid="<drop>"), "instances[0] (web-1)", "uuid", "is required", id="missing-uuid"),
    pytest.param(_instance_yaml(uuid="not-a-uuid"), "instances[0] (web-1)", "uuid", "not a UUID", id="bad-uuid"),
    pytest.param(_instance_yaml(name="''"), "instances[0]", "name", "must not be empty", id="empty-name"),
    pytest.param(
        _instance_yaml(hostname="'web_1!'"), "instances[0] (web-1)", "hostname", "valid host name", id="hostname"
    ),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.300]}]"),
        "instances[0] (web-1)",
        "ports[0].ips[0]",
        "not an IP address",
        id="bad-ip",
    ),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: []}]"),
        "instances[0] (web-1)",
        "ports[0].ips",
        "at least one",
        id="no-ips",
    ),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'zz:16:3e:00:00:05', ips: [10.0.0.5]}]"),
        "instances[0] (web-1)",
        "ports[0].mac",
        "MAC address",
        id="bad-mac",
    ),
    pytest.param(
        # YAML 1.1 reads an unquoted all-digit MAC as a base-60 integer.
        _instance_yaml(ports="[{network: net-a, mac: 12:34:56:10:20:30, ips: [10.0.0.5]}]"),
        "instances[0] (web-1)",
        "ports[0].mac",
        "quote MAC",
        id="sexagesimal-mac",
    ),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.5], vlan: 3}]"),
        "instances[0] (web-1)",
        "ports[0].vlan",
        "unknown field",
        id="port-unknown-field",
    ),
    pytest.param(
        _instance_yaml(
            ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.5]},"
            " {network: net-a, mac: 'FA:16:3E:00:00:05', ips: [10.0.0.6]}]"
        ),
        "instances[0] (web-1)",
        "ports[1].mac",
        "also used by ports[0]",
        id="duplicate-mac",
    ),
    pytest.param(
        _instance_yaml(ports="[{network: 'bad net', mac: 'fa:16:3e:00:00:05', ips: [10.0.0.5]}]"),
        "instances[0] (web-1)",
        "ports[0].network",
        "network id",
        id="bad-network-id",
    ),
    pytest.param(
        _instance_yaml(metadata="{port: 80}"), "instances[0] (web-1)", "metadata.port", "quote it", id="metadata-int"
    ),
    pytest.param(
        _instance_yaml(metadata="[a]"), "instances[0] (web-1)", "metadata", "must be a mapping", id="metadata-list"
    ),
    pytest.param(_instance_yaml(launch_index="true"), "instances[0] (web-1)", "launch_index", "integer", id="bool-int"),
    pytest.param(
        _instance_yaml(launch_index="-1"), "instances[0] (web-1)", "launch_index", ">= 0", id="negative-index"
    ),
    pytest.param(
        _instance_yaml(launch_index=str(2**31)), "instances[0] (web-1)", "launch_index", "at most", id="index-int32"
    ),
    pytest.param(_instance_yaml(architecture='"arm\\0"'), "instances[0] (web-1)", "architecture", "NUL", id="nul"),
    pytest.param(_instance_yaml(tags='{"a\\0": b}'), "instances[0] (web-1)", "tags", "NUL", id="nul-key"),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.5], device_number: -1}]"),
        "instances[0] (web-1)",
        "ports[0].device_number",
        ">= 0",
        id="device-number",
    ),
    pytest.param(
        _instance_yaml(ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.5], id: 'port 1'}]"),
        "instances[0] (web-1)",
        "ports[0].id",
        "port id 'port 1'",
        id="port-id",
    ),
    pytest.param(
        _instance_yaml(metadata_options="{http_put_response_hop_limit: 65}"),
        "instances[0] (web-1)",
        "metadata_options.http_put_response_hop_limit",
        "1..64",
        id="hop-limit",
    ),
    pytest.param(
        _instance_yaml(created_at="yesterday"), "instances[0] (web-1)", "created_at", "ISO 8601", id="created-at"
    ),
    pytest.param(
        _instance_yaml(user_data="{a: 1}"), "instances[0] (web-1)", "user_data", "must be a string", id="user-data-map"
    ),
    pytest.param(
        _instance_yaml(user_data="x", user_data_b64="eA=="),
        "instances[0] (web-1)",
        "user_data_b64",
        "not both",
        id="both-user-data",
    ),
    pytest.param(
        _instance_yaml(user_data_b64="'***'"), "instances[0] (web-1)", "user_data_b64", "base64", id="bad-base64"
    ),
    pytest.param(
        _instance_yaml(user_data="'" + "x" * 50_000 + "'"),
        "instances[0] (web-1)",
        "user_data",
        "Nova's limit",
        id="too-big",
    ),
    pytest.param(
        _instance_yaml(vendor_data="[1]"), "instances[0] (web-1)", "vendor_data", "JSON object", id="vendor-list"
    ),
    pytest.param(
        _instance_yaml(vendor_data="{when: 2024-01-01}"),
        "instances[0] (web-1)",
        "vendor_data",
        "JSON values",
        id="vendor-date",
    ),
    pytest.param(
        _instance_yaml(keys="[{name: ops, data: k1}, {name: ops, data: k2}]"),
        "instances[0] (web-1)",
        "keys[1].name",
        "also used by keys[0]",
        id="duplicate-key",
    ),
    pytest.param(
        _instance_yaml(keys="[{name: ops, type: pgp, data: k}]"),
        "instances[0] (web-1)",
        "keys[0].type",
        "ssh, x509",
        id="key-type",
    ),
    pytest.param(
        _instance_yaml(keys="[{name: ops}]"), "instances[0] (web-1)", "keys[0].data", "is required", id="key-no-data"
    ),
    pytest.param(
        _instance_yaml(metadata_options="{http_tokens: always}"),
        "instances[0] (web-1)",
        "metadata_options.http_tokens",
        "one of optional, required, not 'always'",
        id="metadata-options",
    ),
    pytest.param(
        _instance_yaml(metadata_options="{http_token: required}"),
        "instances[0] (web-1)",
        "metadata_options.http_token",
        "did you mean 'http_tokens'",
        id="options-typo",
    ),
    pytest.param(
        _instance_yaml(security_groups="[1]"), "instances[0] (web-1)", "security_groups[0]", "string", id="sg"
    ),
    pytest.param("networks:\n  - {id: net-a, mtu: 40}\n", "networks[0] (net-a)", "mtu", "MTU", id="mtu"),
    pytest.param("networks:\n  - {id: 7}\n", "networks[0]", "id", "quote it", id="int-id"),
    pytest.param("networks:\n  - {name: x}\n", "networks[0]", "id", "is required", id="network-no-id"),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.1/24}]}\n",
        "networks[0] (net-a)",
        "subnets[0].cidr",
        "host bits",
        id="cidr-host-bits",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, gateway: 10.1.0.1}]}\n",
        "networks[0] (net-a)",
        "subnets[0]",
        "outside subnet",
        id="gateway-outside",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, ipv6_mode: slaac}]}\n",
        "networks[0] (net-a)",
        "subnets[0]",
        "IPv4 subnet",
        id="ipv6-mode-on-v4",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 2001:db8::/64, ipv6_mode: magic}]}\n",
        "networks[0] (net-a)",
        "subnets[0].ipv6_mode",
        "slaac",
        id="ipv6-mode-value",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, dhcp: maybe}]}\n",
        "networks[0] (net-a)",
        "subnets[0].dhcp",
        "true or false",
        id="dhcp-bool",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, dns: [10.0.0.2, dns.example]}]}\n",
        "networks[0] (net-a)",
        "subnets[0].dns[1]",
        "not an IP",
        id="dns",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24,"
        " host_routes: [{destination: 2001:db8::/64, nexthop: 10.0.0.1}]}]}\n",
        "networks[0] (net-a)",
        "subnets[0].host_routes[0]",
        "mixes IP versions",
        id="host-route-mix",
    ),
    pytest.param(
        "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24, host_routes: [{destination: 0.0.0.0/0}]}]}\n",
        "networks[0] (net-a)",
        "subnets[0].host_routes[0].nexthop",
        "is required",
        id="host-route-nexthop",
    ),
    pytest.param(
        NET + NET.replace("networks:\n", ""),
        "networks[1] (net-a)",
        "id",
        "already defined by networks entry networks[0]",
        id="dup-network",
    ),
    pytest.param(
        "routers:\n  - {id: r, networks: [net-a, net-a]}\n",
        "routers[0] (r)",
        "networks[1]",
        "listed twice",
        id="router-dup-net",
    ),
    pytest.param(
        "routers:\n  - {id: r, network: [net-a]}\n",
        "routers[0] (r)",
        "network",
        "did you mean 'networks'",
        id="router-typo",
    ),
    pytest.param(
        _instance_yaml() + _instance_yaml(name="web-2").replace("instances:\n", ""),
        "instances[1] (web-2)",
        "uuid",
        "already defined",
        id="dup-uuid",
    ),
    pytest.param(
        _instance_yaml()
        + _instance_yaml(
            name="web-2",
            uuid="0b6f3e1c-9d7a-4a51-8c3e-5f2d1a0b9c84",
            ports="[{network: net-a, mac: 'fa:16:3e:00:00:09', ips: [10.0.0.5]}]",
        ).replace("instances:\n", ""),
        "instances[1] (web-2)",
        "ports[0].ips[0]",
        "also used by instances[0] (web-1)",
        id="dup-ip",
    ),
    pytest.param(
        _instance_yaml()
        + _instance_yaml(
            name="web-2",
            uuid="0b6f3e1c-9d7a-4a51-8c3e-5f2d1a0b9c84",
            ports="[{network: net-a, mac: 'fa:16:3e:00:00:05', ips: [10.0.0.9]}]",
        ).replace("instances:\n", ""),
        "instances[1] (web-2)",
        "ports[0].mac",
        "also used by instances[0] (web-1)",
        id="dup-mac-across",
    ),
    pytest.param("servers: []\n", "", "servers", "unknown field", id="top-level-typo"),
    pytest.param("instances: {a: 1}\n", "", "instances", "must be a list", id="top-not-list"),
    pytest.param("- a\n- b\n", "", "", "must be a mapping", id="document-list"),
    pytest.param("instances:\n  - just a string\n", "instances[0]", "", "must be a mapping", id="entry-string"),
]


@pytest.mark.parametrize(("text", "entry", "field", "message"), ERRORS)
def test_inventory_error_names_file_entry_and_field(text: str, entry: str, field: str, message: str) -> None:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, source="inv.yaml")
    error = info.value
    assert (error.source, error.entry, error.field) == ("inv.yaml", entry, field), str(error)
    assert message in str(error)
    assert str(error).startswith("inv.yaml")
    if entry:
        assert f"entry {entry}" in str(error)
    if field:
        assert f"field {field}" in str(error)
    assert isinstance(error, ValidationError)


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("networks:\n  - id: a\n   bad: indent\n", "yaml", "line 3"),
        ("networks: [\n", "yaml", "invalid YAML"),
        ("networks: []\nnetworks: []\n", "yaml", "duplicate key 'networks'"),
        ("instances:\n  - {uuid: a, uuid: b}\n", "yaml", "duplicate key 'uuid'"),
        ('{"networks": [}', "json", "line 1 column 15: invalid JSON"),
        ('{"networks": [], "networks": []}', "json", "duplicate key 'networks'"),
    ],
)
def test_inventory_syntax_errors_name_the_file_and_line(text: str, fmt: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message) as info:
        parse_inventory(text, source="bad." + fmt, fmt=fmt)  # type: ignore[arg-type]
    assert info.value.source == "bad." + fmt
    assert str(info.value).startswith("bad." + fmt)


def test_inventory_lone_surrogate_from_json_is_refused() -> None:
    # JSON's \ud800 escape decodes to a string no database can store.
    text = json.dumps({"instances": [{"uuid": UUID, "name": "web-1", "region": "\ud800"}]})
    with pytest.raises(InventoryError, match="lone surrogate") as info:
        parse_inventory(text, source="inv.json")
    assert (info.value.entry, info.value.field) == ("instances[0] (web-1)", "region")


def test_inventory_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InventoryError, match="cannot read") as info:
        load_inventory(missing)
    assert info.value.source == str(missing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(InventoryError, match="not UTF-8") as info:
        load_inventory(binary)
    assert info.value.source == str(binary)
