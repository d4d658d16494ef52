"""`methodic-tui monitor`: two real uploader processes, one server, the operator's dashboard.

The uploaders are library processes (`Chronicle`, as in a training job) beating every 0.3 s; the
server (the ``hub`` fixture) calls a session lost after 5 s of silence. Everything waits on
conditions, never on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import (
    CEILING,
    make_checkpoint,
    sha256_file,
    subprocess_env,
    tracked_assets,
    wait_until,
    wait_until_async,
)
from tui_helpers import remote_args, running, tui_cmd, tui_env, until

from methodic import AsyncChronicle, Chronicle, UploadTracker
from methodic.server import EmbeddedServer
from methodic_tui import cli
from methodic_tui.monitor_source import MonitorSource
from methodic_tui.options import Options

MB = 1_000_000


# A training job's uploader: the library, in a process of its own, waiting for its upload.
UPLOADER = """
import sys
from methodic import Chronicle, UploadTracker
url, key, ckpt, tracker = sys.argv[1:5]
with Chronicle(url, key, max_upload_workers=2, max_bandwidth="1MB") as chronicle:
    run = chronicle.run(chronicle.create_experiment("cluster"), 0, 1)
    run.register_and_upload_async(ckpt, upload_tracker=UploadTracker(tracker))
    run.wait_for_uploads()
print("uploaded", flush=True)
"""


def _uploader(
    srv: EmbeddedServer, tmp_path: Path, name: str
) -> tuple[subprocess.Popen[str], Path, Path]:
    """A process uploading a 24 MB checkpoint at 1 MB/s, beating every 0.3 s."""
    ckpt = make_checkpoint(tmp_path / name / "ckpt", {"a.bin": 12 * MB, "b.bin": 12 * MB})
    tracker = tmp_path / name / "uploads.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, str(srv.url), str(srv.api_key), str(ckpt), str(tracker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(METHODIC_HEARTBEAT_INTERVAL="0.3"),
    )
    return proc, ckpt, tracker


def _tracked(tracker: Path):
    assets = tracked_assets(tracker) if tracker.exists() else []
    return assets[0] if assets else None


def _monitor(srv: EmbeddedServer, **kw: object) -> MonitorSource:
    opts = Options(server_url=srv.url, api_key=srv.api_key)
    return MonitorSource(opts, poll=0.2, command_timeout=CEILING, **kw)  # type: ignore[arg-type]


def _logged(app, text: str, times: int = 1) -> bool:
    """``text`` is in the dashboard's event log (``times`` lines), scrolled into view or not."""
    return sum(text in e.text for e in app.session.entries) >= times


async def _select(pilot, app, asset_id: str) -> None:
    """Move the assets table's cursor to ``asset_id`` (the cursor is what is selected)."""
    for key in ("down", "up", "up", "down", "down"):
        await pilot.pause()
        if app.session.selected == asset_id:
            return
        await pilot.press(key)
    raise AssertionError(f"cannot select {asset_id}")


async def test_monitor_shows_both_uploaders_pauses_one_caps_them_and_sees_a_kill(
    hub: EmbeddedServer, tmp_path: Path
) -> None:
    (a_proc, a_ckpt, a_tracker), (b_proc, _, b_tracker) = await asyncio.gather(
        asyncio.to_thread(_uploader, hub, tmp_path, "a"),
        asyncio.to_thread(_uploader, hub, tmp_path, "b"),
    )
    try:
        a = await asyncio.to_thread(wait_until, lambda: _tracked(a_tracker), what="a registered")
        b = await asyncio.to_thread(wait_until, lambda: _tracked(b_tracker), what="b registered")
        source = _monitor(hub, experiment="cluster", run=1)
        async with running(source) as (app, pilot):

            def shown(asset_id: str):
                return next((x for x in source.snapshot().assets if x.asset_id == asset_id), None)

            def moving() -> bool:
                return all((s := shown(t.asset_id)) and s.bytes_done > 0 for t in (a, b))

            await until(pilot, moving, what="both uploaders' progress in the monitor")
            sessions = {source._owners[a.asset_id].id, source._owners[b.asset_id].id}
            assert len(sessions) == 2  # two processes, two sessions
            pids = {source._owners[t.asset_id].pid for t in (a, b)}
            assert pids == {a_proc.pid, b_proc.pid}
            for t in (a, b):
                assert shown(t.asset_id).bytes_total == t.total_bytes  # type: ignore[union-attr]

            # p on A's asset: A's process pauses it (its tracker says so), B goes on.
            await _select(pilot, app, a.asset_id)
            await pilot.press("p")
            await until(
                pilot,
                lambda: (t := _tracked(a_tracker)) and t.state == "paused",
                what="A paused in its own tracker",
            )
            await until(
                pilot,
                lambda: _logged(app, "acknowledged pause"),
                what="the acknowledgement shown",
            )
            assert _tracked(b_tracker).state == "uploading"
            # Paused, A's bytes settle: the monitor shows what A's tracker holds.
            await until(
                pilot,
                lambda: (
                    (s := shown(a.asset_id))
                    and s.state == "paused"
                    and s.bytes_done == _tracked(a_tracker).bytes_sent
                ),
                what="the monitor's bytes equal to A's tracker",
            )

            # + raises every uploader's cap one step (1 MB/s -> 2 MB/s), acknowledged by each.
            await pilot.press("plus")
            await until(
                pilot,
                lambda: all(s.snapshot.bandwidth_cap == 2 * MB for s in source.sessions),
                what="both uploaders at 2 MB/s",
            )
            await until(
                pilot,
                lambda: _logged(app, "acknowledged set_bandwidth", times=2),
                what="both acknowledgements logged",
            )
            # Measured: B now sends faster than the old 1 MB/s cap.
            before, t0 = _tracked(b_tracker).bytes_sent, time.monotonic()
            await until(
                pilot,
                lambda: (
                    _tracked(b_tracker).bytes_sent - before >= 4 * MB
                    or _tracked(b_tracker).state == "finalized"
                ),
                what="B sending",
            )
            done = _tracked(b_tracker)
            if done.state != "finalized":
                rate = (done.bytes_sent - before) / (time.monotonic() - t0)
                assert rate > 1.2 * MB, f"B sends {rate / MB:.2f} MB/s under a 2 MB/s cap"

            # SIGKILL B: no goodbye, so the monitor calls it lost, with its last beat.
            b_proc.send_signal(signal.SIGKILL)
            b_proc.wait()
            await until(
                pilot,
                lambda: (s := shown(b.asset_id)) and s.state == "lost",
                what="B shown lost",
            )
            await until(pilot, lambda: _logged(app, "lost: last beat"), what="the loss logged")

            # Resume A (p again) and lift its cap: it finishes, byte for byte.
            await pilot.press("p")
            await until(
                pilot,
                lambda: (t := _tracked(a_tracker)) and t.state != "paused",
                what="A resumed",
            )
            assert source.relay is not None
            owner = source._owners[a.asset_id]
            lifted = await source.relay.send(owner, "set_bandwidth", None, None)
            assert lifted.ok
            await until(
                pilot,
                lambda: (s := shown(a.asset_id)) and s.state == "finalized",
                what="A finalized",
            )
        out, err = await asyncio.to_thread(a_proc.communicate, timeout=CEILING)
        assert a_proc.returncode == 0 and "uploaded" in out, err
        async with AsyncChronicle(hub.url, hub.api_key) as check:
            run = await check.run(await check.create_experiment("cluster"), 0, 1)
            copy = await run.download_asset(a.asset_id, tmp_path / "copy")
        for name in ("a.bin", "b.bin"):
            assert sha256_file(copy / name) == sha256_file(a_ckpt / name)
    finally:
        for proc in (a_proc, b_proc):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


async def test_uploads_go_on_while_the_server_is_down_and_heartbeats_come_back(
    tmp_path: Path,
) -> None:
    srv = EmbeddedServer(tmp_path / "server")
    srv.start()
    try:
        ckpt = await asyncio.to_thread(make_checkpoint, tmp_path / "ckpt", {"a.bin": 6 * MB})
        tracker = UploadTracker(tmp_path / "u.sqlite")
        async with AsyncChronicle(
            srv.url, srv.api_key, max_bandwidth="2MB", heartbeat_interval=0.1
        ) as up:
            run = await up.run(await up.create_experiment("outage"), 0, 0)
            handle = await run.register_and_upload_async(ckpt, upload_tracker=tracker)
            hb = up._heartbeat
            assert hb is not None
            await wait_until_async(lambda: hb.beats > 0, what="a first beat")
            await asyncio.to_thread(srv.stop)  # down: beats fail, the transfer retries
            await wait_until_async(lambda: hb.failures >= 2, what="beats failing")
            await asyncio.to_thread(srv.start)  # back on the same port
            beats = hb.beats
            await wait_until_async(lambda: hb.beats > beats, what="beats again")
            asset = await handle.result()
            assert asset.state == "finalized"
            copy = await run.download_asset(handle.asset_id, tmp_path / "copy")
            assert sha256_file(copy / "a.bin") == sha256_file(ckpt / "a.bin")
            sessions = await up.sessions()
            assert [s.id for s in sessions] == [up.session_id]
        tracker.close()
    finally:
        srv.stop()


def test_monitor_headless_and_json_views(
    hub: EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = hub.api_key
    assert key is not None
    env = {"METHODIC_SERVER_URL": hub.url or "", "METHODIC_API_KEY": key}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert cli.main(["monitor", "--no-ui"]) == 0
        assert "no uploader has reported" in capsys.readouterr().out
        beat = {
            "info": {"host": "node7", "pid": 4242, "user": "op", "version": "0.1.0", "runs": []},
            "status": {"assets": [], "rate": 0, "bandwidth_cap": None},
            "acks": [],
        }
        answer = httpx.post(
            f"{hub.url}/api/v1/sessions/s-cli/beat",
            json=beat,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 200 and answer.json()["commands"] == []
        code = cli.main(["monitor", "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert doc["schema"] == 1 and [s["id"] for s in doc["sessions"]] == ["s-cli"]
        (shown,) = doc["sessions"]
        assert shown["host"] == "node7" and shown["pid"] == 4242
        assert code == (1 if shown["state"] == "lost" else 0)
        # Killed (no goodbye): once lost, the headless view exits 1 for alerts.
        wait_until(lambda: cli.main(["monitor", "--no-ui"]) == 1, what="exit 1 once lost")
        assert "LOST" in capsys.readouterr().out
        assert cli.main(["monitor", "--no-ui", "--api-key", "sk_agent_wrong"]) == 2
        assert "refused the API key" in capsys.readouterr().err
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def test_attach_with_a_server_pauses_the_uploading_process(
    hub: EmbeddedServer, tmp_path: Path
) -> None:
    from methodic_tui.attach import AttachSource

    ckpt = await asyncio.to_thread(make_checkpoint, tmp_path / "ckpt", {"a.bin": 8 * MB})
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    async with AsyncChronicle(
        hub.url, hub.api_key, max_bandwidth="1MB", heartbeat_interval=0.1
    ) as up:
        run = await up.run(await up.create_experiment("attach"), 0, 0)
        handle = await run.register_and_upload_async(ckpt, upload_tracker=tracker)
        opts = Options(server_url=hub.url, api_key=hub.api_key)
        source = AttachSource(tracker_path, poll=0.2, relay_to=opts, command_timeout=CEILING)
        assert source.read_only is None
        async with running(source) as (app, pilot):
            await until(pilot, lambda: source.snapshot().assets, what="the asset attached")
            await _select(pilot, app, handle.asset_id)
            await pilot.press("p")

            async def paused() -> bool:
                return (await up.snapshot()).assets[0].state == "paused"

            await until(pilot, paused, what="paused in the uploading process")
            await until(pilot, lambda: _logged(app, "acknowledged pause"), what="the ack shown")
            # p toggles what the dashboard shows: wait until the tracker it reads says paused.
            await until(
                pilot,
                lambda: source.snapshot().assets[0].state == "paused",
                what="the attached view to show it paused",
            )
            await pilot.press("p")  # paused: p resumes it, through the server too
            await until(
                pilot,
                lambda: _logged(app, "acknowledged resume"),
                what="the resume acknowledged",
            )
        await up.set_bandwidth(None)
        assert (await handle.result()).state == "finalized"
    tracker.close()
    # Without a server, attach stays read-only.
    assert AttachSource(tracker_path).read_only is not None


def test_a_headless_upload_paused_from_the_monitor_waits_for_resume(
    hub: EmbeddedServer, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 6 * MB})
    tracker = tmp_path / "u.sqlite"
    args = ["upload", str(ckpt), "--no-ui", *remote_args(hub, tracker), "--experiment", "held"]
    proc = subprocess.Popen(
        tui_cmd(*args, "--max-bandwidth", "1MB"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=tui_env(tmp_path, METHODIC_HEARTBEAT_INTERVAL="0.3"),
    )
    try:
        with Chronicle(hub.url, hub.api_key) as ops:

            def uploading():
                return next(
                    (
                        s
                        for s in ops.sessions("held")
                        if s.state == "live"
                        and any(a.state == "uploading" for a in s.snapshot.assets)
                    ),
                    None,
                )

            session = wait_until(uploading, what="the headless upload sending")
            assert ops.send_command(session.id, "pause", timeout=CEILING).ok

            # Paused, it goes on beating (three beats after the pause) with nothing in flight:
            # the process holds, where it used to end as if done.
            def beat_paused_after(t: float):
                s = next(s for s in ops.sessions("held") if s.id == session.id)
                paused = [a.state for a in s.snapshot.assets] == ["paused"]
                return s.last_beat if paused and s.last_beat > t else None

            beat = wait_until(lambda: beat_paused_after(0.0), what="a beat while paused")
            for _ in range(3):
                beat = wait_until(lambda b=beat: beat_paused_after(b), what="another beat")
            assert proc.poll() is None, proc.communicate()
            assert ops.send_command(session.id, "set_bandwidth", value=None, timeout=CEILING).ok
            assert ops.send_command(session.id, "resume", timeout=CEILING).ok
        _, err = proc.communicate(timeout=CEILING)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "1/1 assets finalized" in err.strip().splitlines()[-1], err
    assert tracked_assets(tracker)[0].state == "finalized"
