"""The engine's event stream and snapshots: what a UI or a reporter needs, never per chunk."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from methodic._states import SENDING_STATES
from methodic._types import RankContribution


@dataclass(frozen=True)
class Event:
    """Base of every engine event: the asset it is about (``None`` for pool-wide ones) and
    ``at``, its Unix time."""

    asset_id: str | None
    at: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        """The event's class name, e.g. ``"ComponentProgress"``."""
        return type(self).__name__

    def to_json(self) -> dict[str, Any]:
        """The event's fields as a JSON-ready dict, with its ``kind`` under ``"event"``."""
        data = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        data["event"] = self.kind
        return data


@dataclass(frozen=True)
class ComponentProgress(Event):
    path: str
    bytes_done: int
    size: int


@dataclass(frozen=True)
class ComponentStateChanged(Event):
    path: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class AssetStateChanged(Event):
    state: str
    error: str | None = None


@dataclass(frozen=True)
class RetryScheduled(Event):
    path: str
    attempt: int
    delay: float
    cause: str


@dataclass(frozen=True)
class AssetFinalized(Event):
    asset_type: str
    total_size: int
    component_count: int


@dataclass(frozen=True)
class RanksChanged(Event):
    """A rank's view of its multi-rank asset changed: its own contribution is stored
    (``contribution_stored``), or the server holds more ranks' contributions stored."""

    rank: int
    world_size: int
    ranks_stored: int
    ranks_missing: tuple[int, ...]
    waiting: str | None
    contribution_stored: bool


@dataclass(frozen=True)
class BandwidthSample(Event):
    rate: float  # bytes/s, EWMA of what was actually sent
    total_sent: int
    cap: float | None


class Subscription:
    """An async iterator of events; ``close()`` (or leaving ``async with``) unsubscribes."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self.maxsize = maxsize
        self.queue: asyncio.Queue[Event] = asyncio.Queue()  # bounded by EventBus.emit
        self.dropped = 0

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()

    def get_nowait(self) -> list[Event]:
        """Every event that has arrived, without waiting."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    def close(self) -> None:
        """Stop receiving events (also on leaving an ``async with`` block)."""
        self._bus.unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fan-out to subscribers, O(1) per event whatever a subscriber's backlog.

    A subscriber that falls ``maxsize`` events behind loses progress samples, never state
    changes; only ten times further behind does it lose its oldest events.
    """

    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def subscribe(self, maxsize: int = 10_000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def emit(self, event: Event) -> None:
        sample = isinstance(event, ComponentProgress | BandwidthSample)
        for sub in self._subs:
            backlog = sub.queue.qsize()
            if backlog >= sub.maxsize and sample:
                sub.dropped += 1
                continue
            if backlog >= sub.maxsize * 10:
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(event)


class RateMeter:
    """Bytes per second as an EWMA, sampled on a timer, with a 60-sample history for sparklines.

    The first sample that sees bytes covers an interval only partly busy, so it says little:
    from there the rate is the plain average since that sample, for ``SETTLE_SAMPLES``
    samples, and the EWMA goes on from that. ``settled`` tells when the rate is worth showing
    (before, a just-started transfer would show a tiny rate and an ETA of days).
    """

    SETTLE_SAMPLES = 1

    def __init__(self, alpha: float = 0.3, history: int = 60) -> None:
        self.alpha = alpha
        self.rate = 0.0
        self.total = 0
        self.history: deque[float] = deque(maxlen=history)
        self._last_total = 0
        self._last_at = time.monotonic()
        self._flow: tuple[int, float] | None = None  # (total, when) at the first sample with bytes
        self._flow_samples = 0  # samples since that one

    @property
    def settled(self) -> bool:
        """Whether enough of the transfer was measured for the rate to mean something."""
        return self._flow_samples >= self.SETTLE_SAMPLES

    def add(self, n: int) -> None:
        """Count ``n`` more bytes handed to the network."""
        self.total += n

    def sample(self) -> float:
        """Fold the bytes counted since the last sample into the rate (bytes/s) and return it."""
        now = time.monotonic()
        dt = now - self._last_at
        if dt <= 0:
            return self.rate
        instant = max(self.total - self._last_total, 0) / dt
        if self._flow is not None and not self.settled:
            self._flow_samples += 1
            self.rate = max(self.total - self._flow[0], 0) / (now - self._flow[1])
        else:
            if self._flow is None and self.total > self._last_total:
                self._flow = (self.total, now)
            self.rate = (
                instant if not self.history else self.alpha * instant + (1 - self.alpha) * self.rate
            )
        self.history.append(self.rate)
        self._last_total, self._last_at = self.total, now
        return self.rate


@dataclass(frozen=True)
class ComponentSnapshot:
    path: str
    state: str
    bytes_done: int
    size: int
    parts_done: int
    part_count: int
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class AssetSnapshot:
    asset_id: str
    asset_type: str
    local_dir: str | None
    state: str
    components_done: int
    component_count: int
    bytes_done: int
    bytes_total: int
    rate: float | None  # None unless uploading with a settled rate meter (a few seconds of data)
    eta: float | None
    last_error: str | None
    components: tuple[ComponentSnapshot, ...] = ()
    # Files in flight now (None: not known, e.g. read from a tracker). Uploading with none in
    # flight is waiting for a worker (or a retry): a UI says "queued", not "uploading".
    files_uploading: int | None = None
    # Of a rank's contribution to a multi-rank asset (docs/distributed.md): its rank, the
    # contributions the server holds stored of world_size, the ranks it still waits for and
    # its one-line account ("waiting for ranks 5, 7 (last seen: ...)"), and whether this
    # rank's own contribution is stored.
    rank: int | None = None
    world_size: int | None = None
    ranks_stored: int | None = None
    ranks_missing: tuple[int, ...] = ()
    waiting: str | None = None
    contribution_stored: bool = False
    contributions: tuple[RankContribution, ...] = ()  # per rank, as the server last said


@dataclass(frozen=True)
class PoolSnapshot:
    """The whole pool at one instant: every asset, the pool's rate (bytes/s, an EWMA) and its
    recent ``history``, bytes sent since start, the bandwidth cap, workers and transfers."""

    assets: tuple[AssetSnapshot, ...]
    rate: float
    history: tuple[float, ...]
    total_sent: int
    bandwidth_cap: float | None
    workers: int
    active_transfers: int

    @property
    def bytes_done(self) -> int:
        """Bytes stored of every asset in the snapshot."""
        return sum(a.bytes_done for a in self.assets)

    @property
    def bytes_total(self) -> int:
        """Bytes of every asset in the snapshot."""
        return sum(a.bytes_total for a in self.assets)

    @property
    def eta(self) -> float | None:
        """Seconds until the assets being sent are sent at the current rate, or ``None``."""
        left = sum(a.bytes_total - a.bytes_done for a in self.assets if a.state in SENDING_STATES)
        return left / self.rate if self.rate > 0 and left else None
