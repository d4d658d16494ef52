"""Uploader sessions as the server reports them (docs/monitor.md), and snapshots on the wire.

A beat carries a ``PoolSnapshot`` as JSON (``snapshot_to_json``); the monitor rebuilds it
(``snapshot_from_json``), so the dashboard shows a remote uploader exactly as a local one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from methodic._events import AssetSnapshot, ComponentSnapshot, PoolSnapshot

ACTIONS = ("pause", "resume", "retry_failed", "set_bandwidth", "force_finalize", "discard")
MAX_ASSETS_PER_BEAT = 500  # in flight; a few finished ones more
RECENT_DONE_PER_BEAT = 20


def asset_to_json(a: AssetSnapshot, with_components: bool = True) -> dict[str, Any]:
    data = asdict(a)
    if not a.components or not with_components:
        del data["components"]
    return data


def asset_from_json(data: dict[str, Any]) -> AssetSnapshot:
    known = AssetSnapshot.__dataclass_fields__
    fields = {k: v for k, v in data.items() if k in known and k != "components"}
    comps = tuple(
        ComponentSnapshot(
            **{k: v for k, v in c.items() if k in ComponentSnapshot.__dataclass_fields__}
        )
        for c in data.get("components") or ()
        if isinstance(c, dict)
    )
    return AssetSnapshot(**fields, components=comps)


def snapshot_to_json(snap: PoolSnapshot, done_states: frozenset[str]) -> dict[str, Any]:
    """The pool for a beat: its unfinished assets (at most 500, with their files when the
    snapshot has them) and the last finished ones (without)."""
    unfinished = [a for a in snap.assets if a.state not in done_states][:MAX_ASSETS_PER_BEAT]
    finished = [a for a in snap.assets if a.state in done_states][-RECENT_DONE_PER_BEAT:]
    return {
        "assets": [asset_to_json(a, False) for a in finished]
        + [asset_to_json(a) for a in unfinished],
        "rate": snap.rate,
        "total_sent": snap.total_sent,
        "bandwidth_cap": snap.bandwidth_cap,
        "workers": snap.workers,
        "active_transfers": snap.active_transfers,
    }


def snapshot_from_json(data: dict[str, Any]) -> PoolSnapshot:
    assets = data.get("assets")
    cap = data.get("bandwidth_cap")
    return PoolSnapshot(
        assets=tuple(asset_from_json(a) for a in assets if isinstance(a, dict))
        if isinstance(assets, list)
        else (),
        rate=float(data.get("rate") or 0.0),
        history=(),
        total_sent=int(data.get("total_sent") or 0),
        bandwidth_cap=float(cap) if cap is not None else None,
        workers=int(data.get("workers") or 0),
        active_transfers=int(data.get("active_transfers") or 0),
    )


@dataclass(frozen=True)
class UploaderSession:
    """One uploading process as the server last heard of it.

    ``state``: ``live``, ``lost`` (no beat for the server's lost-after time) or ``closed``
    (the process said goodbye). ``age``: seconds since its last beat, by the server's clock.
    """

    id: str
    state: str
    host: str
    pid: int
    user: str
    version: str
    runs: tuple[dict[str, Any], ...]
    last_beat: float
    age: float
    snapshot: PoolSnapshot
    heartbeat_interval: float | None = None
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UploaderSession:
        info = data.get("info") if isinstance(data.get("info"), dict) else {}
        assert isinstance(info, dict)
        status = data.get("status") if isinstance(data.get("status"), dict) else {}
        assert isinstance(status, dict)
        runs = info.get("runs") if isinstance(info.get("runs"), list) else []
        assert isinstance(runs, list)
        interval = info.get("interval")
        return cls(
            id=str(data["id"]),
            state=str(data.get("state", "live")),
            host=str(info.get("host", "?")),
            pid=int(info.get("pid") or 0),
            user=str(info.get("user", "")),
            version=str(info.get("version", "")),
            runs=tuple(r for r in runs if isinstance(r, dict)),
            last_beat=float(data.get("last_beat") or 0.0),
            age=max(float(data.get("now") or 0.0) - float(data.get("last_beat") or 0.0), 0.0),
            snapshot=snapshot_from_json(status),
            heartbeat_interval=float(interval) if isinstance(interval, int | float) else None,
            info=info,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "host": self.host,
            "pid": self.pid,
            "user": self.user,
            "version": self.version,
            "runs": list(self.runs),
            "last_beat": self.last_beat,
            "age": self.age,
            "rate": self.snapshot.rate,
            "bandwidth_cap": self.snapshot.bandwidth_cap,
            "assets": [asset_to_json(a) for a in self.snapshot.assets],
        }


@dataclass(frozen=True)
class CommandResult:
    """What became of a relayed command: ``done``/``failed`` (acknowledged), ``expired``, or
    still ``queued``/``delivered`` when the sender stopped waiting (``acknowledged`` False)."""

    id: str
    session_id: str
    action: str
    asset_id: str | None
    status: str
    result: Any = None
    error: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status in ("done", "failed")

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @classmethod
    def from_json(cls, session_id: str, data: dict[str, Any]) -> CommandResult:
        return cls(
            id=str(data["id"]),
            session_id=session_id,
            action=str(data.get("action", "")),
            asset_id=data.get("asset_id"),
            status=str(data.get("status", "")),
            result=data.get("result"),
            error=data.get("error"),
        )
