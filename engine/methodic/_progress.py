"""Progress: bytes counted as they are sent, told as throttled events, written behind.

The tracker learns a component's state, bytes and attempts with the next flush (a few times
a second at most, one transaction per tracker), never once per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from methodic import _tracker_ops as ops
from methodic._bandwidth import TokenBucket
from methodic._errors import ChronicleError
from methodic._events import BandwidthSample, ComponentProgress, EventBus, RateMeter
from methodic._states import AssetState
from methodic._tracker import AsyncTracker
from methodic._uploads import AssetUpload, ComponentUpload

log = logging.getLogger("methodic")

FLUSH_INTERVAL = 0.5  # tracker progress writes, at most this often
PROGRESS_INTERVAL = 0.25  # progress events per component, at most this often
SAMPLE_INTERVAL = 1.0  # bandwidth samples


class Progress:
    """Counts bytes, tells them on the event bus, and writes changed components behind."""

    def __init__(
        self, events: EventBus, assets: Mapping[str, AssetUpload], bucket: TokenBucket
    ) -> None:
        self.events = events
        self.meter = RateMeter()
        self._assets = assets
        self._bucket = bucket
        self._dirty: set[tuple[AssetUpload, ComponentUpload]] = set()

    @staticmethod
    def piece_done(c: ComponentUpload, piece: int | None) -> None:
        c.piece_sent.pop(piece, None)
        c.piece_counted.pop(piece, None)
        if not c.piece_sent and not c.piece_counted:  # a dict keeps its table once grown:
            c.piece_sent, c.piece_counted = {}, {}  # 100,000 files would keep 300 bytes each

    def changed(self, up: AssetUpload, c: ComponentUpload) -> None:
        """``c`` changed (state, attempts, bytes): the next flush writes it."""
        self._dirty.add((up, c))

    def sent(self, up: AssetUpload, c: ComponentUpload, n: int, piece: int | None = None) -> None:
        """``n`` more bytes of ``c``'s ``piece`` are sent (negative: a stopped or failed
        attempt's are taken back).

        ``up.bytes_sent`` is net (a taken-back attempt's bytes are sent again). ``c.bytes_done``
        counts each piece at the most any attempt of it sent, so a pause or a retry never moves
        progress back; the next attempt moves it on once it passes that mark.
        """
        up.bytes_sent += n
        sent = max(c.piece_sent.get(piece, 0) + n, 0)
        c.piece_sent[piece] = sent
        counted = c.piece_counted.get(piece, 0)
        if sent > counted:
            c.bytes_done += sent - counted
            c.piece_counted[piece] = sent
        if n > 0:
            up.meter.add(n)
            self.meter.add(n)
        self._dirty.add((up, c))
        now = time.monotonic()
        if now - c.last_event >= PROGRESS_INTERVAL:
            c.last_event = now
            self.events.emit(ComponentProgress(up.asset_id, c.path, c.bytes_done, c.size))

    async def flush(self) -> None:
        """Write every changed component (progress, state, attempts) in one transaction per tracker."""
        dirty, self._dirty = self._dirty, set()
        by_tracker: dict[AsyncTracker, list[ops.ComponentProgressRow]] = {}
        for up, c in dirty:
            if up.tracker is not None:
                by_tracker.setdefault(up.tracker, []).append(
                    ops.ComponentProgressRow(
                        asset_id=up.asset_id,
                        path=c.path,
                        state=c.state,
                        bytes_sent=c.bytes_done,
                        attempts=c.attempts,
                        last_error=c.last_error,
                        checksum=c.checksum,
                    )
                )
        for tracker, rows in by_tracker.items():
            try:
                await tracker.run(ops.record_components(rows))
            except ChronicleError as exc:
                log.warning("could not record progress: %s", exc)

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def sampler(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            rate = self.meter.sample()
            for up in self._assets.values():
                if up.state == AssetState.UPLOADING:
                    up.meter.sample()
            self.events.emit(BandwidthSample(None, rate, self.meter.total, self._bucket.rate))
