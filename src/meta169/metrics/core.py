"""Instruments, their scrape-time snapshots, the merge of workers' snapshots, and the
Prometheus text exposition.

An instrument is a dict of plain numbers keyed by label values: an increment is one
dict update and takes no lock, because every count is made on the event loop's
thread (registry threads never count; their callers do, once the result is back).
At scrape time :meth:`Metrics.snapshot` reads the instruments, and the readers
registered with :meth:`Metrics.reader` (numbers held elsewhere: the compiled fast
path's counters, the open listeners, the age of a poll), into :class:`Family`
values; :func:`merge` adds up the families of several processes and
:func:`exposition` renders them with ``prometheus_client`` (its metric families and
``generate_latest``: the text format version 0.0.4).
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
# How a gauge of several processes becomes one: counters and histograms always add up.
Merge = Literal["sum", "max", "min"]
Labels = tuple[str, ...]

# Request latency in seconds: the compiled path answers in microseconds, the Python
# path in tens of them, a miss waits for the registry (milliseconds), a slow
# registry or dynamic vendor data (Nova's default timeout is 5 s) for seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def status_class(status: int) -> str:
    """``"2xx"`` for 200..299, and so on."""
    return f"{status // 100}xx"


@dataclass(slots=True)
class Family:
    """One metric family as read at a scrape.

    ``values`` holds a counter's or a gauge's value per label values; ``buckets``
    a histogram's counts per bucket (not cumulative; ``len(bounds) + 1`` of them, the
    last for +Inf) followed by the sum of the observations.
    """

    name: str
    kind: Kind
    help: str
    labelnames: Labels = ()
    values: dict[Labels, float] = field(default_factory=dict)
    bounds: tuple[float, ...] = ()
    buckets: dict[Labels, list[float]] = field(default_factory=dict)
    merge: Merge = "sum"

    def copy(self) -> Family:
        return Family(
            self.name,
            self.kind,
            self.help,
            self.labelnames,
            dict(self.values),
            self.bounds,
            {k: list(v) for k, v in self.buckets.items()},
            self.merge,
        )

    def absorb(self, other: Family) -> None:
        """Add ``other`` (the same family from another process) into this one."""
        if other.kind != self.kind or other.labelnames != self.labelnames or other.bounds != self.bounds:
            raise ValueError(f"metric {self.name}: processes disagree on its kind, labels or buckets")
        for labels, value in other.values.items():
            have = self.values.get(labels)
            if have is None:
                self.values[labels] = value
            elif self.kind != "gauge" or self.merge == "sum":
                self.values[labels] = have + value
            elif self.merge == "max":
                self.values[labels] = max(have, value)
            else:
                self.values[labels] = min(have, value)
        for labels, counts in other.buckets.items():
            mine = self.buckets.get(labels)
            if mine is None:
                self.buckets[labels] = list(counts)
            else:
                for i, count in enumerate(counts):
                    mine[i] += count


class Counter:
    """A monotonically increasing count per label values."""

    __slots__ = ("family", "values")

    def __init__(self, family: Family) -> None:
        self.family = family
        self.values = family.values

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount


class Gauge:
    """A value per label values that goes up and down."""

    __slots__ = ("family", "values")

    def __init__(self, family: Family) -> None:
        self.family = family
        self.values = family.values

    def set(self, value: float, labels: Labels = ()) -> None:
        self.values[labels] = value


class Histogram:
    """Observations counted into fixed buckets (``le`` upper bounds), with their sum."""

    __slots__ = ("bounds", "family", "series")

    def __init__(self, family: Family) -> None:
        self.family = family
        self.bounds = family.bounds
        self.series = family.buckets

    def observe(self, value: float, labels: Labels = ()) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        # Bucket i counts bounds[i-1] < value <= bounds[i] (Prometheus ``le``).
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value


Reader = Callable[[], Iterable[Family]]


class Metrics:
    """One process's instruments and readers. Subclasses name a role's instruments."""

    def __init__(self) -> None:
        self._families: list[Family] = []
        self._readers: list[Reader] = []

    def _family(self, family: Family) -> Family:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} defined twice")
        self._families.append(family)
        return family

    def counter(self, name: str, help: str, labelnames: Labels = (), known: Iterable[Labels] = ()) -> Counter:
        """A counter; it and its ``known`` label values show 0 before the first count,
        so a rate over them exists from the start (a series that appears later loses
        its first increase to ``rate()``)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        family = self._family(Family(name, "counter", help, labelnames))
        for labels in known if labelnames else [()]:
            if len(labels) != len(labelnames):
                raise ValueError(f"counter {name}: {labels} does not match {labelnames}")
            family.values[labels] = 0.0
        return Counter(family)

    def gauge(self, name: str, help: str, labelnames: Labels = (), merge: Merge = "sum") -> Gauge:
        return Gauge(self._family(Family(name, "gauge", help, labelnames, merge=merge)))

    def histogram(
        self, name: str, help: str, labelnames: Labels = (), bounds: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Histogram:
        if list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram {name}: bounds must be finite and increasing")
        return Histogram(self._family(Family(name, "histogram", help, labelnames, bounds=bounds)))

    def reader(self, read: Reader) -> None:
        """Call ``read`` at every scrape for families whose numbers live elsewhere."""
        self._readers.append(read)

    def snapshot(self) -> list[Family]:
        """Copies of every family now, the readers' included; a reader's family named
        like an instrument's is added to it (the compiled path's share of a count)."""
        out = [f.copy() for f in self._families]
        for read in self._readers:
            out.extend(read())
        return merge([out])


def merge(snapshots: Sequence[Sequence[Family]]) -> list[Family]:
    """One list of families from several processes' snapshots, in first-seen order."""
    out: dict[str, Family] = {}
    for snapshot in snapshots:
        for family in snapshot:
            have = out.get(family.name)
            if have is None:
                out[family.name] = family.copy()
            else:
                have.absorb(family)
    return list(out.values())


def to_json(families: Sequence[Family]) -> bytes:
    """A snapshot as one line of JSON (what a worker sends the process that scrapes)."""
    return json.dumps(
        [
            {
                "name": f.name,
                "kind": f.kind,
                "help": f.help,
                "labelnames": f.labelnames,
                "values": [[k, v] for k, v in f.values.items()],
                "bounds": f.bounds,
                "buckets": [[k, v] for k, v in f.buckets.items()],
                "merge": f.merge,
            }
            for f in families
        ],
        separators=(",", ":"),
    ).encode()


def from_json(data: bytes) -> list[Family]:
    """The inverse of :func:`to_json`; ValueError for anything else."""
    try:
        raw = json.loads(data)
        return [
            Family(
                name=str(f["name"]),
                kind=_kind(f["kind"]),
                help=str(f["help"]),
                labelnames=tuple(str(n) for n in f["labelnames"]),
                values={tuple(str(x) for x in k): float(v) for k, v in f["values"]},
                bounds=tuple(float(b) for b in f["bounds"]),
                buckets={tuple(str(x) for x in k): [float(c) for c in v] for k, v in f["buckets"]},
                merge=_merge(f["merge"]),
            )
            for f in raw
        ]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a metrics snapshot: {exc}") from exc


_KINDS: dict[object, Kind] = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}
_MERGES: dict[object, Merge] = {"sum": "sum", "max": "max", "min": "min"}


def _kind(value: object) -> Kind:
    kind = _KINDS.get(value)
    if kind is None:
        raise ValueError(f"unknown metric kind {value!r}")
    return kind


def _merge(value: object) -> Merge:
    merge = _MERGES.get(value)
    if merge is None:
        raise ValueError(f"unknown gauge merge {value!r}")
    return merge


class _Frozen:
    """A prometheus_client collector over families already read."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for f in self._families:
            labelnames = list(f.labelnames)
            if f.kind == "counter":
                counter = CounterMetricFamily(f.name, f.help, labels=labelnames)
                for labels, value in sorted(f.values.items()):
                    counter.add_metric(list(labels), value)
                yield counter
            elif f.kind == "gauge":
                gauge = GaugeMetricFamily(f.name, f.help, labels=labelnames)
                for labels, value in sorted(f.values.items()):
                    gauge.add_metric(list(labels), value)
                yield gauge
            else:
                histogram = HistogramMetricFamily(f.name, f.help, labels=labelnames)
                # As Go writes floats, like prometheus_client's own buckets: 0.005, 1.0, 2.5.
                edges = [*(repr(float(b)) for b in f.bounds), "+Inf"]
                for labels, counts in sorted(f.buckets.items()):
                    cumulative: list[tuple[str, float]] = []
                    total = 0.0
                    for edge, count in zip(edges, counts, strict=False):
                        total += count
                        cumulative.append((edge, total))
                    histogram.add_metric(list(labels), cumulative, counts[-1])
                yield histogram


def exposition(families: Sequence[Family]) -> bytes:
    """The Prometheus text exposition of ``families``."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frozen(families))  # type: ignore[arg-type]
    return generate_latest(registry)


# The Content-Type of :func:`exposition`'s bytes (prometheus_client.CONTENT_TYPE_LATEST).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
