"""The OpenStack tree: ``/openstack``, ``/openstack/<version>/`` and its files.

Formats follow openstack/nova ``nova/api/metadata/base.py`` (listings,
meta_data.json, vendor data) and ``nova/virt/netutils.py`` (network_data.json).
Pure: knows nothing of HTTP, callers or the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meta169.model import Instance, IPAddress, Network, Port, Subnet
from meta169.render.document import (
    OCTETS,
    Document,
    Share,
    json_document,
    listing,
    same,
    seeded_json_document,
)
from meta169.render.options import RenderOptions
from meta169.render.versions import (
    LATEST,
    OPENSTACK_VERSIONS,
    meta_data_fields,
    openstack_files,
    resolve_openstack,
)

# Nova names the link after the tap device Neutron plugs: "tap" + port id, cut to
# the 14-character interface name limit [nova network/neutron.py devname,
# network/model.py NIC_NAME_LEN].
_NIC_NAME_LEN = 14


def meta_data(instance: Instance, fields: frozenset[str]) -> Document:
    """meta_data.json for a version whose gated fields are ``fields``."""
    # Key order is Nova's insertion order in _metadata_as_json; json.dumps keeps it.
    head: dict[str, Any] = {"uuid": instance.uuid}
    if instance.metadata:
        head["meta"] = dict(instance.metadata)
    if instance.keys:
        # Nova shows the instance's keypair whatever its type; we may hold several.
        head["public_keys"] = {key.name: key.data for key in instance.keys}
        head["keys"] = [{"name": k.name, "type": k.type, "data": k.data} for k in instance.keys]
    head["hostname"] = instance.hostname
    head["name"] = instance.name
    head["launch_index"] = instance.launch_index
    head["availability_zone"] = instance.availability_zone
    tail: dict[str, Any] = {}
    if "project_id" in fields:
        tail["project_id"] = instance.project_id
    if "devices" in fields:
        # Nova lists tagged devices only; we hold no device tags.
        tail["devices"] = []
    if "dedicated_cpus" in fields:
        # Nova: the pinned pCPUs of the NUMA topology, [] when unpinned.
        tail["dedicated_cpus"] = []
    if "random_seed" in fields:
        return seeded_json_document(head, tail)
    return json_document({**head, **tail})


def network_data(instance: Instance, networks: Mapping[str, Network]) -> dict[str, Any]:
    """network_data.json as Nova's netutils.get_network_metadata builds it.

    One link per port that has an address in a known subnet; per link the first
    IPv4 and the first IPv6 subnet holding one of its addresses become networks.
    DHCP subnets (without an IPv6 address mode) get Nova's short form with no
    address, routes or services. ``mtu`` is the network's: Nova gives null only
    when a legacy DHCP port exists, and the guest learns nothing from null.
    """
    if not instance.ports:
        # Nova renders "{}" when the instance has no network info at all.
        return {}
    links: list[dict[str, Any]] = []
    nets: list[dict[str, Any]] = []
    services: list[dict[str, str]] = []
    for port in sorted(instance.ports, key=lambda p: p.device_number):
        network = networks.get(port.network_id)
        if network is None:
            continue
        found = [hit for hit in (_first_subnet(network, port, 4), _first_subnet(network, port, 6)) if hit]
        if not found:
            continue
        link_id = ("tap" + port.id)[:_NIC_NAME_LEN]
        links.append(
            {
                "id": link_id,
                "vif_id": port.id,
                # Nova says "phy" for any VIF type outside its legacy list; a
                # model port carries no binding type, and cloud-init treats every
                # known physical type alike.
                "type": "phy",
                "mtu": network.mtu,
                "ethernet_mac_address": port.mac,
            }
        )
        for subnet, ip in found:
            nets.append(_network_entry(network, link_id, subnet, ip, len(nets)))
            for entry in _dns_services(subnet):
                if entry not in services:
                    services.append(entry)
    return {"links": links, "networks": nets, "services": services}


def _first_subnet(network: Network, port: Port, version: int) -> tuple[Subnet, IPAddress] | None:
    # Nova only sees the subnets the port has a fixed IP on, and uses the first
    # of each IP version with that subnet's first port IP.
    for subnet in network.subnets:
        if subnet.version != version:
            continue
        for ip in port.ips:
            if ip in subnet.cidr:
                return subnet, ip
    return None


def _network_entry(network: Network, link_id: str, subnet: Subnet, ip: IPAddress, num: int) -> dict[str, Any]:
    version = subnet.version
    if subnet.ipv6_mode is not None:
        kind = f"ipv6_{subnet.ipv6_mode}"
    elif subnet.dhcp:
        return {
            "id": f"network{num}",
            "type": f"ipv{version}_dhcp",
            "link": link_id,
            "network_id": network.id,
        }
    else:
        kind = f"ipv{version}"
    routes: list[dict[str, str]] = []
    if subnet.gateway is not None:
        anywhere = "0.0.0.0" if version == 4 else "::"
        routes.append({"network": anywhere, "netmask": anywhere, "gateway": str(subnet.gateway)})
    for route in subnet.host_routes:
        routes.append(
            {
                "network": str(route.destination.network_address),
                "netmask": str(route.destination.netmask),
                "gateway": str(route.nexthop),
            }
        )
    return {
        "id": f"network{num}",
        "type": kind,
        "link": link_id,
        "ip_address": str(ip),
        "netmask": str(subnet.cidr.netmask),
        "routes": routes,
        "network_id": network.id,
        "services": _dns_services(subnet),
    }


def _dns_services(subnet: Subnet) -> list[dict[str, str]]:
    return [{"type": "dns", "address": str(dns)} for dns in subnet.dns]


def vendor_data(instance: Instance, options: RenderOptions) -> dict[str, Any]:
    """vendor_data.json: the operator's static JSON, overridden by the instance's own."""
    return {**options.static_vendor_data, **(instance.vendor_data or {})}


def vendor_data2(static: Mapping[str, Any], options: RenderOptions) -> dict[str, Any]:
    """vendor_data2.json: ``{"static": ..., <provider>: <json>}``.

    A dynamic provider named like an existing key is dropped, as Nova does
    (_vendor_data2 "Removing duplicate metadata key").
    """
    merged: dict[str, Any] = {"static": dict(static)}
    for name, value in options.vendor_data2_dynamic.items():
        merged.setdefault(name, value)
    return merged


def render_openstack(
    instance: Instance, networks: Mapping[str, Network], options: RenderOptions
) -> dict[str, Document]:
    """Every document under ``/openstack``, keyed by normalized path."""
    tree = OpenStackTree(instance, networks, options)
    docs = tree.root()
    for version in (*OPENSTACK_VERSIONS, LATEST):
        docs.update(tree.version(version))
    return docs


class OpenStackTree:
    """One instance's OpenStack documents, rendered a version at a time.

    Each file is rendered once for every version listing it, and versions sharing
    a field set share one meta_data.json document. ``share`` sees every document
    made and returns the one to keep (an equal one held elsewhere).
    """

    __slots__ = ("_files", "_instance", "_meta", "_networks", "_options", "_share")

    def __init__(
        self, instance: Instance, networks: Mapping[str, Network], options: RenderOptions, share: Share = same
    ) -> None:
        self._instance = instance
        self._networks = networks
        self._options = options
        self._share = share
        self._files: dict[str, Document] = {}
        self._meta: dict[frozenset[str], Document] = {}

    def root(self) -> dict[str, Document]:
        """``/openstack``: the version listing."""
        return {"/openstack": self._share(listing((*OPENSTACK_VERSIONS, LATEST)))}

    def version(self, version: str) -> dict[str, Document]:
        """Every document under ``/openstack/<version>`` (a name of OPENSTACK_VERSIONS
        or ``latest``)."""
        concrete = resolve_openstack(version)
        if concrete is None:
            raise ValueError(f"no OpenStack version {version!r}")
        names = openstack_files(concrete, has_user_data=self._instance.user_data is not None)
        base = f"/openstack/{version}"
        docs: dict[str, Document] = {base: self._share(listing(names))}
        for name in names:
            if name == "password":
                # Served by the API layer from the registry (paths.is_password_path).
                continue
            docs[f"{base}/{name}"] = self._meta_data(concrete) if name == "meta_data.json" else self._file(name)
        return docs

    def _meta_data(self, concrete: str) -> Document:
        fields = meta_data_fields(concrete)
        meta = self._meta.get(fields)
        if meta is None:
            meta = self._meta[fields] = self._share(meta_data(self._instance, fields))
        return meta

    def _file(self, name: str) -> Document:
        doc = self._files.get(name)
        if doc is not None:
            return doc
        instance, options = self._instance, self._options
        if name == "vendor_data.json":
            doc = json_document(vendor_data(instance, options))
        elif name == "vendor_data2.json":
            doc = json_document(vendor_data2(vendor_data(instance, options), options))
        elif name == "network_data.json":
            doc = json_document(network_data(instance, self._networks))
        elif name == "user_data" and instance.user_data is not None:
            doc = Document(OCTETS, instance.user_data)
        else:
            raise ValueError(f"no OpenStack file {name!r}")
        doc = self._files[name] = self._share(doc)
        return doc
