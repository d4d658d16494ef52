"""When to retry, and how long to wait: exponential backoff with full jitter."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` tries in all, each wait drawn uniformly from [0, min(cap, base * 2**n)].

    ``max_elapsed`` bounds the time spent on one component (or one API call) across attempts.
    A ``Retry-After`` from the server is honoured as given, up to ``retry_after_cap``.

    Retried: connection errors, read/write errors, timeouts, 5xx, 408 and 429. An expired
    presigned target is presigned again (not counted as a retry). Other 4xx fail the component
    at once with the server's message. Every control-API call methodic makes is idempotent and
    retried the same way.
    """

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 20.0
    max_elapsed: float = 600.0
    retry_after_cap: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``: the server's ``Retry-After`` when it
        gave one (capped), else a full-jitter exponential backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return random.uniform(0, min(self.cap, self.base * 2 ** max(attempt - 1, 0)))


def is_transient_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def is_transient_exception(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError)


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None
