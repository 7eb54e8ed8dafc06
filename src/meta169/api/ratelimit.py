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


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float = 50.0
    burst: int = 300
    max_buckets: int = 100_000

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ConfigError("rate limit needs rate > 0 and burst >= 1 (or disable it)")


class Buckets:
    __slots__ = ("_burst", "_clock", "_max", "_rate", "_state")

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = limit.rate
        self._burst = float(limit.burst)
        self._max = limit.max_buckets
        self._clock = clock
        self._state: dict[str, list[float]] = {}

    def take(self, key: str) -> float:
        """0.0 when allowed; else the seconds until the next request would be."""
        now = self._clock()
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self._max:
                self._sweep(now)
            self._state[key] = [self._burst - 1.0, now]
            return 0.0
        tokens = min(self._burst, state[0] + (now - state[1]) * self._rate)
        state[1] = now
        if tokens >= 1.0 - 1e-9:  # float refill must not lose a token to rounding
            state[0] = tokens - 1.0
            return 0.0
        state[0] = tokens
        return (1.0 - tokens) / self._rate

    def _sweep(self, now: float) -> None:
        full = [k for k, (tok, last) in self._state.items() if tok + (now - last) * self._rate >= self._burst]
        for k in full:
            del self._state[k]
        if len(self._state) >= self._max:
            self._state.clear()


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
