"""Instruments, snapshots, the merge of workers' snapshots and the text exposition
(meta169.metrics.core), the request classes, and the README's list of metrics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meta169.api.metadata import request_kind
from meta169.metrics.core import Family, Metrics, exposition, from_json, merge, to_json
from meta169.metrics.instruments import (
    UNCLASSIFIED,
    AdminMetrics,
    ProxyMetrics,
    ServeMetrics,
    SyncMetrics,
    class_labels,
    info_family,
    request_class,
)
from meta169.proxy.server import ProxyServer
from meta169.proxy.upstream import Upstream, UpstreamSpec
from tests.scrape import parse, value

README = Path(__file__).resolve().parents[2] / "README.md"


def test_metrics_exposition_of_counters_histograms_gauges() -> None:
    m = Metrics()
    requests = m.counter("t_requests_total", "Requests.", ("code",), known=[("500",)])
    latency = m.histogram("t_latency_seconds", "Latency.", bounds=(0.1, 1.0))
    level = m.gauge("t_level", "Level.")
    plain = m.counter("t_plain_total", "Never moved.")
    requests.inc(("200",))
    requests.inc(("200",), 2)
    for seconds in (0.05, 0.1, 0.5, 3.0):
        latency.observe(seconds)
    level.set(7)
    del plain
    samples = parse(exposition(m.snapshot()).decode())
    assert value(samples, "t_requests_total", code="200") == 3
    assert (
        value(samples, "t_requests_total", code="500") == 0
        and ("t_requests_total", frozenset({("code", "500")})) in samples
    )
    assert ("t_plain_total", frozenset()) in samples  # shown at 0 before the first count
    # le is an upper bound, inclusive: 0.1 lands in the 0.1 bucket; buckets are cumulative
    assert [value(samples, "t_latency_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert value(samples, "t_latency_seconds_count") == 4
    assert value(samples, "t_latency_seconds_sum") == pytest.approx(3.65)
    assert value(samples, "t_level") == 7


def test_metrics_names_follow_the_conventions() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="_total"):
        m.counter("t_requests", "No suffix.")
    m.counter("t_once_total", "Once.")
    with pytest.raises(ValueError, match="defined twice"):
        m.counter("t_once_total", "Twice.")
    with pytest.raises(ValueError, match="increasing"):
        m.histogram("t_bad_seconds", "Bad.", bounds=(1.0, 0.5))


def test_metrics_merge_adds_counters_and_histograms_and_picks_gauges() -> None:
    def worker(count: float, seconds: float, revision: float, age: float) -> list[Family]:
        m = Metrics()
        m.counter("t_requests_total", "R.", ("code",)).inc(("200",), count)
        m.histogram("t_latency_seconds", "L.", bounds=(0.1, 1.0)).observe(seconds)
        m.gauge("t_revision", "Lowest.", merge="min").set(revision)
        m.gauge("t_age_seconds", "Oldest.", merge="max").set(age)
        m.gauge("t_open", "Sum.").set(2)
        return m.snapshot()

    merged = parse(exposition(merge([worker(3, 0.05, 9, 1.5), worker(4, 0.5, 7, 0.5)])).decode())
    assert value(merged, "t_requests_total", code="200") == 7
    assert value(merged, "t_latency_seconds_bucket", le="0.1") == 1
    assert value(merged, "t_latency_seconds_bucket", le="1.0") == 2
    assert value(merged, "t_latency_seconds_sum") == pytest.approx(0.55)
    assert (value(merged, "t_revision"), value(merged, "t_age_seconds"), value(merged, "t_open")) == (7, 1.5, 4)


def test_metrics_merge_refuses_families_that_disagree() -> None:
    a = Family("t_x_total", "counter", "X.", ("a",))
    b = Family("t_x_total", "counter", "X.", ("b",))
    with pytest.raises(ValueError, match="disagree"):
        merge([[a], [b]])


def test_metrics_snapshot_travels_as_json() -> None:
    m = Metrics()
    m.counter("t_requests_total", "R.", ("code", "path")).inc(("200", "fast"), 5)
    m.histogram("t_latency_seconds", "L.", ("path",), bounds=(0.1,)).observe(0.2, ("fast",))
    m.gauge("t_revision", "Rev.", merge="min").set(3)
    snapshot = m.snapshot()
    assert from_json(to_json(snapshot)) == snapshot
    for bad in (b"[{}]", b'[{"name": "x", "kind": "summary"}]', b'{"a": 1}'):
        with pytest.raises(ValueError):
            from_json(bad)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/", ("ec2", "listing")),
        (b"/latest", ("ec2", "listing")),
        (b"/latest/meta-data", ("ec2", "listing")),
        (b"/2009-04-04/meta-data/", ("ec2", "listing")),
        (b"/latest/meta-data/placement/", ("ec2", "listing")),
        (b"/latest/meta-data/instance-id", ("ec2", "document")),
        (b"/latest/meta-data/instance-id?x=1", ("ec2", "document")),
        (b"/1.0/user-data", ("ec2", "user-data")),
        (b"/latest/api/token", ("ec2", "token")),
        (b"/2021-03-23/dynamic/instance-identity/document", ("ec2", "document")),
        (b"/openstack", ("openstack", "listing")),
        (b"/openstack/latest/", ("openstack", "listing")),
        (b"/openstack/2018-08-27/meta_data.json", ("openstack", "document")),
        (b"/openstack/latest/user_data", ("openstack", "user-data")),
        (b"/favicon.ico", ("other", "document")),
    ],
)
def test_metrics_request_kind_of_paths(path: bytes, expected: tuple[str, str]) -> None:
    assert request_kind(path) == expected
    assert class_labels(request_class(*expected)) == expected


def test_metrics_fast_path_classes_fit_the_compiled_table() -> None:
    # _wire.c keeps 16 counters; the last is for entries made without a class.
    assert UNCLASSIFIED < 15
    assert class_labels(15) == ("other", "document")


def test_metrics_readme_lists_every_metric_with_its_labels() -> None:
    families: list[Family] = []
    families += ServeMetrics().snapshot()
    proxy = ProxyMetrics()
    ProxyServer(Upstream(UpstreamSpec(port=1), metrics=proxy), metrics=proxy)
    families += proxy.snapshot()
    families += AdminMetrics().snapshot()
    families += SyncMetrics().snapshot()
    families += info_family("serve", "0", 1)
    text = README.read_text()
    section = text[text.index("## Metrics and logs") :]
    for family in families:
        row = re.search(rf"^\| `{family.name}` \|([^|]*)\|", section, re.M)
        assert row is not None, f"README's metrics table lacks {family.name}"
        listed = sorted(re.findall(r"`(\w+)`", row.group(1)))
        assert listed == sorted(family.labelnames), f"{family.name}: README lists labels {listed}"


def test_metrics_sync_counts_outcomes_and_writes_but_not_a_dry_runs() -> None:
    metrics = SyncMetrics(clock=lambda: 1_700_000_000.0)
    metrics.failed()
    metrics.synced([("add", "instance"), ("add", "network"), ("remove", "instance")], wrote=True)
    metrics.synced([("change", "instance")], wrote=False)  # a dry run
    metrics.synced([], wrote=True)
    scraped = parse(exposition(metrics.snapshot()).decode())
    assert value(scraped, "meta169_sync_runs_total", outcome="failed") == 1
    assert value(scraped, "meta169_sync_runs_total", outcome="changed") == 2
    assert value(scraped, "meta169_sync_runs_total", outcome="unchanged") == 1
    assert value(scraped, "meta169_sync_objects_total", action="add", kind="instance") == 1
    assert value(scraped, "meta169_sync_objects_total", action="remove", kind="instance") == 1
    assert value(scraped, "meta169_sync_objects_total", action="change", kind="instance") == 0
    assert value(scraped, "meta169_sync_objects_total", action="add", kind="router") == 0
    assert value(scraped, "meta169_sync_last_success_timestamp_seconds") == 1_700_000_000.0
    assert value(scraped, "meta169_sync_up") == 1
    metrics.failed()
    assert value(parse(exposition(metrics.snapshot()).decode()), "meta169_sync_up") == 0
