"""The doctor: why a guest cannot reach 169.254.169.254, hop by hop, with evidence and fix.

Pure core first; IO only in the collectors and the CLI:

- ``model``         findings, remedies, hops, reports; the :class:`Check` table row and
                    :func:`evaluate` (fold symptoms into causes, order most important first)
- ``routes``        route tables and policy rules from ``ip -j``, ``ip`` text,
                    /proc/net/route and Windows ``route print``; the kernel's route choice
- ``links``         interfaces and neighbour (ARP/NDP) entries
- ``leases``        option 121/249 from dhclient, systemd-networkd, NetworkManager, udhcpc
- ``knobs``         NOZEROCONF/ifup-eth, NetworkManager and networkd link-local settings,
                    avahi-autoipd, HTTP proxy variables
- ``probes``        live probe results as data, and the probes (through :mod:`meta169.client`)
- ``facts``         :class:`Facts`, parsed from a bundle
- ``bundle``        the support bundle layout; live collection through injected seams
- ``guest``         the guest check table (:data:`guest.CHECKS`) and its path
- ``host``          the host check table (:data:`host.CHECKS`): router rules against
                    :mod:`meta169.plumbing.iptables`, isolated address, proxy listeners,
                    dnsmasq's option 121, serve, the shared secret, the registry
- ``discover``      what ``--host`` checks when nothing is named: the config file, running
                    proxies and serves, labs that are up, Neutron-named namespaces
- ``host_collect``  gathering host facts (``ip netns exec``, /proc, serve, registry)
- ``render``        human (the path with the breaking hop) and JSON output
- ``cli``           ``meta169 doctor``

Knows how the path is built only through the modules that build it (plumbing, proxy
stamp, registry); it never changes the system it diagnoses.
"""

from meta169.doctor.facts import Facts, facts_from_bundle
from meta169.doctor.model import Check, Finding, HopStatus, Remedy, Report, evaluate

__all__ = ["Check", "Facts", "Finding", "HopStatus", "Remedy", "Report", "evaluate", "facts_from_bundle"]
