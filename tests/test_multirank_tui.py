"""A rank's contribution in the dashboard: resumed from its tracker, it shows the ranks stored
of the world size and which are missing, and the details screen lists each rank's."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from helpers import (
    CEILING,
    Lines,
    make_checkpoint,
    stop_process,
    tracked_assets,
    tree_digest,
    wait_until_async,
)
from textual.pilot import Pilot
from tui_helpers import (
    MiB,
    cell_text,
    remote_args,
    running,
    screen_text,
    tui_cmd,
    tui_env,
    until,
)
from tui_helpers import resume_source as make_resume_source

from methodic import AsyncChronicle, NotFoundError, UploadTracker
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.dashboard.screens.dashboard import DashboardScreen
from methodic_tui.dashboard.screens.details import DetailsScreen
from methodic_tui.dashboard.screens.modals import ConfirmScreen
from methodic_tui.dashboard.screens.recovery import RecoveryScreen


async def leave_rank_unfinished(server, tmp_path: Path) -> tuple[Path, str, Path]:
    """Rank 1 of 2 starts its contribution and its process stops mid-way (as a crash would
    leave it): the checkpoint, the asset id, rank 1's tracker."""
    ckpt = make_checkpoint(
        tmp_path / "checkpoint-7",
        {".metadata": 900, "__0_0.distcp": 200_000, "__1_0.distcp": 2 * MiB},
    )
    tracker_path = tmp_path / "u.sqlite"  # the tracker tui_helpers' sources use
    async with AsyncChronicle(server.url, server.api_key, max_bandwidth=300_000) as chronicle:
        run = await chronicle.run(await chronicle.create_experiment("tui"), 0, 0)
        handle = await run.register_and_upload_async(
            ckpt,
            upload_tracker=UploadTracker(tracker_path),
            asset_name="checkpoint-7",
            rank=1,
            world_size=2,
            include=["__1_*"],
        )

        async def started() -> bool:
            return (await chronicle.snapshot()).bytes_done > 0

        await wait_until_async(started, what="rank 1 sending")
    return ckpt, handle.asset_id, tracker_path


async def upload_rank0(server, tmp_path: Path, ckpt: Path) -> Path:
    """Rank 0's contribution, from a process of its own; the downloaded asset once finalized."""
    async with AsyncChronicle(server.url, server.api_key) as chronicle:
        run = await chronicle.run(await chronicle.create_experiment("tui"), 0, 0)
        rank0 = await run.register_and_upload_async(
            ckpt,
            upload_tracker=UploadTracker(tmp_path / "rank0.sqlite"),
            asset_name="checkpoint-7",
            rank=0,
            world_size=2,
            include=["__0_*", ".metadata"],
        )
        asset = await rank0.result()
        return await run.download_asset(asset.asset_id, tmp_path / "dl")


async def resume_in_dashboard(app: MethodicApp, pilot: Pilot, aid: str) -> None:
    """From the recovery screen, resume rank 1's contribution; back on the dashboard once it
    is stored and waits for rank 0."""
    await until(pilot, lambda: isinstance(app.screen, RecoveryScreen), what="recovery")
    await pilot.press("enter")  # resume rank 1's contribution
    await until(pilot, lambda: "all handled" in screen_text(app), what="resumed")
    await pilot.press("escape")
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
    await until(
        pilot,
        lambda: cell_text(app, "assets", aid, "state") == "waiting 1/2",
        what="rank 1 stored, waiting for rank 0",
    )


async def test_the_dashboard_shows_the_missing_ranks_and_each_contribution(
    server, tmp_path: Path
) -> None:
    ckpt, aid, tracker_path = await leave_rank_unfinished(server, tmp_path)
    async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
        app,
        pilot,
    ):
        await resume_in_dashboard(app, pilot, aid)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailsScreen))
        await until(pilot, lambda: "missing 0" in screen_text(app), what="details")
        text = screen_text(app)
        assert "rank 1 of 2: 1/2 ranks stored, missing 0" in text
        assert "waiting for rank 0 (last seen: 0 never)" in text
        assert "rank 0    not registered yet" in text
        assert "rank 1    1 file, 2.1 MB, stored" in text and "(this process)" in text
        # Rank 0 arrives: the server finalizes the asset, the dashboard says so.
        dest = await upload_rank0(server, tmp_path, ckpt)
        await until(
            pilot,
            lambda: "rank 1 of 2: all 2 ranks stored" in screen_text(app),
            what="finalized in the dashboard",
        )
    assert tree_digest(dest) == tree_digest(ckpt)
    assert [t.state for t in tracked_assets(tracker_path)] == ["finalized"]


async def test_headless_resume_of_a_rank_says_which_ranks_it_waits_for(
    server, tmp_path: Path
) -> None:
    ckpt, _aid, tracker_path = await leave_rank_unfinished(server, tmp_path)
    # (This test process registered rank 1, and still runs: the resume takes it over.)
    proc = subprocess.Popen(
        tui_cmd("resume", "--no-ui", "--take-over", *remote_args(server, tracker_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        err = Lines(proc.stderr)
        await asyncio.to_thread(err.wait_for, "waiting for rank 0 (last seen: 0 never)")
        await asyncio.to_thread(
            err.wait_for, "checkpoint-7 rank 1 of 2: 1/2 ranks stored, missing 0"
        )
        assert proc.poll() is None  # it waits for the asset, not only its contribution
        dest = await upload_rank0(server, tmp_path, ckpt)
        assert await asyncio.to_thread(proc.wait, CEILING) == 0, err.text()
    finally:
        stop_process(proc)
    assert "finalized checkpoint-7" in err.rest()
    assert tree_digest(dest) == tree_digest(ckpt)


async def test_d_in_the_dashboard_discards_a_waiting_asset_on_the_server(
    server, tmp_path: Path
) -> None:
    _ckpt, aid, tracker_path = await leave_rank_unfinished(server, tmp_path)
    async with running(make_resume_source(server, tmp_path), start_on_recovery=True) as (
        app,
        pilot,
    ):
        await resume_in_dashboard(app, pilot, aid)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="asked first")
        await pilot.press("y")
        await until(pilot, lambda: cell_text(app, "assets", aid, "state") == "discarded")
    async with AsyncChronicle(server.url, server.api_key) as chronicle:
        with pytest.raises(NotFoundError):
            await chronicle.get_asset(aid)
    assert [t.state for t in tracked_assets(tracker_path)] == ["discarded"]
