"""Per-instance token buckets: a guest looping on the metadata service cannot starve
the others. cloud-init's whole crawl is under 100 requests in a burst, so the
default (burst 300, then 50/s sustained) is never hit by a booting guest.

Memory is bounded: buckets exist only for resolved instances, and a full table is
swept of buckets that have refilled (they carry no information).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from meta169.errors import ConfigError
from meta169.http.wire import Bucket, BucketLike


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float = 50.0
    burst: int = 300
    max_buckets: int = 100_000

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ConfigError("rate limit needs rate > 0 and burst >= 1 (or disable it)")


class Buckets:
    """Buckets by instance uuid. ``table`` is shared with the compiled fast path
    (``http.wire``), which takes from the same bucket objects: one budget per
    instance whichever path answers. It is only ever changed in place."""

    __slots__ = ("_burst", "_clock", "_max", "_rate", "table")

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = limit.rate
        self._burst = float(limit.burst)
        self._max = limit.max_buckets
        self._clock = clock
        self.table: dict[str, BucketLike] = {}

    def set_limit(self, limit: RateLimit) -> None:
        """Use ``limit`` from now on (a reload). Buckets start anew, full: the table
        is emptied in place, as the fast path holds it."""
        self._rate = limit.rate
        self._burst = float(limit.burst)
        self._max = limit.max_buckets
        self.table.clear()

    def take(self, key: str) -> float:
        """0.0 when allowed; else the seconds until the next request would be."""
        now = self._clock()
        bucket = self.table.get(key)
        if bucket is None:
            if len(self.table) >= self._max:
                self._sweep(now)
            bucket = self.table[key] = Bucket(self._rate, self._burst, now)
        return bucket.take(now)

    def _sweep(self, now: float) -> None:
        full = [k for k, bucket in self.table.items() if bucket.full(now)]
        for k in full:
            del self.table[k]
        if len(self.table) >= self._max:
            self.table.clear()


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
