"""The version tables of render.versions, enumerated."""

from __future__ import annotations

import pytest

from meta169.render import versions as v

ALL_OS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
)


def test_versions_openstack_list_is_novas_up_to_victoria() -> None:
    assert v.OPENSTACK_VERSIONS == ALL_OS


def test_versions_ec2_list_is_novas_plus_cloud_init_probes() -> None:
    nova = (
        "1.0",
        "2007-01-19",
        "2007-03-01",
        "2007-08-29",
        "2007-10-10",
        "2007-12-15",
        "2008-02-01",
        "2008-09-01",
        "2009-04-04",
    )
    expected = (*nova, "2016-09-02", "2018-09-24", "2021-03-23")
    assert expected == v.EC2_VERSIONS


def test_versions_are_sorted_oldest_first() -> None:
    assert list(v.OPENSTACK_VERSIONS) == sorted(v.OPENSTACK_VERSIONS)
    assert list(v.EC2_VERSIONS) == sorted(v.EC2_VERSIONS)  # "1.0" sorts before dates


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("latest", "2020-10-14"),
        ("2013-04-04", "2013-04-04"),
        ("2025-04-04", None),
        ("2009-04-04", None),
        ("", None),
    ],
)
def test_versions_resolve_openstack(version: str, expected: str | None) -> None:
    assert v.resolve_openstack(version) == expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [("latest", "2021-03-23"), ("1.0", "1.0"), ("2009-04-04", "2009-04-04"), ("2012-01-12", None)],
)
def test_versions_resolve_ec2(version: str, expected: str | None) -> None:
    assert v.resolve_ec2(version) == expected


# Nova _handle_version: user_data if set, password >= GRIZZLY, vendor_data.json >=
# HAVANA, network_data.json >= LIBERTY, vendor_data2.json >= NEWTON_TWO.
FILES = {
    "2012-08-10": ("meta_data.json",),
    "2013-04-04": ("meta_data.json", "password"),
    "2013-10-17": ("meta_data.json", "password", "vendor_data.json"),
    "2015-10-15": ("meta_data.json", "password", "vendor_data.json", "network_data.json"),
    "2016-06-30": ("meta_data.json", "password", "vendor_data.json", "network_data.json"),
}
_FULL = ("meta_data.json", "password", "vendor_data.json", "network_data.json", "vendor_data2.json")
for _version in ALL_OS[5:]:
    FILES[_version] = _FULL


@pytest.mark.parametrize("version", ALL_OS)
def test_versions_openstack_files_without_user_data(version: str) -> None:
    assert v.openstack_files(version, has_user_data=False) == FILES[version]


@pytest.mark.parametrize("version", ALL_OS)
def test_versions_openstack_files_with_user_data_second(version: str) -> None:
    expected = list(FILES[version])
    expected.insert(1, "user_data")
    assert v.openstack_files(version, has_user_data=True) == tuple(expected)


FIELDS = {
    "2012-08-10": set(),
    "2013-04-04": {"random_seed"},
    "2013-10-17": {"random_seed"},
    "2015-10-15": {"random_seed", "project_id"},
    "2016-06-30": {"random_seed", "project_id", "devices"},
    "2016-10-06": {"random_seed", "project_id", "devices"},
    "2017-02-22": {"random_seed", "project_id", "devices"},
    "2018-08-27": {"random_seed", "project_id", "devices"},
    "2020-10-14": {"random_seed", "project_id", "devices", "dedicated_cpus"},
}


@pytest.mark.parametrize("version", ALL_OS)
def test_versions_meta_data_fields(version: str) -> None:
    assert v.meta_data_fields(version) == FIELDS[version]


BASE = {
    "ami-id",
    "ami-launch-index",
    "ami-manifest-path",
    "hostname",
    "instance-id",
    "local-ipv4",
    "public-keys",
    "reservation-id",
    "security-groups",
}
NOVA_2009 = BASE | {
    "local-hostname",
    "instance-type",
    "block-device-mapping",
    "placement/availability-zone",
    "instance-action",
}
NETWORK = {"mac", "network/interfaces/macs", "network/interfaces/macs/ipv6"}
CATEGORIES = {
    "1.0": BASE,
    "2007-01-19": BASE | {"local-hostname"},
    "2007-03-01": BASE | {"local-hostname"},
    "2007-08-29": BASE | {"local-hostname", "instance-type"},
    "2007-10-10": BASE | {"local-hostname", "instance-type"},
    "2007-12-15": BASE | {"local-hostname", "instance-type", "block-device-mapping"},
    "2008-02-01": NOVA_2009 - {"instance-action"},
    "2008-09-01": NOVA_2009,
    "2009-04-04": NOVA_2009,
    "2016-09-02": NOVA_2009 | NETWORK,
    "2018-09-24": NOVA_2009 | NETWORK,
    "2021-03-23": NOVA_2009 | NETWORK | {"placement/region", "tags/instance"},
}


@pytest.mark.parametrize("version", list(CATEGORIES))
def test_versions_ec2_categories(version: str) -> None:
    assert v.ec2_categories(version) == CATEGORIES[version]


@pytest.mark.parametrize(
    ("version", "expected"),
    [(ver, ver >= "2009-04-04" and ver != "1.0") for ver in CATEGORIES],
)
def test_versions_ec2_dynamic_from_2009_04_04(version: str, expected: bool) -> None:
    assert v.ec2_has_dynamic(version) is expected


@pytest.mark.parametrize(
    ("version", "since", "expected"),
    [
        ("1.0", "1.0", True),
        ("1.0", "2007-01-19", False),
        ("2007-01-19", "1.0", True),
        ("2018-09-24", "2020-08-24", False),
        ("2021-03-23", "2020-08-24", True),
    ],
)
def test_versions_ec2_at_least(version: str, since: str, expected: bool) -> None:
    assert v.ec2_at_least(version, since) is expected
