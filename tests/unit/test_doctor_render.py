"""Rendering reports: the path with the breaking hop, findings with evidence and fix, JSON."""

from __future__ import annotations

import json
from pathlib import Path

from meta169.doctor import guest
from meta169.doctor.bundle import read_bundle
from meta169.doctor.facts import facts_from_bundle
from meta169.doctor.model import Report
from meta169.doctor.render import render_human, render_json

SEED = Path(__file__).parent / "corpus" / "centos6-zeroconf"


def seed_report() -> Report:
    return guest.analyse(facts_from_bundle(read_bundle(SEED), label="offline bundle centos6-zeroconf"))


def test_doctor_render_human_draws_the_path_and_marks_the_broken_hop() -> None:
    text = render_human(seed_report())
    assert "guest ✓ → route ✗ → gateway - → REDIRECT · → proxy · → server · → registry ·" in text
    lines = text.splitlines()
    route = next(i for i, line in enumerate(lines) if line.startswith("  ✗ route"))
    assert "169.254.0.0/16 dev eth0  scope link  metric 1002" in lines[route]
    assert "the path breaks here" in lines[route + 1]
    assert "1. ✗ error   zeroconf-route  [route]" in text
    assert "now:     ip route del 169.254.0.0/16 dev eth0" in text
    assert "NOZEROCONF=yes in /etc/sysconfig/network" in text


def test_doctor_render_ascii_has_no_unicode() -> None:
    text = render_human(seed_report(), unicode=False)
    assert text.isascii()
    assert "route XX" in text and "^-- the path breaks here" in text


def test_doctor_render_json_is_complete_and_ordered() -> None:
    doc = json.loads(render_json(seed_report(), exit_code=1))
    assert doc["kind"] == "guest" and doc["exit_code"] == 1 and doc["broken_hop"] == "route"
    assert [h["hop"] for h in doc["path"]] == ["guest", "route", "next-hop", "redirect", "proxy", "server", "registry"]
    first = doc["findings"][0]
    assert set(first) == {"id", "severity", "hop", "title", "summary", "evidence", "fix"}
    assert first["fix"][0] == {
        "when": "now",
        "text": "ip route del 169.254.0.0/16 dev eth0   (lost at the next network restart)",
        "command": ["ip", "route", "del", "169.254.0.0/16", "dev", "eth0"],
    }
    assert doc["summary"] == {"error": 1, "warning": 2, "info": 0}


def test_doctor_render_says_so_when_nothing_is_wrong() -> None:
    report = Report("guest", "test", (), ())
    assert "No findings" in render_human(report)
