"""Uploader sessions: who uploads, what each has in flight, and commands relayed to them.

Every uploading process (an ``AsyncChronicle`` with runs) beats here every few seconds with its
in-flight assets (``POST /sessions/{id}/beat``, docs/monitor.md). The book keeps the latest
beat of each session in memory; a thread writes the changed ones to SQLite every
``FLUSH_INTERVAL`` seconds, so a beat costs a dict update, never a disk write, and a restarted
server still shows the sessions it knew (as ``lost`` until they beat again). A session silent
for ``lost_after`` seconds is ``lost``; one that said goodbye is ``closed``; either is forgotten
``retention`` seconds after its last beat.

Commands (pause, resume, retry_failed, set_bandwidth, force_finalize, discard) wait in memory
for the session's next beat, are handed out in every beat's answer until the session
acknowledges them, and expire unacknowledged after ``command_ttl``. The sender names each
command with an id: sending it again is harmless.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from methodic.server.db import Database
from methodic.server.errors import APIError

log = logging.getLogger("methodic.server")

FLUSH_INTERVAL = 2.0
ACTIONS = frozenset(
    {"pause", "resume", "retry_failed", "set_bandwidth", "force_finalize", "discard"}
)
NEEDS_ASSET = frozenset({"force_finalize", "discard"})
MAX_COMMANDS = 100  # per session, kept (finished ones are dropped oldest first)
MAX_ID = 128


def _bad(message: str) -> APIError:
    return APIError(422, "invalid_request", message)


@dataclass
class Command:
    id: str
    action: str
    asset_id: str | None
    value: float | None
    sent_at: float
    status: str = "queued"  # queued -> delivered -> done | failed; or expired
    result: Any = None
    error: str | None = None
    acked_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def open(self) -> bool:
        return self.status in ("queued", "delivered")


@dataclass
class Session:
    id: str
    info: dict[str, Any]
    status: dict[str, Any]
    registered_at: float
    last_beat: float
    closed: bool = False
    commands: dict[str, Command] = field(default_factory=dict)

    def state(self, now: float, lost_after: float) -> str:
        if self.closed:
            return "closed"
        return "lost" if now - self.last_beat > lost_after else "live"

    def runs(self) -> list[dict[str, Any]]:
        runs = self.info.get("runs")
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


class SessionBook:
    def __init__(
        self,
        db: Database | None,
        *,
        lost_after: float,
        retention: float,
        command_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.lost_after = lost_after
        self.retention = retention
        self.command_ttl = command_ttl
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_forget = 0.0
        if db is not None:
            self._load(db)

    # -------------------------------------------------- the uploader's side

    def beat(self, session_id: str, body: Any) -> dict[str, Any]:
        """Record a beat (the first one registers the session); answer the open commands."""
        _check_id(session_id, "session id")
        if not isinstance(body, dict):
            raise _bad("a beat is a JSON object")
        info, status, acks = body.get("info"), body.get("status"), body.get("acks", [])
        if not isinstance(info, dict) or not isinstance(status, dict) or not isinstance(acks, list):
            raise _bad("a beat carries `info` and `status` objects and an `acks` list")
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            s = self._sessions.get(session_id)
            if s is None:
                s = self._sessions[session_id] = Session(session_id, info, status, now, now)
                self._gone.discard(session_id)
            s.info, s.status, s.last_beat = info, status, now
            s.closed = bool(body.get("closed", False))
            self._dirty.add(session_id)
            for ack in acks:
                self._ack(s, ack, now)
            out = []
            for c in s.commands.values():
                self._expire(c, now)
                if c.open and not s.closed:
                    c.status = "delivered"
                    out.append(
                        {"id": c.id, "action": c.action, "asset_id": c.asset_id, "value": c.value}
                    )
        return {"commands": out, "lost_after": self.lost_after}

    def _ack(self, s: Session, ack: Any, now: float) -> None:
        if not isinstance(ack, dict):
            return
        c = s.commands.get(str(ack.get("id")))
        if c is None or not c.open:
            return  # unknown, expired or already acknowledged: the first answer stands
        c.status = "done" if ack.get("ok") else "failed"
        c.result = ack.get("result")
        error = ack.get("error")
        c.error = str(error)[:1000] if error is not None else None
        c.acked_at = now

    def _expire(self, c: Command, now: float) -> None:
        if c.open and now - c.sent_at > self.command_ttl:
            c.status = "expired"
            c.error = f"not acknowledged within {self.command_ttl:g} s"

    # -------------------------------------------------- the operator's side

    def list(
        self, experiment_id: str | None = None, run: int | None = None
    ) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            return [
                self._render(s, now)
                for s in sorted(self._sessions.values(), key=lambda s: s.registered_at)
                if _matches(s, experiment_id, run)
            ]

    def get(self, session_id: str) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            return self._render(self._find(session_id), now)

    def send(self, session_id: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Queue a command (or find the one with this id); (command, created)."""
        if not isinstance(body, dict):
            raise _bad("a command is a JSON object")
        cid, action = body.get("id"), body.get("action")
        asset_id, value = body.get("asset_id"), body.get("value")
        cid = _check_id(cid, "command id")
        if action not in ACTIONS:
            raise _bad(f"action must be one of {', '.join(sorted(ACTIONS))}, not {action!r}")
        if asset_id is not None and not isinstance(asset_id, str):
            raise _bad("asset_id must be a string or null")
        if action in NEEDS_ASSET and not asset_id:
            raise _bad(f"{action} needs an asset_id")
        if (
            action == "set_bandwidth"
            and value is not None
            and (not isinstance(value, int | float) or not (math.isfinite(value) and value > 0))
        ):
            raise _bad("set_bandwidth takes a positive number of bytes/s, or null for no cap")
        now = self.clock()
        with self._lock:
            s = self._find(session_id)
            existing = s.commands.get(cid)
            if existing is not None:
                self._expire(existing, now)
                return existing.to_json(), False
            state = s.state(now, self.lost_after)
            if state != "live":
                raise APIError(
                    409,
                    "conflict",
                    f"session {session_id} is {state} (last beat {now - s.last_beat:.0f} s ago): "
                    "nothing would carry the command out",
                )
            c = Command(cid, action, asset_id, float(value) if value is not None else None, now)
            s.commands[cid] = c
            if len(s.commands) > MAX_COMMANDS:
                for old in [k for k, v in s.commands.items() if not v.open][: -MAX_COMMANDS // 2]:
                    del s.commands[old]
            return c.to_json(), True

    def command(self, session_id: str, command_id: str) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            c = self._find(session_id).commands.get(command_id)
            if c is None:
                raise APIError(
                    404, "not_found", f"no command {command_id} for session {session_id}"
                )
            self._expire(c, now)
            return c.to_json()

    def _find(self, session_id: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise APIError(404, "not_found", f"no uploader session {session_id}")
        return s

    def _render(self, s: Session, now: float) -> dict[str, Any]:
        return {
            "id": s.id,
            "state": s.state(now, self.lost_after),
            "info": s.info,
            "status": s.status,
            "registered_at": s.registered_at,
            "last_beat": s.last_beat,
            "now": now,
        }

    def _forget_old(self, now: float) -> None:
        if now - self._last_forget < 1.0:
            return
        self._last_forget = now
        for sid in [k for k, s in self._sessions.items() if now - s.last_beat > self.retention]:
            del self._sessions[sid]
            self._dirty.discard(sid)
            self._gone.add(sid)

    # -------------------------------------------------- persistence

    def _load(self, db: Database) -> None:
        cutoff = self.clock() - self.retention
        rows = db.connection().execute(
            "SELECT id, info, status, registered_at, last_beat, closed FROM uploader_sessions"
        )
        for row in rows.fetchall():
            if row["last_beat"] < cutoff:
                self._gone.add(row["id"])
                continue
            try:
                info, status = json.loads(row["info"]), json.loads(row["status"])
            except ValueError:
                continue
            self._sessions[row["id"]] = Session(
                row["id"], info, status, row["registered_at"], row["last_beat"], bool(row["closed"])
            )

    def start(self) -> None:
        if self.db is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="methodic-sessions", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except Exception as exc:  # a full disk: the sessions stay in memory meanwhile
                log.warning("writing uploader sessions failed (%s); will retry", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.db is not None:
            try:
                self.flush()
            except Exception as exc:
                log.warning("writing uploader sessions failed (%s)", exc)

    def flush(self) -> None:
        """Write the sessions that beat since the last flush; drop the forgotten ones."""
        if self.db is None:
            return
        with self._lock:  # only references here: a beat replaces the dicts, never edits them
            self._forget_old(self.clock())
            taken = [
                (s.id, s.info, s.status, s.registered_at, s.last_beat, int(s.closed))
                for sid in self._dirty
                if (s := self._sessions.get(sid)) is not None
            ]
            gone = list(self._gone)
            self._dirty.clear()
            self._gone.clear()
        rows = [(i, json.dumps(info), json.dumps(st), r, b, c) for i, info, st, r, b, c in taken]
        if not rows and not gone:
            return
        with self.db.write() as tx:
            tx.executemany(
                "INSERT OR REPLACE INTO uploader_sessions "
                "(id, info, status, registered_at, last_beat, closed) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            tx.executemany("DELETE FROM uploader_sessions WHERE id = ?", [(g,) for g in gone])


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID or "/" in value:
        raise _bad(f"{what} must be a non-empty string of at most {MAX_ID} characters, no '/'")
    return value


def _matches(s: Session, experiment_id: str | None, run: int | None) -> bool:
    if experiment_id is None and run is None:
        return True
    return any(
        (experiment_id is None or r.get("experiment_id") == experiment_id)
        and (run is None or r.get("run") == run)
        for r in s.runs()
    )
