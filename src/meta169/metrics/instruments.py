"""What each role measures: the names, labels and help of its metrics.

Names follow the Prometheus conventions: ``meta169_<role>_``, base units in the
name (``_seconds``), ``_total`` on counters. Label values are small fixed sets (a
status class, a reason), never a caller, a path or an instance: those go to the
access log. The exceptions are the proxy's listener gauges, a pair per namespace,
and its upstream gauge, one per ``--upstream`` given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from meta169.metrics.core import Family, Metrics

TREES = ("openstack", "ec2", "other")
KINDS = ("listing", "document", "token", "user-data")
# The compiled fast path counts its answers per class, tree * len(KINDS) + kind,
# carried by each reply it remembers (http.wire); UNCLASSIFIED for one made without.
UNCLASSIFIED = len(TREES) * len(KINDS)

# A compiled fast path's counters: answers per class, latency bucket counts (the
# last for +Inf) and the sum of latencies in seconds (http.wire.FastStats).
FastStats = Callable[[], tuple[Sequence[int], Sequence[int], float]]
# A compiled stamper's count of the requests it forwarded.
StamperCount = Callable[[], int]


def request_class(tree: str, kind: str) -> int:
    return TREES.index(tree) * len(KINDS) + KINDS.index(kind)


def class_labels(index: int) -> tuple[str, str]:
    """(tree, kind) of a fast-path class index."""
    if not 0 <= index < UNCLASSIFIED:
        return ("other", "document")
    return TREES[index // len(KINDS)], KINDS[index % len(KINDS)]


class ServeMetrics(Metrics):
    """``meta169 serve``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self.requests = self.counter(
            "meta169_serve_requests_total",
            "Requests answered, by metadata tree, path kind, status class and the path that answered "
            "(fast: the compiled fast path; python: the Python path).",
            ("tree", "kind", "status", "path"),
        )
        self.duration = self.histogram(
            "meta169_serve_request_duration_seconds",
            "Time from a parsed request to its reply (fast: inside the compiled call; python: the handler, "
            "registry waits included).",
            ("path",),
        )
        self.unknown_callers = self.counter(
            "meta169_serve_unknown_callers_total",
            "Requests refused 404 because no instance matches the caller (unknown), more than one does "
            "(ambiguous) or a Neutron caller names another tenant's instance (tenant).",
            ("reason",),
            [("unknown",), ("ambiguous",), ("tenant",)],
        )
        self.rate_limited = self.counter(
            "meta169_serve_rate_limited_total", "Requests refused 429 by the per-instance rate limit."
        )
        self.tokens_issued = self.counter("meta169_serve_tokens_issued_total", "IMDSv2 session tokens issued.")
        self.tokens_refused = self.counter(
            "meta169_serve_tokens_refused_total",
            "IMDSv2 refusals: token PUTs (method, dated-path, forwarded, ttl) and reads with an invalid or "
            "expired token (invalid) or none where tokens are required (missing).",
            ("reason",),
            [(r,) for r in ("method", "dated-path", "forwarded", "ttl", "invalid", "missing")],
        )
        self.cache = self.counter(
            "meta169_serve_site_cache_lookups_total",
            "Site cache lookups of the Python path: hit, or miss (resolved and rendered from the registry).",
            ("result",),
            [("hit",), ("miss",)],
        )
        self.registry_reads = self.histogram(
            "meta169_serve_registry_read_duration_seconds",
            "Registry reads resolving callers not cached (a batch of first requests each), by where they "
            "ran: loop (SQLite on the event loop), connection (PostgreSQL's connection on the event loop) "
            "or thread (the registry thread).",
            ("via",),
        )
        self.polls = self.counter(
            "meta169_serve_registry_polls_total",
            "Polls of the registry's revision counter.",
            ("result",),
            [("ok",), ("failed",)],
        )
        self.revision = self.gauge(
            "meta169_serve_registry_revision",
            "Registry revision the site cache is current with (the lowest of the workers).",
            merge="min",
        )
        # Monotonic time of the last successful poll; its age is read at scrape time.
        self.last_poll = clock()
        self.reader(self._poll_age)
        # The listeners' compiled fast paths, read at scrape time.
        self.fast_paths: list[FastStats] = []
        self.reader(self._fast_families)
        self.registry_up = self.gauge(
            "meta169_serve_registry_up",
            "1 while the registry answers, 0 while it cannot be reached (cached callers are then served "
            "stale, others get 503); the lowest of the workers.",
            merge="min",
        )
        self.registry_up.set(1)
        self.stale_answers = self.counter(
            "meta169_serve_stale_answers_total",
            "Answers given from the cache while the registry could not be reached (both paths).",
        )
        # The fast path's answers during outages: its total when the current one
        # began, and what the past ones added.
        self._fast_at_outage: int | None = None
        self._fast_stale = 0
        self.reader(self._fast_stale_family)

    def poll_ok(self, revision: int) -> None:
        self.polls.inc(("ok",))
        self.revision.set(revision)
        self.last_poll = self._clock()

    def registry_state(self, up: bool) -> None:
        """The registry became reachable (``up``) or unreachable."""
        self.registry_up.set(1 if up else 0)
        if not up:
            self._fast_at_outage = self._fast_total()
        elif self._fast_at_outage is not None:
            self._fast_stale += self._fast_total() - self._fast_at_outage
            self._fast_at_outage = None

    def _fast_total(self) -> int:
        return sum(sum(stats()[0]) for stats in self.fast_paths)

    def _fast_stale_family(self) -> Iterable[Family]:
        # Named like stale_answers: snapshot() adds the compiled path's share to it.
        stale = Family(self.stale_answers.family.name, "counter", "")
        during = 0 if self._fast_at_outage is None else self._fast_total() - self._fast_at_outage
        stale.values[()] = float(self._fast_stale + during)
        return (stale,)

    def _poll_age(self) -> Iterable[Family]:
        age = Family(
            "meta169_serve_registry_poll_age_seconds",
            "gauge",
            "Seconds since the last successful registry poll (since start before the first); the oldest of "
            "the workers.",
            merge="max",
        )
        age.values[()] = max(0.0, self._clock() - self.last_poll)
        return (age,)

    def _fast_families(self) -> Iterable[Family]:
        """The compiled path's share of the request count and the latency histogram,
        as families named like the Python path's (snapshot() adds them up)."""
        requests = Family(self.requests.family.name, "counter", "", self.requests.family.labelnames)
        duration = self.duration.family
        latency = Family(duration.name, "histogram", "", duration.labelnames, bounds=duration.bounds)
        for stats in self.fast_paths:
            counts, buckets, total = stats()
            for index, count in enumerate(counts):
                if count:
                    tree, kind = class_labels(index)
                    # The fast path only repeats document replies, all 200 OK.
                    key = (tree, kind, "2xx", "fast")
                    requests.values[key] = requests.values.get(key, 0.0) + count
            if len(buckets) == len(duration.bounds) + 1 and any(buckets):
                series = latency.buckets.setdefault(("fast",), [0.0] * (len(duration.bounds) + 2))
                for i, count in enumerate(buckets):
                    series[i] += count
                series[-1] += total
        return (requests, latency)


class ProxyMetrics(Metrics):
    """``meta169 proxy``."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = self.counter("meta169_proxy_connections_total", "Guest connections accepted.")
        self.requests = self.counter(
            "meta169_proxy_requests_total",
            "Guest requests forwarded, by the path that stamped them (fast: compiled; python).",
            ("path",),
            [("python",)],
        )
        self.upstream_errors = self.counter(
            "meta169_proxy_upstream_errors_total",
            "Guest requests answered with an error of the hop to serve: 502 (no upstream reachable, connection "
            "closed, bad reply), 503 (wait queue full), 504 (no reply in time, waiting included).",
            ("code",),
            [("502",), ("503",), ("504",)],
        )
        self.upstream_duration = self.histogram(
            "meta169_proxy_upstream_duration_seconds",
            "Time from handing a request to the hop to serve (connecting, waiting for a connection and "
            "sending again included) to having its whole reply.",
        )
        self.retries = self.counter(
            "meta169_proxy_upstream_retries_total",
            "Requests sent to serve again: connect (a connection to an upstream could not be opened; nothing "
            "was sent), lost (a connection closed before any byte of the reply).",
            ("reason",),
            [("connect",), ("lost",)],
        )
        self.queue_wait = self.histogram(
            "meta169_proxy_upstream_queue_wait_seconds",
            "Time requests waited for a connection to serve, every upstream's connections being busy "
            "(only requests that waited).",
        )
        # Compiled stampers of the open listeners; what they forwarded before a
        # listener closed is kept in ``stamped_closed``.
        self.stampers: dict[object, StamperCount] = {}
        self.stamped_closed = 0
        self.reader(self._stamped)

    def watch_upstreams(
        self,
        states: Callable[[], Sequence[tuple[str, bool]]],
        waiting: Callable[[], int],
        loads: Callable[[], Sequence[tuple[str, int, int]]],
    ) -> None:
        """Read at every scrape: each upstream's address and whether it is marked up,
        the number of requests waiting for a connection, and each upstream's replies
        ever and requests outstanding."""

        def read() -> Iterable[Family]:
            up = Family(
                "meta169_proxy_upstream_up",
                "gauge",
                "1 while an upstream (serve node) is marked up, 0 while down (connect or health check failed); "
                "with --workers, 0 while any worker has it down.",
                ("upstream",),
                merge="min",
            )
            for name, is_up in states():
                up.values[(name,)] = 1.0 if is_up else 0.0
            queued = Family("meta169_proxy_upstream_queued", "gauge", "Requests waiting for a connection to serve now.")
            queued.values[()] = float(waiting())
            replies = Family(
                "meta169_proxy_upstream_replies_total",
                "counter",
                "Replies read from each upstream (serve node); each guest keeps to one node while it is up.",
                ("upstream",),
            )
            outstanding = Family(
                "meta169_proxy_upstream_outstanding",
                "gauge",
                "Requests sent to each upstream whose replies are not read yet.",
                ("upstream",),
            )
            for name, read, pending in loads():
                replies.values[(name,)] = float(read)
                outstanding.values[(name,)] = float(pending)
            return (up, queued, replies, outstanding)

        self.reader(read)

    def forget_stamper(self, key: object) -> None:
        count = self.stampers.pop(key, None)
        if count is not None:
            self.stamped_closed += count()

    def _stamped(self) -> Iterable[Family]:
        fast = Family(self.requests.family.name, "counter", "", ("path",))
        fast.values[("fast",)] = float(self.stamped_closed + sum(count() for count in self.stampers.values()))
        return (fast,)


class AdminMetrics(Metrics):
    """``meta169 admin``."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = self.counter(
            "meta169_admin_writes_total",
            "Writes to the registry through the admin API, by kind (put: create or replace an instance, "
            "network or router, delete, import) and HTTP status code (a put that created answers 201).",
            ("kind", "code"),
        )


# What a sync counts: each attempt's outcome, and the writes it made by action and kind.
SYNC_OUTCOMES = ("changed", "unchanged", "failed")
SYNC_ACTIONS = ("add", "change", "remove")
SYNC_KINDS = ("instance", "network", "router")


class SyncMetrics(Metrics):
    """``meta169 sync libvirt|openstack --watch``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        self.syncs = self.counter(
            "meta169_sync_runs_total",
            "Syncs of the source into the registry, by outcome: changed (writes made; planned, for a dry run), "
            "unchanged (the registry already matched), failed (nothing written: the source unreachable or read "
            "partway, invalid data, a conflict, the registry).",
            ("outcome",),
            [(o,) for o in SYNC_OUTCOMES],
        )
        self.objects = self.counter(
            "meta169_sync_objects_total",
            "Registry writes made by syncs: instances, networks and routers added, changed and removed "
            "(a dry run writes nothing and counts nothing).",
            ("action", "kind"),
            [(a, k) for a in SYNC_ACTIONS for k in SYNC_KINDS],
        )
        self.last_success = self.gauge(
            "meta169_sync_last_success_timestamp_seconds",
            "Unix time of the last successful sync (0 before the first).",
            merge="max",
        )
        self.last_success.set(0.0)
        self.up = self.gauge(
            "meta169_sync_up",
            "1 while the last sync succeeded, 0 after a failed one (and before the first).",
            merge="min",
        )
        self.up.set(0.0)

    def synced(self, changes: Iterable[tuple[str, str]], *, wrote: bool) -> None:
        """A sync succeeded; ``changes`` are its planned (action, kind) pairs, written unless a dry run."""
        planned = list(changes)
        for action, kind in planned if wrote else ():
            self.objects.inc((action, kind))
        self.syncs.inc(("changed" if planned else "unchanged",))
        self.last_success.set(self._clock())
        self.up.set(1.0)

    def failed(self) -> None:
        self.syncs.inc(("failed",))
        self.up.set(0.0)


def info_family(role: str, version: str, processes: int) -> list[Family]:
    """The families every scrape ends with: what answered, and how many processes it covers."""
    info = Family("meta169_info", "gauge", "Always 1: the role and version of this process.", ("role", "version"))
    info.values[(role, version)] = 1.0
    procs = Family(
        "meta169_metrics_processes",
        "gauge",
        "Processes whose numbers this scrape covers (serve --workers N: N when every worker answered).",
    )
    procs.values[()] = float(processes)
    return [info, procs]
