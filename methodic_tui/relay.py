"""Controls relayed through the server to the process that uploads (docs/monitor.md).

``monitor`` (every uploader on every host) and ``attach`` (one tracker on this host) act on
uploads that run in another process: each control becomes a command for that process's
session, and the acknowledgement (or its absence) is what the operator is told.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from methodic import AsyncChronicle, ChronicleError, CommandResult, Event, UploaderSession
from methodic_tui import format as fmt
from methodic_tui.notices import Notice

COMMAND_TIMEOUT = 10.0  # seconds to wait for an acknowledgement


class NotAcknowledged(ChronicleError):
    """The uploader did not acknowledge the command in time (it may still carry it out)."""


class Relay:
    def __init__(
        self, chronicle: AsyncChronicle, notices: deque[Event], timeout: float = COMMAND_TIMEOUT
    ) -> None:
        self.chronicle = chronicle
        self.notices = notices
        self.timeout = timeout

    async def send(
        self,
        session: UploaderSession,
        action: str,
        asset_id: str | None = None,
        value: float | None = None,
    ) -> CommandResult:
        """Send one command and wait for its acknowledgement; raises when it failed or none came."""
        if session.state != "live":
            raise ChronicleError(
                f"uploader {session.label} is {session.state} (last beat {session.age:.0f} s ago): "
                "nothing would carry out the command"
            )
        what = f"{action}{f' {asset_id}' if asset_id else ''}"
        result = await self.chronicle.send_command(
            session.id, action, asset_id, value, timeout=self.timeout
        )
        if not result.acknowledged:
            raise NotAcknowledged(
                f"{session.label} did not acknowledge {what} within {self.timeout:g} s "
                f"(command {result.status}); it may still carry it out"
            )
        if not result.ok:
            raise ChronicleError(f"{session.label} refused {what}: {result.error}")
        self.notices.append(
            Notice(asset_id, "ok", f"{session.label} acknowledged {what}: {_said(result)}")
        )
        return result

    async def send_each(
        self, sessions: Iterable[UploaderSession], action: str, value: float | None = None
    ) -> list[str]:
        """The same command to several sessions; the asset ids they report, all together."""
        ids: list[str] = []
        problems: list[str] = []
        for s in sessions:
            try:
                result = await self.send(s, action, None, value)
            except ChronicleError as exc:
                problems.append(str(exc))
                continue
            if isinstance(result.result, list):
                ids += [str(x) for x in result.result]
        for p in problems:
            self.notices.append(Notice(None, "error", p))
        if problems and not ids:
            raise ChronicleError(problems[0])
        return ids


def _said(result: CommandResult) -> str:
    r = result.result
    if isinstance(r, list):
        return fmt.plural(len(r), "asset") if r else "nothing to do"
    if isinstance(r, dict) and "bandwidth_cap" in r:
        cap = r["bandwidth_cap"]
        return fmt.cap(cap)
    if isinstance(r, dict) and "state" in r:
        return str(r["state"])
    return "done"


class RelayedControls:
    """The Source controls, each relayed to the uploader(s) ``targets`` names (a mixin)."""

    relay: Relay | None = None
    _relay_tasks: set[asyncio.Task[None]]

    async def targets(self, asset_id: str | None) -> list[UploaderSession]:
        """The live session that owns ``asset_id`` (one), or every one in view (None)."""
        raise NotImplementedError

    def _relay(self) -> Relay:
        if self.relay is None:
            raise ChronicleError("not connected to the server yet")
        return self.relay

    async def _ids(self, action: str, asset_id: str | None) -> list[str]:
        relay, sessions = self._relay(), await self.targets(asset_id)
        if asset_id is None:
            return await relay.send_each(sessions, action)
        result = await relay.send(sessions[0], action, asset_id)
        return [str(x) for x in result.result] if isinstance(result.result, list) else []

    async def pause(self, asset_id: str | None = None) -> list[str]:
        return await self._ids("pause", asset_id)

    async def resume(self, asset_id: str | None = None) -> list[str]:
        return await self._ids("resume", asset_id)

    async def retry_failed(self, asset_id: str | None = None) -> list[str]:
        return await self._ids("retry_failed", asset_id)

    async def force_finalize(self, asset_id: str) -> None:
        await self._ids("force_finalize", asset_id)

    async def discard(self, asset_id: str) -> None:
        await self._ids("discard", asset_id)

    def set_bandwidth(self, rate: float | None) -> None:
        """Every uploader in view gets the cap; each acknowledgement is logged as it comes."""
        relay = self._relay()

        async def send() -> None:
            try:
                await relay.send_each(await self.targets(None), "set_bandwidth", rate)
            except ChronicleError as exc:
                relay.notices.append(Notice(None, "error", f"bandwidth not changed: {exc}"))

        if not hasattr(self, "_relay_tasks"):
            self._relay_tasks = set()
        task = asyncio.get_running_loop().create_task(send())
        self._relay_tasks.add(task)
        task.add_done_callback(self._relay_tasks.discard)

    def cancel_relayed(self) -> None:
        for task in list(getattr(self, "_relay_tasks", ())):
            task.cancel()
