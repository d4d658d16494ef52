"""Interactive crash recovery, and attach: the real app on trackers other processes left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from helpers import (
    CEILING,
    claim_in_child,
    make_checkpoint,
    tracked_assets,
    tree_digest,
    wait_until,
    wait_until_async,
)
from tui_helpers import (
    MiB,
    cell_text,
    remote_args,
    running,
    screen_text,
    states,
    tui_cmd,
    tui_env,
    until,
    upload_source,
)
from tui_helpers import resume_source as make_resume_source

from methodic import AsyncChronicle, UploadTracker
from methodic_tui.attach import AttachSource
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.modals import ConfirmScreen
from methodic_tui.dashboard.screens.recovery import RecoveryScreen


def pending_ids(tracker_path: Path) -> list[str]:
    with UploadTracker(tracker_path) as tracker:
        return [t.asset_id for t in tracker.get_pending_uploads()]


def tracked_states(tracker_path: Path) -> dict[str, str]:
    with UploadTracker(tracker_path) as tracker:
        return {os.path.basename(t.local_dir or ""): t.state for t in tracker.list_assets()}


def wait_for_bytes(tracker_path: Path) -> None:
    wait_until(
        lambda: any(t.bytes_sent > 0 for t in tracked_assets(tracker_path)),
        interval=0.05,
        what="the uploader's first bytes",
    )


async def leave_unfinished(
    server, tmp_path: Path, names: list[str], size: int = 6 * MiB
) -> list[Path]:
    """Start uploads and stop the process's Chronicle mid-way, as a crash would leave them."""
    dirs = [
        make_checkpoint(tmp_path / n, {"a.bin": size // 2, "b.bin": size // 2}, seed=i)
        for i, n in enumerate(names)
    ]
    tracker_path = tmp_path / "u.sqlite"
    tracker = UploadTracker(tracker_path)
    # 300 kB/s: one checkpoint alone takes > 20 s, so none can finish before the last one is
    # registered and uploading, however slow the machine.
    async with AsyncChronicle(
        server.url, server.api_key, max_upload_workers=2, max_bandwidth=300_000
    ) as chronicle:
        run = await chronicle.run(await chronicle.create_experiment("tui"), 0, 0)
        for d in dirs:
            await run.register_and_upload_async(d, upload_tracker=tracker)

        # Every one uploading in the tracker (the engine's state leads its tracker write), and
        # some bytes stored.
        async def started() -> bool:
            return (await chronicle.snapshot()).bytes_done >= 1_000_000 and [
                t.state for t in tracked_assets(tracker_path)
            ] == ["uploading"] * len(dirs)

        await wait_until_async(started, what="every upload started and 1 MB sent")
    tracker.close()
    return dirs


async def test_recovery_screen_after_a_sigkilled_upload(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(
        tmp_path / "checkpoint-500", {f"shard-{i}.bin": 2 * MiB for i in range(4)}
    )
    tracker_path = tmp_path / "u.sqlite"
    child = subprocess.Popen(
        tui_cmd(
            "upload",
            str(ckpt),
            "--no-ui",
            *remote_args(server, tracker_path),
            "--max-bandwidth",
            "1MB",
            "--workers",
            "1",
            "--experiment",
            "tui",
        ),
        env=tui_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_bytes, tracker_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()  # reaped: its pid is no longer alive
    assert child.returncode == -signal.SIGKILL
    (aid,) = pending_ids(tracker_path)

    async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
        app,
        pilot,
    ):
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen), what="recovery screen")
        table = app.screen.query_one("#pending")
        await until(pilot, lambda: table.row_count == 1)
        assert cell_text(app, "pending", aid, "name").startswith("checkpoint-500")
        assert "/4 files" in cell_text(app, "pending", aid, "missing")
        text = screen_text(app)
        assert f"process {child.pid} stopped while uploading (killed or crashed)" in text
        assert "not yet stored" in text and "shard-3.bin" in text
        await pilot.press("enter")  # resume this one
        await until(
            pilot,
            lambda: states(app).get("checkpoint-500") == "finalized",
            timeout=30,
            what="resumed and finalized",
        )
        await until(pilot, lambda: "all handled" in screen_text(app))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
    assert pending_ids(tracker_path) == []
    async with AsyncChronicle(server.url, server.api_key) as chronicle:
        run = await chronicle.run(await chronicle.create_experiment("tui"), 0, 0)
        dest = await run.download_asset(aid, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)


async def test_recovery_discard_force_finalize_and_resume_all(server, tmp_path: Path) -> None:
    await leave_unfinished(server, tmp_path, ["ckpt-a", "ckpt-b", "ckpt-c"])
    tracker_path = tmp_path / "u.sqlite"
    async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
        app,
        pilot,
    ):
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
        table = app.screen.query_one("#pending")
        await until(pilot, lambda: table.row_count == 3)
        # d on the first row, confirmed: discarded on the server and in the tracker.
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: table.row_count == 2 and isinstance(app.screen, RecoveryScreen))
        await until(pilot, lambda: tracked_states(tracker_path)["ckpt-a"] == "discarded")
        # f on the next: storage lacks bytes, so the server refuses (and says what is missing).
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(
            pilot,
            lambda: any("missing" in str(n.message) for n in app._notifications),
            what="refused",
        )
        # A refusal changes nothing: it still waits here, with the other one.
        assert table.row_count == 2 and tracked_states(tracker_path)["ckpt-b"] != "failed"
        # u resumes what is left, the refused one included.
        await pilot.press("u")
        await until(
            pilot,
            lambda: (
                states(app).get("ckpt-c") == "finalized"
                and states(app).get("ckpt-b") == "finalized"
            ),
        )
    assert tracked_states(tracker_path) == {
        "ckpt-a": "discarded",
        "ckpt-b": "finalized",
        "ckpt-c": "finalized",
    }


async def test_recovery_leaves_an_upload_a_live_process_owns(server, tmp_path: Path) -> None:
    await leave_unfinished(server, tmp_path, ["mine", "theirs"])
    tracker_path = tmp_path / "u.sqlite"
    ids = {
        os.path.basename(t.local_dir or ""): t.asset_id
        for t in UploadTracker(tracker_path).list_assets()
    }
    live = claim_in_child(tracker_path, ids["theirs"], hold=True)
    try:
        async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
            app,
            pilot,
        ):
            await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
            table = app.screen.query_one("#pending")
            await until(pilot, lambda: table.row_count == 1)
            assert [t.asset_id for t in app.session.source.pending()] == [ids["mine"]]
            assert "theirs" not in states(app)
            await until(
                pilot,
                lambda: any(
                    f"not taking over {ids['theirs']}: pid {live.pid} is still running" in e.text
                    for e in app.session.entries
                ),
                what="the warning",
            )
            await pilot.press("u")
            await until(pilot, lambda: states(app).get("mine") == "finalized")
        assert tracked_states(tracker_path)["theirs"] == "uploading"
    finally:
        live.kill()
        live.wait(CEILING)


async def test_upload_opens_on_recovery_and_u_resumes_from_the_dashboard(
    server, tmp_path: Path
) -> None:
    await leave_unfinished(server, tmp_path, ["old-1"])
    new = make_checkpoint(tmp_path / "new-1", {"x.bin": 1000})
    async with running(upload_source(server, tmp_path, [new])) as (app, pilot):
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen), what="recovery on start")
        await pilot.press("escape")  # decide later: they stay held
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await until(pilot, lambda: states(app).get("new-1") == "finalized")
        assert states(app)["old-1"] == "interrupted"
        await until(pilot, lambda: "from an earlier process (u resumes)" in screen_text(app))
        await pilot.press("u")
        await until(pilot, lambda: states(app)["old-1"] == "finalized")
        await pilot.press("u")  # nothing left: says so
        await until(
            pilot,
            lambda: any(
                "No uploads from an earlier process" in str(n.message) for n in app._notifications
            ),
        )


async def test_resume_with_nothing_pending_says_so(server, tmp_path: Path) -> None:
    async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
        app,
        pilot,
    ):
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
        await until(pilot, lambda: "no unfinished uploads" in screen_text(app))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_attach_watches_another_process_read_only(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-9", {f"s{i}.bin": MiB for i in range(6)})
    tracker_path = tmp_path / "u.sqlite"
    child = subprocess.Popen(  # ~9 s of uploading
        tui_cmd(
            "upload",
            str(ckpt),
            "--no-ui",
            *remote_args(server, tracker_path),
            "--max-bandwidth",
            "700KB",
        ),
        env=tui_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_bytes, tracker_path)
        # Frozen mid-upload while the view is checked: it cannot finish first, however slow the
        # machine is to bring the view up.
        child.send_signal(signal.SIGSTOP)
        source = AttachSource(tracker_path, poll=0.2)
        async with running(source) as (app, pilot):
            await until(pilot, lambda: states(app).get("checkpoint-9") == "uploading")
            assert "READ-ONLY" in screen_text(app)
            await pilot.press("p")
            await until(pilot, lambda: any("read-only" in str(n.title) for n in app._notifications))
            assert tracked_states(tracker_path)["checkpoint-9"] == "uploading"
            child.send_signal(signal.SIGCONT)
            await until(pilot, lambda: states(app)["checkpoint-9"] == "finalized")
            await until(
                pilot, lambda: any("finalized checkpoint-9" in e.text for e in app.session.entries)
            )
        assert child.wait(CEILING) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
