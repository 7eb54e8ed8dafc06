"""The guest doctor over a corpus of real-world captures.

Each directory of tests/unit/corpus/ is a support bundle as ``meta169 doctor
--collect`` writes it (route tables, neighbours, leases, config files, probes)
plus ``expected.json``: the findings, in order, with their severities, and the
exit code. ``meta169 doctor --offline DIR`` reads the same directories.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from meta169.doctor import guest
from meta169.doctor.bundle import read_bundle
from meta169.doctor.facts import facts_from_bundle
from meta169.doctor.model import Report

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith("_"))  # _host: captures
# One guest per distribution and network stack the doctor reads; each must stay in the corpus.
REQUIRED = {
    "centos6-zeroconf",
    "rhel7-nozeroconf",
    "ubuntu2204-netplan-networkd",
    "debian12-ifupdown-dhclient",
    "alpine-udhcpc",
    "two-nics-wrong-nic",
    "ipv6-only",
    "windows-route-print",
}
COMMANDS = {"ip", "nmcli", "route", "meta169"}


def _report(case: str) -> Report:
    directory = CORPUS / case
    return guest.analyse(facts_from_bundle(read_bundle(directory), label=f"offline bundle {case}"))


def _expected(case: str) -> dict[str, object]:
    data = json.loads((CORPUS / case / "expected.json").read_text())
    assert isinstance(data, dict)
    return data


def test_doctor_corpus_has_every_required_case() -> None:
    assert set(CASES) >= REQUIRED


@pytest.mark.parametrize("case", CASES)
def test_doctor_corpus_finds_the_expected_findings_in_order(case: str) -> None:
    report = _report(case)
    expected = _expected(case)
    got = [{"id": f.id, "severity": f.severity} for f in report.findings]
    assert got == expected["findings"]
    assert (1 if report.has_errors else 0) == expected["exit_code"]
    assert report.notes == ()  # every file of the case parsed


@pytest.mark.parametrize("case", CASES)
def test_doctor_corpus_findings_carry_evidence_and_runnable_fixes(case: str) -> None:
    for finding in _report(case).findings:
        assert finding.evidence, finding.id
        assert finding.summary
        if finding.severity == "error":
            assert finding.fix, finding.id
        for remedy in finding.fix:
            if remedy.argv:
                assert remedy.argv[0] in COMMANDS
                assert shlex.join(remedy.argv) in remedy.text


@pytest.mark.parametrize("case", [c for c in CASES if not _expected(c)["findings"]])
def test_doctor_corpus_healthy_cases_draw_no_broken_hop(case: str) -> None:
    report = _report(case)
    assert report.broken_hop is None
    assert all(h.state != "broken" for h in report.path)


def test_doctor_corpus_seed_names_the_route_line_and_both_fixes() -> None:
    """The seed's story: the exact route line, NOZEROCONF=yes, and the DHCP /32 alternative."""
    report = _report("centos6-zeroconf")
    first = report.findings[0]
    assert first.id == "zeroconf-route" and first.hop == "route"
    assert "ip-route.txt: 169.254.0.0/16 dev eth0  scope link  metric 1002" in first.evidence
    assert any("1000 + ifindex 2" in e for e in first.evidence)
    assert any("FAILED" in e for e in first.evidence)  # the ARP flood, folded in
    texts = [r.text for r in first.fix]
    assert first.fix[0].argv == ("ip", "route", "del", "169.254.0.0/16", "dev", "eth0")
    assert any("NOZEROCONF=yes in /etc/sysconfig/network" in t for t in texts)
    assert any("169.254.169.254/32 via 10.0.0.1 by DHCP option 121" in t for t in texts)
    assert report.broken_hop == "route"


def test_doctor_corpus_isolated_zeroconf_is_only_a_warning() -> None:
    report = _report("centos6-zeroconf-isolated")
    zeroconf = next(f for f in report.findings if f.id == "zeroconf-route")
    assert zeroconf.severity == "warning"
    assert "isolated" in zeroconf.summary


def test_doctor_corpus_wrong_nic_points_at_the_storage_nic() -> None:
    finding = _report("two-nics-wrong-nic").findings[0]
    assert finding.id == "link-local-wrong-nic"
    assert "eth1" in finding.summary and "eth0" in finding.summary
    assert finding.fix[0].argv == ("ip", "route", "del", "169.254.0.0/16", "dev", "eth1")
    assert any("INCOMPLETE" in e for e in finding.evidence)


def test_doctor_corpus_proxy_credentials_never_reach_the_report() -> None:
    report = _report("debian12-proxy-env")
    text = json.dumps(report.to_json())
    assert "s3cret" not in text
    assert "no_proxy=localhost,127.0.0.1,10.0.0.0/8,169.254.169.254" in text


def test_doctor_corpus_ipv6_only_points_at_the_link_local_endpoint() -> None:
    finding = _report("ipv6-only").findings[0]
    assert finding.fix[0].argv == ("meta169", "query", "--url", "http://[fe80::a9fe:a9fe%eth0]/", "/openstack")
