"""``methodic-tui monitor``: every uploader the server hears from, as one dashboard Source.

The server keeps each uploading process's last beat (its pool snapshot); this source reads
them every ``poll`` seconds and shows their assets together, each named with its uploader
(``ckpt-3 @node7:4242``). A lost uploader's unfinished assets show ``lost`` with its last beat;
a closed one's show ``interrupted``. The controls are relayed to the uploader that owns the
asset (``relay.Relay``) and the acknowledgement is logged.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from methodic import (
    DONE_STATES,
    AssetSnapshot,
    AssetStateChanged,
    AsyncChronicle,
    ChronicleError,
    Event,
    PoolSnapshot,
    UploaderSession,
)
from methodic_tui import format as fmt
from methodic_tui.engine_source import ConfigError
from methodic_tui.notices import Notice
from methodic_tui.options import Options
from methodic_tui.relay import COMMAND_TIMEOUT, Relay, RelayedControls
from methodic_tui.source import EMPTY, Labels, Source

LOST = "lost"


def lost_note(s: UploaderSession) -> str:
    return f"uploader {s.label} lost: last beat {fmt.clock(s.last_beat)} ({s.age:.0f} s ago)"


def merged(sessions: list[UploaderSession]) -> tuple[PoolSnapshot, dict[str, UploaderSession]]:
    """One snapshot of every session's assets, and which session owns each asset."""
    owners: dict[str, UploaderSession] = {}
    assets: list[AssetSnapshot] = []
    for s in sessions:
        for a in s.snapshot.assets:
            owners[a.asset_id] = s
            assets.append(_as_shown(s, a))
    live = [s for s in sessions if s.state == "live"]
    caps = {s.snapshot.bandwidth_cap for s in live}
    snap = PoolSnapshot(
        assets=tuple(assets),
        rate=sum(s.snapshot.rate for s in live),
        history=(),
        total_sent=sum(s.snapshot.total_sent for s in sessions),
        bandwidth_cap=caps.pop() if len(caps) == 1 else None,
        workers=sum(s.snapshot.workers for s in live),
        active_transfers=sum(s.snapshot.active_transfers for s in live),
    )
    return snap, owners


def _as_shown(s: UploaderSession, a: AssetSnapshot) -> AssetSnapshot:
    where = f"{a.local_dir or a.asset_type} @{s.label}"
    if a.state in DONE_STATES or s.state == "live":
        return replace(a, local_dir=where)
    if s.state == LOST:
        return replace(a, local_dir=where, state=LOST, rate=None, eta=None, last_error=lost_note(s))
    return replace(a, local_dir=where, state="interrupted", rate=None, eta=None)


class MonitorSource(RelayedControls, Source):
    def __init__(
        self,
        options: Options,
        *,
        experiment: str | None = None,
        run: int | None = None,
        poll: float = 1.0,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        if options.server_url is None or options.api_key is None:
            raise ConfigError(
                "monitor reads the server the uploaders report to: pass --server-url and "
                "--api-key (or set METHODIC_SERVER_URL and METHODIC_API_KEY)"
            )
        self.options = options
        self.experiment = experiment
        self.run = run
        self.poll = poll
        self.command_timeout = command_timeout
        where = [
            f"experiment {experiment}" if experiment else "",
            f"run {run}" if run is not None else "",
        ]
        self.labels = Labels(
            server=options.server_url, run=", ".join(w for w in where if w), mode="monitor"
        )
        self.sessions: list[UploaderSession] = []
        self.chronicle: AsyncChronicle | None = None
        self.relay: Relay | None = None
        self._snapshot = self._without_files = EMPTY
        self._owners: dict[str, UploaderSession] = {}
        self._states: dict[str, str] = {}  # session id -> state, at the last read
        self._asset_states: dict[str, str] = {}
        self._events: deque[Event] = deque()
        self._history: deque[float] = deque(maxlen=60)
        self._last_poll = -1e18

    async def start(self) -> None:
        url, key = self.options.server_url, self.options.api_key
        try:
            # heartbeat 0: the monitor is no uploader; one worker: it never uploads.
            self.chronicle = AsyncChronicle(url, key, 1, heartbeat_interval=0)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        await self.chronicle.open()
        self.relay = Relay(self.chronicle, self._events, self.command_timeout)
        await self.read(first=True)  # a wrong key or URL is a setup error (exit 2)

    async def close(self) -> None:
        self.cancel_relayed()
        if self.chronicle is not None:
            await self.chronicle.close()
            self.chronicle = None

    async def tick(self) -> None:
        if time.monotonic() - self._last_poll >= self.poll:
            try:
                await self.read()
            except ChronicleError as exc:  # the server went away: say so, keep the last view
                self._events.append(Notice(None, "warn", f"cannot read the server: {exc}"))
                self._last_poll = time.monotonic()

    async def read(self, first: bool = False) -> None:
        assert self.chronicle is not None
        self._last_poll = time.monotonic()
        self.sessions = await self.chronicle.sessions(self.experiment, self.run)
        snap, self._owners = merged(self.sessions)
        self._history.append(snap.rate)
        self._snapshot = replace(snap, history=tuple(self._history))
        self._without_files = replace(
            self._snapshot, assets=tuple(replace(a, components=()) for a in snap.assets)
        )
        live = [s for s in self.sessions if s.state == "live"]
        self.labels.cap_known = len({s.snapshot.bandwidth_cap for s in live}) <= 1
        for s in self.sessions:
            self._tell(s, self._states.get(s.id), first)
            self._states[s.id] = s.state
        for a in snap.assets:
            prev = self._asset_states.get(a.asset_id)
            if not first and prev != a.state and a.state != LOST:
                self._events.append(AssetStateChanged(a.asset_id, a.state, a.last_error))
            self._asset_states[a.asset_id] = a.state

    def _tell(self, s: UploaderSession, before: str | None, first: bool) -> None:
        if before == s.state:
            return
        who = f"uploader {s.label} ({s.user}, methodic {s.version})"
        if s.state == LOST:
            self._events.append(Notice(None, "error", lost_note(s)))
        elif s.state == "closed" and not first:
            self._events.append(Notice(None, "info", f"uploader {s.label} closed"))
        elif s.state == "live":
            self._events.append(
                Notice(None, "info", f"{who} is back" if before == LOST else f"{who} is uploading")
            )

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        return self._snapshot if detail is not None else self._without_files

    def poll_events(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        return events

    def settled(self) -> bool:
        return False  # watching never finishes by itself

    def unfinished(self) -> dict[str, int]:
        return {}  # leaving the monitor stops no upload

    # -------------------------------------------------- controls, relayed

    async def targets(self, asset_id: str | None) -> list[UploaderSession]:
        if asset_id is None:
            return [s for s in self.sessions if s.state == "live"]
        s = self._owners.get(asset_id)
        if s is None:
            raise ChronicleError(f"no uploader reports asset {asset_id}")
        return [s]
