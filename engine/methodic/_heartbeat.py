"""The uploader's heartbeat: its session on the server, progress out, relayed commands in.

One task per ``AsyncChronicle`` (started with its first run) beats every ``interval`` seconds
with the pool's snapshot (docs/monitor.md). It has an HTTP client of its own with short
timeouts and no retries, and shares no lock with the data path: a slow, failing or absent
server delays only the next beat (with backoff), never an upload. A server without the route
(404: an older server) switches the heartbeat off for good; uploads go on. A beat carries the
files of the unfinished assets too when they are at most ``MAX_FILES`` (in at most 4 assets).

Commands in a beat's answer run through the same controls the TUI uses, each in a task of its
own, and their results ride on the next beat (sent at once when a command finishes). A command
seen again (its acknowledgement was lost) is answered from memory, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import importlib.metadata
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import httpx

from methodic._api import ApiClient
from methodic._bandwidth import parse_rate
from methodic._errors import ChronicleError, InvalidInputError, NotFoundError
from methodic._events import PoolSnapshot
from methodic._ids import new_asset_id
from methodic._retry import RetryPolicy
from methodic._sessions import ACTIONS, snapshot_to_json
from methodic._states import DONE_STATES

log = logging.getLogger("methodic")

DEFAULT_INTERVAL = 5.0
MAX_BACKOFF = 60.0
REMEMBERED_COMMANDS = 1000
MAX_FILES = 200  # a beat carries the files of the unfinished assets when they are this few


class Controlled(Protocol):
    """What a command acts on: the ``AsyncChronicle`` (its operator controls)."""

    async def pause(self, asset_id: str | None = None) -> list[str]: ...
    async def resume(self, asset_id: str | None = None) -> list[str]: ...
    async def retry_failed(self, asset_id: str | None = None) -> list[str]: ...
    async def force_finalize(self, asset_id: str) -> Any: ...
    async def discard(self, asset_id: str) -> None: ...
    async def set_bandwidth(self, max_bandwidth: str | float | None) -> None: ...
    async def snapshot(self, with_components: bool | str = False) -> PoolSnapshot: ...


def interval_from_env(default: float | None) -> float | None:
    """``METHODIC_HEARTBEAT_INTERVAL`` (seconds; 0 turns heartbeats off) over ``default``."""
    text = os.environ.get("METHODIC_HEARTBEAT_INTERVAL")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidInputError(
            f"METHODIC_HEARTBEAT_INTERVAL={text!r} is not a number of seconds (0: off)"
        ) from None
    return value if value > 0 else None


class Heartbeat:
    def __init__(
        self,
        server_url: str,
        api_key: str,
        controlled: Controlled,
        runs: Callable[[], list[dict[str, Any]]],
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.session_id = new_asset_id()
        self.interval = interval
        self.enabled = True  # False once the server said it has no heartbeat route
        self.beats = 0  # answered beats
        self.failures = 0  # beats in a row that got no answer
        self._controlled = controlled
        self._runs = runs
        timeout = min(10.0, max(2.0, interval * 2))
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
            follow_redirects=False,
        )
        self._api = ApiClient(server_url, api_key, self._http, RetryPolicy(max_attempts=1))
        self._info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "version": _version(),
            "started_at": time.time(),
            "interval": interval,
        }
        self._acks: list[dict[str, Any]] = []
        self._seen: OrderedDict[str, dict[str, Any] | None] = OrderedDict()  # None: running
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="methodic-heartbeat")

    async def close(self) -> None:
        """Stop beating; tell the server this session closed (one try, a short wait)."""
        tasks = [t for t in (self._task, *self._commands) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._task is not None and self.enabled and self.beats:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._beat(closed=True), 2.0)
        self._task = None
        await self._http.aclose()

    def beat_now(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                answer = await self._beat()
            except NotFoundError:
                self.enabled = False
                log.info(
                    "the server at %s has no uploader sessions (an older server): "
                    "heartbeats off, uploads go on",
                    self._api.server_url,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a beat hurt the uploads
                self.failures += 1
                log.debug("heartbeat failed (%s: %s)", type(exc).__name__, exc)
            else:
                self.failures = 0
                self.beats += 1
                self._take(answer)
            wait = self.interval * (2 ** min(self.failures, 6)) if self.failures else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, MAX_BACKOFF))
            self._wake.clear()

    async def _beat(self, *, closed: bool = False) -> dict[str, Any]:
        snap = await self._with_files(await self._controlled.snapshot())
        acks = list(self._acks)
        body = {
            "info": {**self._info, "runs": self._runs()},
            "status": snapshot_to_json(snap, DONE_STATES),
            "acks": acks,
            "closed": closed,
        }
        answer = await self._api.beat(self.session_id, body)
        del self._acks[: len(acks)]  # delivered (new ones may have come meanwhile)
        return answer

    async def _with_files(self, snap: PoolSnapshot) -> PoolSnapshot:
        """``snap`` with the files of its unfinished assets, when they are few (and few assets:
        each detailed asset costs one more pool snapshot; finished assets stay without)."""
        open_ = [a for a in snap.assets if a.state not in DONE_STATES]
        if not open_ or len(open_) > 4 or sum(a.component_count for a in open_) > MAX_FILES:
            return snap
        detailed = {}
        for a in open_:
            one = await self._controlled.snapshot(a.asset_id)
            detailed.update({x.asset_id: x for x in one.assets if x.asset_id == a.asset_id})
        return replace(snap, assets=tuple(detailed.get(a.asset_id, a) for a in snap.assets))

    def _take(self, answer: dict[str, Any]) -> None:
        commands = answer.get("commands")
        for command in commands if isinstance(commands, list) else ():
            if not isinstance(command, dict) or not isinstance(command.get("id"), str):
                continue
            cid = command["id"]
            if cid in self._seen:
                done = self._seen[cid]
                if done is not None and done not in self._acks:
                    self._acks.append(done)  # its acknowledgement was lost: say it again
                continue
            self._seen[cid] = None
            while len(self._seen) > REMEMBERED_COMMANDS:
                self._seen.popitem(last=False)
            task = asyncio.create_task(self._run(command), name=f"methodic-command-{cid}")
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _run(self, command: dict[str, Any]) -> None:
        cid = command["id"]
        try:
            result = await self._execute(command)
            ack: dict[str, Any] = {"id": cid, "ok": True, "result": result}
        except asyncio.CancelledError:
            raise
        except (ChronicleError, ValueError) as exc:
            ack = {"id": cid, "ok": False, "error": str(exc)}
        except Exception as exc:
            log.warning("relayed command %s failed", command.get("action"), exc_info=True)
            ack = {"id": cid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        log.info("relayed command %s %s: %s", command.get("action"), cid, ack)
        self._seen[cid] = ack
        self._acks.append(ack)
        self.beat_now()

    async def _execute(self, command: dict[str, Any]) -> Any:
        action, asset_id, value = (
            command.get("action"),
            command.get("asset_id"),
            command.get("value"),
        )
        c = self._controlled
        if action not in ACTIONS:
            raise InvalidInputError(f"unknown command {action!r}")
        if action == "pause":
            return await c.pause(asset_id)
        if action == "resume":
            return await c.resume(asset_id)
        if action == "retry_failed":
            return await c.retry_failed(asset_id)
        if action == "set_bandwidth":
            rate = parse_rate(value)
            await c.set_bandwidth(rate)
            return {"bandwidth_cap": rate}
        if not isinstance(asset_id, str):
            raise InvalidInputError(f"{action} needs an asset id")
        if action == "discard":
            await c.discard(asset_id)
            return [asset_id]
        asset = await c.force_finalize(asset_id)
        return {"asset_id": asset_id, "state": getattr(asset, "state", "finalized")}


def _version() -> str:
    try:
        return importlib.metadata.version("methodic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


async def run_command(
    api: ApiClient,
    session_id: str,
    action: str,
    asset_id: str | None,
    value: float | None,
    *,
    timeout: float,
    poll: float = 0.2,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """Send a command to a session and wait until it is acknowledged, expires, or ``timeout``."""
    if action not in ACTIONS:
        raise InvalidInputError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    cid = new_asset_id()
    body = {"id": cid, "action": action, "asset_id": asset_id, "value": value}
    data = await api.send_command(session_id, body)
    deadline = time.monotonic() + timeout
    while data.get("status") in ("queued", "delivered") and time.monotonic() < deadline:
        await sleep(poll)
        data = await api.get_command(session_id, cid)
    return data
