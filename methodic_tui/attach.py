"""``methodic-tui attach``: watch a tracker that another process on this host uploads from.

This view reads the tracker file (SQLite, WAL: safe to read while it writes) once a second.
Rates come from how fast the recorded bytes grow, and events from state changes between two
reads. Without a server it is read-only; with ``--server-url``/``--api-key`` its keys act in
the uploading process, relayed through the server to that process's session on this host
(docs/monitor.md).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from methodic import (
    DONE_STATES,
    AssetFinalized,
    AssetSnapshot,
    AssetStateChanged,
    AsyncChronicle,
    ChronicleError,
    ComponentSnapshot,
    Event,
    PoolSnapshot,
    RateMeter,
    TrackedAsset,
    TrackedComponent,
    UploaderSession,
    UploadTracker,
)
from methodic_tui.engine_source import ConfigError
from methodic_tui.options import Options
from methodic_tui.relay import COMMAND_TIMEOUT, Relay, RelayedControls
from methodic_tui.source import EMPTY, Labels, Source, detail_window

RECENT = 3600.0  # finished assets stay listed for an hour
READ_ONLY = (
    "attached: controls act in the process that uploads; this view only watches "
    "(stop that process and run `methodic-tui resume` to take over)"
)


def component_snapshot(c: TrackedComponent) -> ComponentSnapshot:
    parts = math.ceil(c.size / c.part_size) if c.part_size else 0
    done = c.size if c.state == "completed" else c.bytes_sent
    return ComponentSnapshot(
        c.path, c.state, done, c.size, len(c.parts_done), parts, c.attempts, c.last_error
    )


def _completed(c: TrackedComponent) -> bool:
    return c.state == "completed"


class AttachSource(RelayedControls, Source):
    """``relay_to``: the server (URL and key) the uploading process beats to; None: read-only."""

    def __init__(
        self,
        tracker_path: Path,
        *,
        poll: float = 1.0,
        clock: Callable[[], float] = time.time,
        relay_to: Options | None = None,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.path = tracker_path
        self.poll = poll
        self.clock = clock
        self.relay_to = relay_to if relay_to is not None and relay_to.server_url else None
        self.command_timeout = command_timeout
        self.read_only = None if self.relay_to is not None else READ_ONLY
        self.chronicle: AsyncChronicle | None = None
        self._notices: deque[Event] = deque()
        # The tracker does not record the uploader's bandwidth cap: say so, not "no cap".
        self.labels = Labels(tracker=str(tracker_path), mode="attach", cap_known=False)
        self.tracker: UploadTracker | None = None
        self.meter = RateMeter()
        self._snapshot = EMPTY
        self._states: dict[str, str] = {}
        self._bytes: dict[str, tuple[int, float]] = {}
        self._events: list[Event] = []
        self._detail: str | None = None
        self._detail_components: tuple[ComponentSnapshot, ...] = ()
        self._last_poll = -math.inf
        self._since = 0.0

    async def start(self) -> None:
        if not self.path.exists():
            raise ConfigError(f"no tracker at {self.path}; pass the uploading process's --tracker")
        self.tracker = await asyncio.to_thread(UploadTracker, self.path)
        self._since = self.clock() - RECENT
        await self._read(first=True)
        if self.relay_to is not None:
            opts = self.relay_to
            self.labels.server = opts.server_url or ""
            self.chronicle = AsyncChronicle(opts.server_url, opts.api_key, 1, heartbeat_interval=0)
            await self.chronicle.open()
            self.relay = Relay(self.chronicle, self._notices, self.command_timeout)
            await self.chronicle.sessions()  # a wrong key or URL is a setup error (exit 2)

    async def targets(self, asset_id: str | None) -> list[UploaderSession]:
        """The live sessions of this host that report ``asset_id`` (or any asset shown here)."""
        assert self.chronicle is not None
        host = socket.gethostname()
        wanted = {asset_id} if asset_id else {a.asset_id for a in self._snapshot.assets}
        found = [
            s
            for s in await self.chronicle.sessions()
            if s.state == "live"
            and s.host == host
            and any(a.asset_id in wanted for a in s.snapshot.assets)
        ]
        if not found:
            raise ChronicleError(
                f"no live uploader on {host} reports {asset_id or 'these uploads'} to "
                f"{self.labels.server}: is it running, against this server, with heartbeats on?"
            )
        return found

    async def close(self) -> None:
        self.cancel_relayed()
        if self.chronicle is not None:
            await self.chronicle.close()
            self.chronicle = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    async def tick(self) -> None:
        if time.monotonic() - self._last_poll >= self.poll:
            await self._read()

    async def _read(self, first: bool = False) -> None:
        assert self.tracker is not None
        self._last_poll = time.monotonic()
        tracked = await asyncio.to_thread(self.tracker.list_assets, None)
        detail = self._detail
        if detail is not None:
            full = await asyncio.to_thread(self.tracker.get_asset, detail)
            comps = detail_window(full.components if full else (), _completed)
            self._detail_components = tuple(component_snapshot(c) for c in comps)
        shown = [t for t in tracked if t.state not in DONE_STATES or t.updated_at >= self._since]
        total = sum(t.bytes_sent for t in shown)
        if first:
            self.meter.add(total)
            self.meter.sample()
            self.meter.history.clear()
        else:
            self.meter.add(max(total - self.meter.total, 0))
            self.meter.sample()
        assets = tuple(self._asset(t, first, detail) for t in shown)
        self._snapshot = PoolSnapshot(
            assets=assets,
            rate=self.meter.rate,
            history=tuple(self.meter.history),
            total_sent=total,
            bandwidth_cap=None,
            workers=0,
            active_transfers=sum(a.state == "uploading" for a in assets),
        )

    def _asset(self, t: TrackedAsset, first: bool, detail: str | None) -> AssetSnapshot:
        now = time.monotonic()
        prev = self._states.get(t.asset_id)
        if not first and prev != t.state:
            self._events.append(AssetStateChanged(t.asset_id, t.state, t.last_error))
            if t.state == "finalized":
                self._events.append(
                    AssetFinalized(t.asset_id, t.asset_type, t.total_bytes, t.component_count)
                )
        self._states[t.asset_id] = t.state
        done = t.total_bytes if t.state == "finalized" else t.bytes_sent
        last_bytes, last_at = self._bytes.get(t.asset_id, (done, now))
        rate = (done - last_bytes) / (now - last_at) if now > last_at and done > last_bytes else 0.0
        self._bytes[t.asset_id] = (done, now)
        return AssetSnapshot(
            asset_id=t.asset_id,
            asset_type=t.asset_type,
            local_dir=t.local_dir,
            state=t.state,
            components_done=t.completed_count,
            component_count=t.component_count,
            bytes_done=done,
            bytes_total=t.total_bytes,
            rate=rate,
            eta=(t.total_bytes - done) / rate if rate > 0 else None,
            last_error=t.last_error,
            components=self._detail_components if t.asset_id == detail else (),
        )

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        self._detail = detail
        return self._snapshot

    def poll_events(self) -> list[Event]:
        events, self._events = self._events, []
        while self._notices:
            events.append(self._notices.popleft())
        return events

    def unfinished(self) -> dict[str, int]:
        return {} if self.relay_to is not None else super().unfinished()
