"""Uploader sessions in one process: heartbeats, relayed commands, lost sessions, old servers.

(The cross-process, dashboard and CLI views are tests/test_monitor.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from helpers import CEILING, make_checkpoint, sha256_file, wait_until_async

from methodic import (
    AsyncChronicle,
    AuthenticationError,
    InvalidInputError,
    UploaderSession,
    UploadTracker,
)
from methodic.server.sessions import SessionBook

BEAT = 0.1


async def _session(monitor: AsyncChronicle, session_id: str) -> UploaderSession | None:
    for s in await monitor.sessions():
        if s.id == session_id:
            return s
    return None


async def _started(chronicle: AsyncChronicle, tmp_path: Path, name: str, size: int = 8 << 20):
    ckpt = await asyncio.to_thread(make_checkpoint, tmp_path / name, {"a.bin": size})
    run = await chronicle.run(await chronicle.create_experiment("sessions"), 0, 1)
    tracker = UploadTracker(tmp_path / f"{name}.sqlite")
    handle = await run.register_and_upload_async(ckpt, upload_tracker=tracker)
    return ckpt, run, tracker, handle


async def test_a_session_beats_its_progress_and_obeys_relayed_commands(hub, tmp_path: Path) -> None:
    srv = hub
    async with (
        AsyncChronicle(srv.url, srv.api_key, max_bandwidth="2MB", heartbeat_interval=BEAT) as up,
        AsyncChronicle(srv.url, srv.api_key, heartbeat_interval=BEAT) as monitor,
    ):
        ckpt, run, tracker, handle = await _started(up, tmp_path, "ckpt")
        sid = up.session_id
        assert sid is not None and monitor.session_id is None  # no run: not an uploader

        async def moving() -> UploaderSession | None:
            s = await _session(monitor, sid)
            return s if s and s.snapshot.assets and s.snapshot.assets[0].bytes_done > 0 else None

        s = await wait_until_async(moving, what="the session's progress on the server")
        assert s.state == "live" and s.pid > 0 and s.runs[0]["run"] == 1
        assert s.snapshot.assets[0].asset_id == handle.asset_id
        assert s.snapshot.bandwidth_cap == 2_000_000
        assert [c.path for c in s.snapshot.assets[0].components] == ["a.bin"]  # few files: sent
        # Filtered by experiment name and run.
        assert [x.id for x in await monitor.sessions("sessions", 1)] == [sid]
        assert await monitor.sessions("sessions", 7) == []
        assert await monitor.sessions("no-such-experiment") == []

        paused = await monitor.send_command(sid, "pause", handle.asset_id, timeout=CEILING)
        assert paused.acknowledged and paused.ok and paused.result == [handle.asset_id]
        assert (await up.snapshot()).assets[0].state == "paused"

        async def shows_paused() -> bool:
            s = await _session(monitor, sid)
            return bool(s and s.snapshot.assets[0].state == "paused")

        await wait_until_async(shows_paused, what="the beat to show it paused")

        capped = await monitor.send_command(sid, "set_bandwidth", value=50e6, timeout=CEILING)
        assert capped.ok and (await up.snapshot()).bandwidth_cap == 50e6
        bad = await monitor.send_command(sid, "discard", "no-such-asset", timeout=CEILING)
        assert bad.acknowledged and not bad.ok and "no-such-asset" in (bad.error or "")
        resumed = await monitor.send_command(sid, "resume", timeout=CEILING)
        assert resumed.ok and resumed.result == [handle.asset_id]
        await handle.result()
        with pytest.raises(InvalidInputError):
            await monitor.send_command(sid, "explode")
        copy = await run.download_asset(handle.asset_id, tmp_path / "copy")
        assert sha256_file(copy / "a.bin") == sha256_file(ckpt / "a.bin")
    tracker.close()


async def test_a_silent_session_is_lost_and_a_closed_one_says_so(hub, tmp_path) -> None:
    srv = hub
    async with AsyncChronicle(srv.url, srv.api_key, heartbeat_interval=BEAT) as monitor:
        up = await AsyncChronicle(srv.url, srv.api_key, heartbeat_interval=BEAT).open()
        await up.run(await up.create_experiment("lost"), 0, 0)
        sid = up.session_id
        assert sid is not None
        await wait_until_async(lambda: _session(monitor, sid), what="the session registered")
        # The process stops beating without a goodbye (as if killed).
        assert up._heartbeat is not None and up._heartbeat._task is not None
        up._heartbeat._task.cancel()

        async def lost() -> bool:
            s = await _session(monitor, sid)
            return bool(s and s.state == "lost" and s.age > srv.config.session_lost_after)

        await wait_until_async(lost, what="the session shown lost")
        refused = httpx.post(
            f"{srv.url}/api/v1/sessions/{sid}/commands",
            json={"id": "c1", "action": "pause"},
            headers={"Authorization": f"Bearer {srv.api_key}"},
        )
        assert refused.status_code == 409 and "lost" in refused.text
        await up.close()
        up2 = await AsyncChronicle(srv.url, srv.api_key, heartbeat_interval=BEAT).open()
        await up2.run(await up2.create_experiment("lost"), 0, 0)
        sid2 = up2.session_id
        assert sid2 is not None
        await wait_until_async(lambda: _session(monitor, sid2), what="the second session")
        await up2.close()
        closed = await _session(monitor, sid2)
        assert closed is not None and closed.state == "closed"


async def test_sessions_and_commands_need_the_key(server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for method, path in (
            ("GET", "/api/v1/sessions"),
            ("POST", "/api/v1/sessions/s1/beat"),
            ("POST", "/api/v1/sessions/s1/commands"),
        ):
            r = await client.request(
                method, path, json={}, headers={"Authorization": "Bearer sk_agent_wrong"}
            )
            assert r.status_code == 401, (method, path)
    async with AsyncChronicle(server.url, "sk_agent_wrong", heartbeat_interval=BEAT) as monitor:
        with pytest.raises(AuthenticationError):
            await monitor.sessions()


def test_commands_are_idempotent_and_expire() -> None:
    now = [1000.0]
    book = SessionBook(None, lost_after=10, retention=100, command_ttl=5, clock=lambda: now[0])
    beat = {"info": {"host": "h"}, "status": {}, "acks": []}
    assert book.beat("s1", beat)["commands"] == []
    first, created = book.send("s1", {"id": "c1", "action": "pause"})
    again, created_again = book.send("s1", {"id": "c1", "action": "pause"})
    assert created and not created_again and first["id"] == again["id"]
    # Handed out until acknowledged; the first acknowledgement stands.
    assert [c["id"] for c in book.beat("s1", beat)["commands"]] == ["c1"]
    assert [c["id"] for c in book.beat("s1", beat)["commands"]] == ["c1"]
    acked = {**beat, "acks": [{"id": "c1", "ok": True, "result": ["a1"]}]}
    assert book.beat("s1", acked)["commands"] == []
    book.beat("s1", {**beat, "acks": [{"id": "c1", "ok": False, "error": "late"}]})
    assert book.command("s1", "c1")["status"] == "done"
    book.send("s1", {"id": "c2", "action": "resume"})
    now[0] += 6
    assert book.command("s1", "c2")["status"] == "expired"
    assert book.beat("s1", beat)["commands"] == []
    now[0] += 20  # silent past lost_after
    assert book.list()[0]["state"] == "lost"
    now[0] += 200  # and past retention: forgotten
    assert book.list() == []


async def test_an_older_server_without_sessions_turns_heartbeats_off(server, tmp_path) -> None:
    # The route answers 404, as a server from before sessions does.
    state = server._state
    assert state is not None

    def unknown(session_id: str, body: object) -> dict[str, object]:
        from methodic.server.errors import APIError

        raise APIError(404, "not_found", "no route POST /api/v1/sessions/x/beat")

    state.sessions.beat = unknown  # type: ignore[method-assign]
    async with AsyncChronicle(server.url, server.api_key, heartbeat_interval=BEAT) as up:
        _, _, tracker, handle = await _started(up, tmp_path, "old", size=1 << 20)
        hb = up._heartbeat
        assert hb is not None
        await wait_until_async(lambda: not hb.enabled, what="heartbeats switched off")
        asset = await handle.result()
        assert asset.state == "finalized"
    tracker.close()


async def test_a_command_seen_again_is_acknowledged_again_never_run_twice() -> None:
    from methodic._heartbeat import Heartbeat

    calls: list[str | None] = []

    class Pool:
        async def pause(self, asset_id: str | None = None) -> list[str]:
            calls.append(asset_id)
            return ["a1"]

    hb = Heartbeat("http://127.0.0.1:9", "sk_agent_x", Pool(), list, interval=60)  # type: ignore[arg-type]
    try:
        command = {"id": "c1", "action": "pause", "asset_id": "a1", "value": None}
        hb._take({"commands": [command]})
        await wait_until_async(lambda: hb._acks, what="the acknowledgement")
        assert hb._acks == [{"id": "c1", "ok": True, "result": ["a1"]}]
        hb._acks.clear()  # as if delivered, but the server did not get it: it sends c1 again
        hb._take({"commands": [command]})
        assert hb._acks == [{"id": "c1", "ok": True, "result": ["a1"]}]
        assert calls == ["a1"]
    finally:
        await hb.close()
