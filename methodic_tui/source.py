"""What the dashboard and the headless reporter watch and control: a ``Source``.

A source yields pool snapshots and events, lists the unfinished uploads an earlier process
left, and carries the operator controls. ``EngineSource`` runs the real engine;
``AttachSource`` reads a tracker another process uploads from (read-only); ``StaticSource``
replays fixed data (snapshot tests, the refresh benchmark). No UI library is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from methodic import (
    DONE_STATES,
    IN_FLIGHT_STATES,
    Asset,
    ChronicleError,
    Event,
    PoolSnapshot,
    TrackedAsset,
)

# Files of the selected asset a source gives the dashboard per refresh: an asset of 100,000
# files would cost each refresh ~1 s to snapshot and lay out in full. They are the block of
# that many (in manifest order) that holds the first unfinished file (``detail_window``).
DETAIL_FILES = 1000


def detail_window(items: Sequence[T], finished: Callable[[T], bool]) -> Sequence[T]:
    """The ``DETAIL_FILES`` of ``items`` to show, as the engine's pool chooses them."""
    if len(items) <= DETAIL_FILES:
        return items
    first = next((i for i, c in enumerate(items) if not finished(c)), len(items))
    start = min(first - first % DETAIL_FILES, len(items) - DETAIL_FILES)
    return items[start : start + DETAIL_FILES]


T = TypeVar("T")

EMPTY = PoolSnapshot(
    assets=(), rate=0.0, history=(), total_sent=0, bandwidth_cap=None, workers=0, active_transfers=0
)


class ReadOnlyError(ChronicleError):
    """The control is not available from this view (e.g. ``attach``)."""


@dataclass
class Labels:
    """Who and where, for the header: the server, the run, the tracker."""

    server: str = ""
    run: str = ""
    tracker: str = ""
    mode: str = ""  # e.g. "demo", "upload", "attach (read-only)"
    local_only: bool = False  # an embedded server: the bytes stay on this machine
    cap_known: bool = True  # False: the snapshot's bandwidth cap is not the uploader's


class Source:
    labels: Labels
    read_only: str | None = None  # why the controls are unavailable; None when they work
    job_error: str | None = None  # the job itself stopped on an error

    @property
    def resumable(self) -> bool:
        """What it leaves unfinished can be resumed later (the demo's temporary server cannot)."""
        return True

    async def start(self) -> None:
        """Connect (and start the job); raises ChronicleError on a configuration problem."""

    async def close(self) -> None:
        """Stop; unfinished uploads stay resumable from the tracker."""

    async def tick(self) -> None:
        """Called a few times a second by the view before it reads."""

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        raise NotImplementedError

    def poll_events(self) -> list[Event]:
        return []

    def pending(self) -> list[TrackedAsset]:
        """Uploads an earlier process left unfinished, held here until the operator decides."""
        return []

    async def refresh_pending(self) -> None:
        """Re-read the tracker for ``pending()``."""

    def settled(self) -> bool:
        """Nothing left to do: the job has submitted everything and no asset is in flight."""
        return not any(a.state in IN_FLIGHT_STATES for a in self.snapshot().assets)

    def unfinished(self) -> dict[str, int]:
        """How many assets are not finalized (nor discarded), by state."""
        counts: dict[str, int] = {}
        for a in self.snapshot().assets:
            if a.state not in DONE_STATES:
                counts[a.state] = counts.get(a.state, 0) + 1
        return counts

    # -------------------------------------------------- controls

    def _check(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.read_only)

    async def pause(self, asset_id: str | None = None) -> list[str]:
        self._check()
        return []

    async def resume(self, asset_id: str | None = None) -> list[str]:
        self._check()
        return []

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        self._check()
        return []

    async def force_finalize(self, asset_id: str) -> Asset | None:
        self._check()
        return None

    async def discard(self, asset_id: str) -> None:
        self._check()

    def set_bandwidth(self, rate: float | None) -> None:
        self._check()


@dataclass
class StaticSource(Source):
    """Fixed data, and a record of the controls called (for tests and the benchmark)."""

    fixed: PoolSnapshot = EMPTY
    events: Sequence[Event] = ()
    held: Sequence[TrackedAsset] = ()
    labels: Labels = field(default_factory=Labels)
    read_only: str | None = None
    calls: list[tuple[str, object]] = field(default_factory=list)
    _delivered: bool = False

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        if detail is None:
            return self.fixed
        # Like the pool: components only for the asset asked about.
        return replace(
            self.fixed,
            assets=tuple(
                a if a.asset_id == detail else replace(a, components=()) for a in self.fixed.assets
            ),
        )

    def poll_events(self) -> list[Event]:
        if self._delivered:
            return []
        self._delivered = True
        return list(self.events)

    def pending(self) -> list[TrackedAsset]:
        return list(self.held)

    def settled(self) -> bool:
        return True

    def _record(self, name: str, arg: object) -> None:
        self._check()
        self.calls.append((name, arg))

    async def pause(self, asset_id: str | None = None) -> list[str]:
        self._record("pause", asset_id)
        return []

    async def resume(self, asset_id: str | None = None) -> list[str]:
        self._record("resume", asset_id)
        return []

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        self._record("retry_failed", asset_id)
        return []

    async def force_finalize(self, asset_id: str) -> Asset | None:
        self._record("force_finalize", asset_id)
        return None

    async def discard(self, asset_id: str) -> None:
        self._record("discard", asset_id)

    def set_bandwidth(self, rate: float | None) -> None:
        self._record("set_bandwidth", rate)
        self.fixed = replace(self.fixed, bandwidth_cap=rate)
