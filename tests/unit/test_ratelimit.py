"""Per-instance token buckets with an injected clock."""

from __future__ import annotations

import pytest

from meta169.api.ratelimit import Buckets, RateLimit, retry_after
from meta169.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ratelimit_burst_then_refuse_then_refill() -> None:
    clock = Clock()
    buckets = Buckets(RateLimit(rate=10, burst=5), clock)
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a")
    assert wait == pytest.approx(0.1)
    clock.now += 0.1
    assert buckets.take("a") == 0.0


def test_ratelimit_instances_are_independent() -> None:
    buckets = Buckets(RateLimit(rate=1, burst=1), Clock())
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_ratelimit_memory_is_bounded() -> None:
    clock = Clock()
    buckets = Buckets(RateLimit(rate=1, burst=2, max_buckets=10), clock)
    for i in range(1000):
        buckets.take(str(i))
        clock.now += 0.001
    assert len(buckets.table) <= 10


def test_ratelimit_cloud_init_crawl_never_limited() -> None:
    buckets = Buckets(RateLimit(), Clock())
    assert all(buckets.take("vm") == 0.0 for _ in range(150))


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30.0, "30")])
def test_ratelimit_retry_after_is_whole_seconds(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0)])
def test_ratelimit_invalid_config(rate: float, burst: int) -> None:
    with pytest.raises(ConfigError):
        RateLimit(rate=rate, burst=burst)
