"""Guest settings that add link-local routes or put a proxy in front of the metadata address."""

from __future__ import annotations

import pytest

from meta169.doctor import knobs

IFUP_ETH = (
    "# Add Zeroconf route.\n"
    'if [ -z "${NOZEROCONF}" -a "${ISALIAS}" = "no" -a "${REALDEVICE}" != "lo" ]; then\n'
    "    ip route add 169.254.0.0/16 dev ${REALDEVICE} metric $((1000 + $(cat /sys/class/net/${REALDEVICE}/ifindex)))"
    " scope link\nfi\n"
)


@pytest.mark.parametrize(
    ("network", "ifcfg", "adds"),
    [
        ("NETWORKING=yes\n", "DEVICE=eth0\n", True),
        ("NETWORKING=yes\nNOZEROCONF=yes\n", "", False),
        ('NOZEROCONF="no"\n', "", False),  # ifup-eth tests [ -z ]: any value disables it
        ("NOZEROCONF=\n", "", True),
        ("# NOZEROCONF=yes\n", "", True),
        ("", "NOZEROCONF=yes\n", False),  # ifup-eth sources the ifcfg file too
    ],
)
def test_doctor_knobs_nozeroconf_semantics(network: str, ifcfg: str, adds: bool) -> None:
    files = {knobs.IFUP_ETH: IFUP_ETH, knobs.SYSCONFIG_NETWORK: network,
             knobs.IFCFG_DIR + "ifcfg-eth0": ifcfg}  # fmt: skip
    zc = knobs.rhel_zeroconf(files, "eth0")
    assert zc is not None and zc.adds_route is adds
    assert any("ip route add 169.254.0.0/16" in line for line in zc.script_lines)


def test_doctor_knobs_no_ifup_eth_means_no_network_scripts() -> None:
    assert knobs.rhel_zeroconf({knobs.SYSCONFIG_NETWORK: "NETWORKING=yes\n"}, "eth0") is None
    assert knobs.rhel_zeroconf({knobs.IFUP_ETH: "#!/bin/bash\nexit 0\n"}, "eth0") is None


def test_doctor_knobs_networkmanager_link_local_values_and_global_default() -> None:
    files = {
        "/etc/NetworkManager/system-connections/a.nmconnection":
            "[connection]\nid=a\ninterface-name=eth0\n[ipv4]\nmethod=auto\nlink-local=3\n",
        "/etc/NetworkManager/system-connections/b.nmconnection":
            "[connection]\nid=b\n[ipv4]\nmethod=auto\nignore-auto-routes=true\n",
        "/etc/NetworkManager/conf.d/90-ll.conf": "[connection]\nipv4.link-local=2\n",
    }  # fmt: skip
    a, b = knobs.nm_connections(files)
    assert (a.id, a.interface, a.link_local) == ("a", "eth0", "enabled")
    assert (b.link_local, b.ignore_auto_routes) == ("default", True)
    where = "ipv4.link-local=2 in /etc/NetworkManager/conf.d/90-ll.conf"
    assert knobs.nm_global_link_local(files) == ("disabled", where)


def test_doctor_knobs_networkd_etc_masks_run_and_lib() -> None:
    files = {
        "/etc/systemd/network/10-eth.network": "[Match]\nName=eth*\n[Network]\nLinkLocalAddressing=ipv6\n",
        "/run/systemd/network/10-eth.network": "[Match]\nName=eth*\n[Network]\nLinkLocalAddressing=yes\n",
        "/lib/systemd/network/20-ll.network": (
            "[Match]\nName=ens3\n[Network]\nIPv4LLRoute=yes\n[DHCPv4]\nUseRoutes=no\n"
        ),
    }
    eth, ll = knobs.networkd_files(files)
    assert eth.path.startswith("/etc/") and not eth.ipv4ll
    assert eth.matches("eth0") and not eth.matches("ens3")
    assert ll.ipv4ll_route and not ll.use_routes and ll.matches("ens3")


@pytest.mark.parametrize(
    ("no_proxy", "covered", "cidr_only"),
    [
        ("", False, False),
        ("localhost,127.0.0.1", False, False),
        ("localhost,169.254.169.254", True, False),
        ("*", True, False),
        ("10.0.0.0/8,169.254.0.0/16", True, True),
        (" 169.254.169.254 , .corp", True, False),
        ("169.254.169.254.nip.io", False, False),
    ],
)
def test_doctor_knobs_no_proxy_coverage(no_proxy: str, covered: bool, cidr_only: bool) -> None:
    assert knobs.no_proxy_covers(no_proxy) == (covered, cidr_only)


def test_doctor_knobs_proxy_exposure_reads_both_cases_and_redacts() -> None:
    exp = knobs.proxy_exposure({"HTTP_PROXY": "http://u:pw@proxy:3128", "NO_PROXY": "localhost"}, "env")
    assert exp is not None and not exp.covered
    assert exp.variables == ("HTTP_PROXY=http://u:***@proxy:3128",)
    assert knobs.proxy_exposure({"https_proxy": "http://proxy:3128"}, "env") is None  # metadata is http://


def test_doctor_knobs_systemd_default_environment() -> None:
    text = 'DefaultEnvironment="http_proxy=http://p:3128" no_proxy=localhost\n#DefaultEnvironment=x=y\n'
    assert knobs.systemd_default_environment(text) == {"http_proxy": "http://p:3128", "no_proxy": "localhost"}
