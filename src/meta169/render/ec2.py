"""The EC2 tree: ``/``, ``/<version>/``, ``meta-data/``, ``user-data``, ``dynamic/``.

Leaves come from a table: each meta-data category of versions.EC2_META_DATA_SINCE
has a producer that returns its leaves (path under ``meta-data/`` -> text), and
listings are derived from the leaves, so every listed entry resolves. Formats
follow Nova's EC2 emulation [nova api/metadata/base.py get_ec2_metadata,
ec2_md_print] and, past Nova's 2009-04-04, the EC2 user guide.

Decisions (each keeps the "listed means 200" rule and satisfies cloud-init):

- instance-id is the instance UUID. Nova derives ``i-%08x`` from an integer id
  we do not have; cloud-init only needs it stable, and using the UUID keeps the
  EC2 and OpenStack identities equal.
- public-ipv4 and public-hostname are not served: there are no floating IPs, and
  AWS omits both for an instance without a public address.
- block-device-mapping is Nova's for a virtio root disk: ami=vda, root=/dev/vda
  (no ephemeral or swap entries that cloud-init would try to mount).
- public-keys lists only ``ssh`` keys, as ``N=name`` lines [nova base.py comment].
- tags/instance/ is listed only when metadata_options.instance_metadata_tags is
  "enabled" and the instance has a tag whose key AWS allows in metadata.
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Final

from meta169.model import Instance, IPAddress, Network, SSHKey
from meta169.render.document import JSON, OCTETS, TEXT, Document, Share, listing, same
from meta169.render.options import RenderOptions
from meta169.render.versions import (
    EC2_VERSIONS,
    IDENTITY_DOCUMENT_VERSION,
    LATEST,
    ec2_categories,
    ec2_has_dynamic,
    resolve_ec2,
)

# AWS: with tags in metadata allowed, keys may only use these characters and may
# not be "." or ".." or "_index" [EC2 user guide, "Work with instance tags in
# instance metadata"].
_TAG_KEY_RE: Final = re.compile(r"^[A-Za-z0-9+\-=.,_:@]{1,128}$")
_TAG_KEY_RESERVED: Final = frozenset((".", "..", "_index"))


@dataclass(frozen=True, slots=True)
class _Facts:
    """What producers need, computed once per instance."""

    instance: Instance
    networks: Mapping[str, Network]
    local_ipv4: str | None

    @property
    def hostname(self) -> str:
        return self.instance.hostname


Producer = Callable[[_Facts], Mapping[str, str]]


def _one(name: str, value: Callable[[_Facts], str | None]) -> Producer:
    def produce(facts: _Facts) -> Mapping[str, str]:
        text = value(facts)
        return {} if text is None else {name: text}

    return produce


def _public_keys(facts: _Facts) -> Mapping[str, str]:
    # Leaves keep no trailing newline: cloud-init's leaf decoder turns a value
    # holding "\n" into a list of lines.
    return {f"public-keys/{index}/openssh-key": key.data.strip() for index, key in enumerate(_ssh_keys(facts.instance))}


def _ssh_keys(instance: Instance) -> tuple[SSHKey, ...]:
    return tuple(key for key in instance.keys if key.type == "ssh")


def _interfaces(facts: _Facts) -> Mapping[str, str]:
    leaves: dict[str, str] = {}
    groups = "\n".join(facts.instance.security_groups)
    for port in facts.instance.ports:
        base = f"network/interfaces/macs/{port.mac}"
        leaves[f"{base}/device-number"] = str(port.device_number)
        leaves[f"{base}/interface-id"] = port.id
        leaves[f"{base}/local-hostname"] = facts.hostname
        leaves[f"{base}/mac"] = port.mac
        v4 = [ip for ip in port.ips if ip.version == 4]
        if v4:
            leaves[f"{base}/local-ipv4s"] = "\n".join(map(str, v4))
            cidrs = _subnet_cidrs(facts.networks.get(port.network_id), v4[:1])
            if cidrs:
                leaves[f"{base}/subnet-ipv4-cidr-block"] = cidrs[0]
        if groups:
            leaves[f"{base}/security-groups"] = groups
    return leaves


def _interfaces_ipv6(facts: _Facts) -> Mapping[str, str]:
    leaves: dict[str, str] = {}
    for port in facts.instance.ports:
        v6 = [ip for ip in port.ips if ip.version == 6]
        if not v6:
            continue
        base = f"network/interfaces/macs/{port.mac}"
        leaves[f"{base}/ipv6s"] = "\n".join(map(str, v6))
        cidrs = _subnet_cidrs(facts.networks.get(port.network_id), v6)
        if cidrs:
            leaves[f"{base}/subnet-ipv6-cidr-blocks"] = "\n".join(cidrs)
    return leaves


def _subnet_cidrs(network: Network | None, ips: Iterable[IPAddress]) -> list[str]:
    if network is None:
        return []
    cidrs: list[str] = []
    for ip in ips:
        subnet = network.subnet_for(ip)
        if subnet is not None and str(subnet.cidr) not in cidrs:
            cidrs.append(str(subnet.cidr))
    return cidrs


def _tags(facts: _Facts) -> Mapping[str, str]:
    options = facts.instance.metadata_options
    if options is None or options.instance_metadata_tags != "enabled":
        return {}
    return {
        f"tags/instance/{key}": value
        for key, value in facts.instance.tags.items()
        if _TAG_KEY_RE.match(key) and key not in _TAG_KEY_RESERVED
    }


def _primary_mac(instance: Instance) -> str | None:
    port = instance.primary_port
    return port.mac if port is not None else None


def _reservation_id(instance: Instance) -> str:
    # Nova's reservation ids are "r-" + 8 characters; derive them from the UUID so
    # they are stable across renders.
    return "r-" + uuidlib.UUID(instance.uuid).hex[:8]


# One producer per category of versions.EC2_META_DATA_SINCE (a test checks both
# tables name the same categories).
PRODUCERS: Final[Mapping[str, Producer]] = {
    "ami-id": _one("ami-id", lambda f: f.instance.image_id),
    "ami-launch-index": _one("ami-launch-index", lambda f: str(f.instance.launch_index)),
    # Nova serves the literal "FIXME" here; nothing reads it.
    "ami-manifest-path": _one("ami-manifest-path", lambda f: "FIXME"),
    "hostname": _one("hostname", lambda f: f.hostname),
    "instance-id": _one("instance-id", lambda f: f.instance.uuid),
    "local-ipv4": _one("local-ipv4", lambda f: f.local_ipv4),
    "public-keys": _public_keys,
    "reservation-id": _one("reservation-id", lambda f: _reservation_id(f.instance)),
    # Nova lists security-groups even when empty (an empty body).
    "security-groups": _one("security-groups", lambda f: "\n".join(f.instance.security_groups)),
    "local-hostname": _one("local-hostname", lambda f: f.hostname),
    "instance-type": _one("instance-type", lambda f: f.instance.instance_type),
    "block-device-mapping": lambda f: {
        "block-device-mapping/ami": "vda",
        "block-device-mapping/root": "/dev/vda",
    },
    "placement/availability-zone": _one("placement/availability-zone", lambda f: f.instance.availability_zone),
    "instance-action": _one("instance-action", lambda f: "none"),
    "mac": _one("mac", lambda f: _primary_mac(f.instance)),
    "network/interfaces/macs": _interfaces,
    "network/interfaces/macs/ipv6": _interfaces_ipv6,
    "placement/region": _one("placement/region", lambda f: f.instance.region),
    "tags/instance": _tags,
}


def _local_ipv4(instance: Instance) -> str | None:
    # AWS: local-ipv4 is eth0's (device number 0); fall back to any port's IPv4,
    # as Nova takes the first fixed IPv4 of the instance.
    for port in sorted(instance.ports, key=lambda p: p.device_number):
        for ip in port.ips:
            if ip.version == 4:
                return str(ip)
    return None


def _tree(
    leaves: Mapping[str, Document],
    overrides: Mapping[str, tuple[str, ...]],
    listings: dict[tuple[str, ...], Document] | None = None,
    share: Share = same,
) -> dict[str, Document]:
    """Leaves plus a listing for every directory ("" is the top), keyed by relative path.

    ``listings`` memoizes listing documents by their entries across calls.
    """
    children: dict[str, dict[str, None]] = {"": {}}
    for path in leaves:
        parts = path.split("/")
        last = len(parts) - 1
        for depth, part in enumerate(parts):
            parent = "/".join(parts[:depth])
            children.setdefault(parent, {})[part + "/" if depth < last else part] = None
    memo = {} if listings is None else listings
    tree = dict(leaves)
    for directory, names in children.items():
        # Nova prints dict keys sorted [ec2_md_print].
        entries = overrides.get(directory) or tuple(sorted(names))
        doc = memo.get(entries)
        if doc is None:
            doc = memo[entries] = share(listing(entries))
        tree[directory] = doc
    return tree


def identity_document(instance: Instance, options: RenderOptions, private_ip: str | None) -> bytes:
    """The instance identity document, laid out as AWS prints it."""
    document = {
        "accountId": options.account_id,
        "architecture": instance.architecture,
        "availabilityZone": instance.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": instance.image_id or None,
        "instanceId": instance.uuid,
        "instanceType": instance.instance_type,
        "kernelId": None,
        "pendingTime": instance.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "privateIp": private_ip,
        "ramdiskId": None,
        "region": instance.region,
        "version": IDENTITY_DOCUMENT_VERSION,
    }
    return json.dumps(document, indent=2, separators=(",", " : ")).encode()


def _dynamic(instance: Instance, options: RenderOptions, private_ip: str | None, share: Share) -> dict[str, Document]:
    body = identity_document(instance, options, private_ip)
    leaves = {"instance-identity/document": share(Document(JSON, body))}
    if options.identity_signer is not None:
        signature, pkcs7, rsa2048 = options.identity_signer(body)
        leaves["instance-identity/signature"] = share(Document(TEXT, signature.encode()))
        leaves["instance-identity/pkcs7"] = share(Document(TEXT, pkcs7.encode()))
        leaves["instance-identity/rsa2048"] = share(Document(TEXT, rsa2048.encode()))
    return _tree(leaves, {}, share=share)


def render_ec2(instance: Instance, networks: Mapping[str, Network], options: RenderOptions) -> dict[str, Document]:
    """Every EC2 document (``/`` and ``/<version>/...``), keyed by normalized path."""
    tree = Ec2Tree(instance, networks, options)
    docs = tree.root()
    for version in (*EC2_VERSIONS, LATEST):
        docs.update(tree.version(version))
    return docs


class Ec2Tree:
    """One instance's EC2 documents, rendered a version at a time.

    Each category is produced once; versions with the same categories share one
    rendered meta-data tree, and equal listings share one document. ``share`` sees
    every document made and returns the one to keep (an equal one held elsewhere).
    """

    __slots__ = (
        "_dynamic",
        "_facts",
        "_listings",
        "_options",
        "_overrides",
        "_produced",
        "_share",
        "_tops",
        "_trees",
        "_user_data",
    )

    def __init__(
        self, instance: Instance, networks: Mapping[str, Network], options: RenderOptions, share: Share = same
    ) -> None:
        self._facts = _Facts(instance, networks, _local_ipv4(instance))
        self._options = options
        self._share = share
        ssh_names = tuple(f"{i}={key.name}" for i, key in enumerate(_ssh_keys(instance)))
        self._overrides = {"public-keys": ssh_names}
        self._user_data = share(Document(OCTETS, instance.user_data)) if instance.user_data is not None else None
        self._dynamic: dict[str, Document] | None = None
        self._produced: dict[str, dict[str, Document]] = {}
        self._listings: dict[tuple[str, ...], Document] = {}
        self._trees: dict[frozenset[str], dict[str, Document]] = {}
        self._tops: dict[bool, Document] = {}

    def root(self) -> dict[str, Document]:
        """``/``: the version listing."""
        return {"/": self._share(listing((*EC2_VERSIONS, LATEST)))}

    def version(self, version: str) -> dict[str, Document]:
        """Every document under ``/<version>`` (a name of EC2_VERSIONS or ``latest``)."""
        concrete = resolve_ec2(version)
        if concrete is None:
            raise ValueError(f"no EC2 version {version!r}")
        share = self._share
        categories = ec2_categories(concrete)
        tree = self._trees.get(categories)
        if tree is None:
            leaves: dict[str, Document] = {}
            for category in sorted(categories):
                docs_of = self._produced.get(category)
                if docs_of is None:
                    docs_of = self._produced[category] = {
                        path: share(Document(TEXT, value.encode()))
                        for path, value in PRODUCERS[category](self._facts).items()
                    }
                leaves.update(docs_of)
            tree = self._trees[categories] = _tree(leaves, self._overrides, self._listings, share)
        with_dynamic = ec2_has_dynamic(concrete)
        top = self._tops.get(with_dynamic)
        if top is None:
            names = ["dynamic/"] if with_dynamic else []
            names.append("meta-data/")
            if self._user_data is not None:
                names.append("user-data")
            top = self._tops[with_dynamic] = share(listing(names))
        base = f"/{version}"
        docs: dict[str, Document] = {base: top}
        _mount(docs, f"{base}/meta-data", tree)
        if with_dynamic:
            dynamic = self._dynamic
            if dynamic is None:
                facts = self._facts
                dynamic = self._dynamic = _dynamic(facts.instance, self._options, facts.local_ipv4, share)
            _mount(docs, f"{base}/dynamic", dynamic)
        if self._user_data is not None:
            docs[f"{base}/user-data"] = self._user_data
        return docs


def _mount(docs: dict[str, Document], prefix: str, tree: Mapping[str, Document]) -> None:
    for rel, doc in tree.items():
        docs[f"{prefix}/{rel}" if rel else prefix] = doc
