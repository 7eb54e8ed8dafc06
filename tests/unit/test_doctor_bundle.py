"""Collecting a guest bundle through injected seams, writing it, reading it back, analysing it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from meta169.doctor import bundle as b
from meta169.doctor import guest
from meta169.doctor.facts import facts_from_bundle
from meta169.errors import CommandFailed, ConfigError
from meta169.plumbing.command import CommandResult

ROUTE_JSON = ('[{"dst":"default","gateway":"10.0.0.1","dev":"eth0","flags":[]},'
              '{"dst":"169.254.0.0/16","dev":"eth0","scope":"link","metric":1002,"flags":[]}]')  # fmt: skip
FILES = {
    "/etc/sysconfig/network": "NETWORKING=yes\n",
    "/etc/NetworkManager/system-connections/wifi.nmconnection": "[connection]\nid=w\n[wifi-security]\npsk=hunter2\n",
    "/var/lib/dhclient/dhclient-eth0.leases": 'lease {\n  interface "eth0";\n  fixed-address 10.0.0.5;\n}\n',
    "/proc/net/route": "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n",
}


def runner(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
    args = tuple(argv)
    if args[:2] == ("nmcli", "-f"):
        raise CommandFailed(args, 127, "nmcli: not found")
    if args == ("ip", "-j", "-4", "route", "show", "table", "all"):
        return CommandResult(args, 0, ROUTE_JSON, "")
    if args[:3] == ("ip", "-j", "-6"):
        return CommandResult(args, 2, "", "Error: IPv6 is disabled")
    return CommandResult(args, 0, "", "")


def glob(pattern: str) -> list[str]:
    import fnmatch

    return [p for p in FILES if fnmatch.fnmatchcase(p, pattern)]


COLLECTOR = b.Collector(runner=runner, read=FILES.get, glob=glob,
                        env={"http_proxy": "http://u:pw@proxy:3128", "HOME": "/root", "no_proxy": "localhost"},
                        processes=lambda: ["sshd", "dhclient", "sshd"])  # fmt: skip


def test_doctor_bundle_collect_records_outputs_files_and_failures() -> None:
    data = b.collect(COLLECTOR)
    assert data["ip-route.json"] == ROUTE_JSON
    assert data["files/etc/sysconfig/network"] == "NETWORKING=yes\n"
    assert data["proc/net/route"].startswith("Iface")
    assert "ip6-route.json" not in data and "nmcli-dhcp4.txt" not in data
    errors = b.meta(data)["errors"]
    assert "IPv6 is disabled" in errors["ip6-route.json"]
    assert "nmcli-dhcp4.txt" not in errors  # an optional tool that is not installed is no news
    assert data["ps.txt"] == "dhclient\nsshd\n"


def test_doctor_bundle_keeps_secrets_out() -> None:
    data = b.collect(COLLECTOR)
    assert "hunter2" not in data["files/etc/NetworkManager/system-connections/wifi.nmconnection"]
    env = json.loads(data["env.json"])
    assert env == {"http_proxy": "http://u:***@proxy:3128", "no_proxy": "localhost"}  # HOME is not collected


def test_doctor_bundle_roundtrip_gives_the_same_analysis(tmp_path: Path) -> None:
    data = b.collect(COLLECTOR)
    b.write_bundle(tmp_path / "bundle", data)
    again = b.read_bundle(tmp_path / "bundle")
    assert again == data
    live = guest.analyse(facts_from_bundle(data))
    offline = guest.analyse(facts_from_bundle(again))
    assert live.findings == offline.findings
    assert [f.id for f in live.findings][:2] == ["proxy-env", "zeroconf-route"]
    assert any("collecting ip6-route.json failed" in n for n in live.notes)


def test_doctor_bundle_refuses_a_non_empty_directory_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        b.write_bundle(tmp_path, {"a": "b"})
    with pytest.raises(ConfigError, match="not a directory"):
        b.read_bundle(tmp_path / "missing")


def test_doctor_bundle_paths() -> None:
    assert b.bundle_path("/etc/sysconfig/network") == "files/etc/sysconfig/network"
    assert b.guest_files({"files/etc/x": "1", "ip-route.txt": "2"}) == {"/etc/x": "1"}
    assert b.redact("psk=abc\nmethod=auto\nwep-key0=zz\n") == "psk=<redacted>\nmethod=auto\nwep-key0=<redacted>\n"


def test_doctor_bundle_a_directory_that_is_not_a_bundle_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"not a doctor bundle: no route table: none of ip-route.json, ip-route.txt"):
        b.read_bundle(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "something-else/2"}\n')
    (tmp_path / "ip-route.txt").write_text("default via 10.0.0.1 dev eth0\n")
    with pytest.raises(ConfigError, match=r"meta.json does not say format 'meta169-doctor-bundle/1'"):
        b.read_bundle(tmp_path)
    # A hand-made bundle: just `ip route > ip-route.txt`.
    (tmp_path / "meta.json").unlink()
    assert set(b.read_bundle(tmp_path)) == {"notes.txt", "ip-route.txt"}


def test_doctor_bundle_offline_on_a_non_bundle_exits_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meta169.cli import main

    (tmp_path / "ip-addr.txt").write_text("1: lo: <LOOPBACK,UP>\n")
    result = CliRunner().invoke(main, ["doctor", "--offline", str(tmp_path)])
    assert result.exit_code == 2
    assert f"--offline {tmp_path} is not a doctor bundle: no route table" in result.output
    assert "meta169 doctor --collect DIR" in result.output
