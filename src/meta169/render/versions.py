"""The metadata version tables, as data.

Which versions exist in each tree, which files each OpenStack version lists, which
``meta_data.json`` fields and which EC2 ``meta-data/`` categories each version
carries. Everything else in ``render`` asks these tables; tests enumerate them.

Sources: openstack/nova ``nova/api/metadata/base.py`` (OPENSTACK_VERSIONS, VERSIONS,
``_handle_version``, ``_metadata_as_json``, ``get_ec2_metadata``) and the EC2 user
guide's "Instance metadata categories" table (awsdocs/amazon-ec2-user-guide
``doc_source/instancedata-data-categories.md``, column "Version when category was
released").
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import Final

LATEST: Final = "latest"

# -- OpenStack ---------------------------------------------------------------------
# Nova's names for its metadata versions [nova api/metadata/base.py].
FOLSOM: Final = "2012-08-10"
GRIZZLY: Final = "2013-04-04"
HAVANA: Final = "2013-10-17"
LIBERTY: Final = "2015-10-15"
NEWTON_ONE: Final = "2016-06-30"
NEWTON_TWO: Final = "2016-10-06"
OCATA: Final = "2017-02-22"
ROCKY: Final = "2018-08-27"
VICTORIA: Final = "2020-10-14"

# Nova has since added 2025-04-04 (EPOXY), which only adds 'share' entries to
# ``devices``; we have no shares to show, so the list stops at VICTORIA.
OPENSTACK_VERSIONS: Final[tuple[str, ...]] = (
    FOLSOM,
    GRIZZLY,
    HAVANA,
    LIBERTY,
    NEWTON_ONE,
    NEWTON_TWO,
    OCATA,
    ROCKY,
    VICTORIA,
)

# File name -> first version that lists it, in Nova's listing order
# [nova base.py _handle_version]. user_data is listed only when the instance has
# user data; password is served by the API layer, never by a pre-rendered document.
OPENSTACK_FILES: Final[tuple[tuple[str, str], ...]] = (
    ("meta_data.json", FOLSOM),
    ("user_data", FOLSOM),
    ("password", GRIZZLY),
    ("vendor_data.json", HAVANA),
    ("network_data.json", LIBERTY),
    ("vendor_data2.json", NEWTON_TWO),
)

# meta_data.json fields that appear from a given version on [nova base.py
# _metadata_as_json: random_seed >= GRIZZLY, project_id >= LIBERTY, devices >=
# NEWTON_ONE, dedicated_cpus >= VICTORIA]. Fields not named here (uuid, meta,
# public_keys, keys, hostname, name, launch_index, availability_zone) are in every
# version; meta/public_keys/keys only when the instance has them.
META_DATA_FIELDS_SINCE: Final[Mapping[str, str]] = MappingProxyType(
    {
        "random_seed": GRIZZLY,
        "project_id": LIBERTY,
        "devices": NEWTON_ONE,
        "dedicated_cpus": VICTORIA,
    }
)

# -- EC2 ----------------------------------------------------------------------------
# Nova's VERSIONS (what it prints at GET /) [nova base.py], then the newer dated
# versions cloud-init's EC2 datasource probes for extended metadata
# [cloud-init sources/DataSourceEc2.py extended_metadata_versions].
EC2_VERSIONS: Final[tuple[str, ...]] = (
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2016-09-02",
    "2018-09-24",
    "2021-03-23",
)

# meta-data category -> the EC2 version that introduced it. Cut-offs up to
# 2008-09-01 are Nova's get_ec2_metadata; later ones are AWS's table. Categories
# AWS has but we have nothing for (public-ipv4 and public-hostname without floating
# IPs, kernel-id, ramdisk-id, product-codes, iam/, services/) are left out: every
# listed entry must answer 200.
EC2_META_DATA_SINCE: Final[Mapping[str, str]] = MappingProxyType(
    {
        "ami-id": "1.0",
        "ami-launch-index": "1.0",
        "ami-manifest-path": "1.0",
        "hostname": "1.0",
        "instance-id": "1.0",
        "local-ipv4": "1.0",
        "public-keys": "1.0",
        "reservation-id": "1.0",
        "security-groups": "1.0",
        "local-hostname": "2007-01-19",
        "instance-type": "2007-08-29",
        "block-device-mapping": "2007-12-15",
        "placement/availability-zone": "2008-02-01",
        "instance-action": "2008-09-01",
        "mac": "2011-01-01",
        "network/interfaces/macs": "2011-01-01",
        # ipv6s and subnet-ipv6-cidr-blocks under each MAC.
        "network/interfaces/macs/ipv6": "2016-06-30",
        "placement/region": "2020-08-24",
        "tags/instance": "2021-03-23",
    }
)

# dynamic/ (instance-identity document, signature, pkcs7) appeared in 2009-04-04
# [AWS table "Dynamic data categories"]; older versions list no dynamic/.
EC2_DYNAMIC_SINCE: Final = "2009-04-04"

# The identity document's format version, as AWS serves it today.
IDENTITY_DOCUMENT_VERSION: Final = "2017-09-30"


def _ec2_key(version: str) -> str:
    # "1.0" predates every dated version; dates compare as strings.
    return "0000-00-00" if version == "1.0" else version


def resolve_openstack(version: str) -> str | None:
    """The concrete OpenStack version for ``version`` ("latest" -> newest), or None."""
    if version == LATEST:
        return OPENSTACK_VERSIONS[-1]
    return version if version in OPENSTACK_VERSIONS else None


def resolve_ec2(version: str) -> str | None:
    """The concrete EC2 version for ``version`` ("latest" -> newest), or None."""
    if version == LATEST:
        return EC2_VERSIONS[-1]
    return version if version in EC2_VERSIONS else None


def openstack_at_least(version: str, since: str) -> bool:
    """True if concrete OpenStack ``version`` is ``since`` or newer."""
    return version >= since


def ec2_at_least(version: str, since: str) -> bool:
    """True if concrete EC2 ``version`` is ``since`` or newer (``since`` may be any date)."""
    return _ec2_key(version) >= _ec2_key(since)


@cache
def openstack_files(version: str, *, has_user_data: bool) -> tuple[str, ...]:
    """The names ``/openstack/<version>/`` lists, in Nova's order."""
    return tuple(
        name
        for name, since in OPENSTACK_FILES
        if openstack_at_least(version, since) and (has_user_data or name != "user_data")
    )


@cache
def meta_data_fields(version: str) -> frozenset[str]:
    """The version-gated ``meta_data.json`` fields present in ``version``."""
    return frozenset(f for f, since in META_DATA_FIELDS_SINCE.items() if openstack_at_least(version, since))


@cache
def ec2_categories(version: str) -> frozenset[str]:
    """The ``meta-data/`` categories (keys of EC2_META_DATA_SINCE) ``version`` carries."""
    return frozenset(c for c, since in EC2_META_DATA_SINCE.items() if ec2_at_least(version, since))


@cache
def ec2_has_dynamic(version: str) -> bool:
    """True if concrete EC2 ``version`` serves ``dynamic/``."""
    return ec2_at_least(version, EC2_DYNAMIC_SINCE)
