"""A token bucket shared by every worker of a Chronicle, and rate parsing ("200MB")."""

from __future__ import annotations

import asyncio
import re
import time

from methodic._errors import InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*?)(?:/s|ps)?\s*$", re.IGNORECASE)


def parse_rate(value: str | float | int | None) -> float | None:
    """Bytes per second from ``200MB``, ``1.5GiB/s``, ``500k`` or a number; None or 0 means no cap."""
    if value is None:
        return None
    if isinstance(value, int | float):
        rate = float(value)
    else:
        m = _RATE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidInputError(
                f"bandwidth {value!r} is not a rate; write it like 200MB, 1.5GiB or 500k (bytes per second)"
            )
        rate = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if rate < 0:
        raise InvalidInputError(f"bandwidth {value!r} is negative")
    return rate or None


class TokenBucket:
    """Grants bytes at ``rate`` per second with a burst of a quarter second; None is unlimited."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        self._refill()
        self._rate = rate or None

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate:
            burst = max(self._rate / 4, 64 * 1024)
            self._tokens = min(burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        if not self._rate:
            return
        async with self._lock:  # first come, first served: no worker starves
            while True:
                self._refill()
                rate = self._rate
                if not rate or self._tokens >= min(n, max(rate / 4, 64 * 1024)):
                    self._tokens -= n
                    return
                await asyncio.sleep(min((n - self._tokens) / rate, 0.25))
