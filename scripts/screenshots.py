"""Regenerate docs/screenshots/*.svg from the real app on the real engine (Pilot + save_screenshot).

    python scripts/screenshots.py [--out docs/screenshots]

States: the demo mid-upload with a retry in the event log (120x36 and 80x24), an asset's
details, the force-finalize confirmation, and the recovery screen after an interrupted run.
Takes about half a minute; ports and temp paths in the headers differ from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

from textual.pilot import Pilot

from methodic import AsyncChronicle, UploadTracker
from methodic.server import EmbeddedServer
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.demo import DemoJob, write_checkpoint
from methodic_tui.engine_source import EngineSource
from methodic_tui.jobs import ResumeJob
from methodic_tui.options import Options

MB = 1_000_000
WIDE = (120, 36)
NARROW = (80, 24)


async def until(pilot: Pilot, predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the screenshot state was not reached")
        await pilot.pause(0.05)


def mid_upload(app: MethodicApp) -> bool:
    states = [a.state for a in app.session.source.snapshot().assets]
    retried = any(e.level == "warn" and e.text.startswith("retry") for e in app.session.entries)
    return retried and states.count("finalized") >= 1 and "uploading" in states and len(states) >= 4


async def select_uploading(app: MethodicApp, pilot: Pilot) -> None:
    ids = [a.asset_id for a in app.session.source.snapshot().assets]
    target = next(
        a.asset_id for a in app.session.source.snapshot().assets if a.state == "uploading"
    )
    for _ in range(ids.index(target)):
        await pilot.press("down")
    await until(pilot, lambda: app.session.selected == target)
    await pilot.pause(0.6)  # its files arrive with the next refresh


async def demo_shots(out: Path, size: tuple[int, int], *, full: bool) -> None:
    source = EngineSource(
        Options(max_bandwidth=20 * MB), DemoJob(total_size=300 * MB, interval=0.7), pending="leave"
    )
    app = MethodicApp(source, watch_terminal=False)
    suffix = "" if size == WIDE else f"-{size[0]}x{size[1]}"
    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.session.ready.is_set())
            await until(pilot, lambda: mid_upload(app))
            await select_uploading(app, pilot)
            app.save_screenshot(f"dashboard{suffix}.svg", str(out))
            if not full:
                return
            await pilot.press("enter")
            await pilot.pause(0.6)
            app.save_screenshot("details.svg", str(out))
            await pilot.press("escape")
            await pilot.press("f")
            await pilot.pause(0.4)
            app.save_screenshot("force-finalize.svg", str(out))
            await pilot.press("n")
            await pilot.press("question_mark")
            await pilot.pause(0.4)
            app.save_screenshot("help.svg", str(out))
    finally:
        await source.close()


async def recovery_shots(out: Path, tmp: Path) -> None:
    with EmbeddedServer(tmp / "server") as server:
        assert server.url and server.api_key
        tracker = UploadTracker(tmp / "uploads.sqlite")
        async with AsyncChronicle(server.url, server.api_key, max_bandwidth=30 * MB) as chronicle:
            run = await chronicle.run(await chronicle.create_experiment("llama-ft"), 0, 0)
            files = {f"model-{i:05d}-of-00004.safetensors": 6 * MB for i in range(1, 5)}
            files["optimizer.pt"] = 12 * MB
            for step in (1000, 2000, 3000):
                ckpt = await asyncio.to_thread(
                    write_checkpoint, tmp / "out" / f"checkpoint-{step}", files, step
                )
                await run.register_and_upload_async(ckpt, upload_tracker=tracker)
            while (await chronicle.snapshot()).bytes_done < 30 * MB:
                await asyncio.sleep(0.05)
            await chronicle.pause((await chronicle.snapshot()).assets[-1].asset_id)
        tracker.close()  # the process "stopped" here: the uploads are unfinished
        for size, name in ((WIDE, "recovery.svg"), (NARROW, "recovery-80x24.svg")):
            opts = Options(
                server_url=server.url, api_key=server.api_key, tracker=tmp / "uploads.sqlite"
            )
            source = EngineSource(opts, ResumeJob())
            app = MethodicApp(source, start_on_recovery=True, watch_terminal=False)
            try:
                async with app.run_test(size=size) as pilot:
                    await until(pilot, lambda app=app: len(app.session.source.pending()) == 3)
                    await pilot.pause(0.5)
                    app.save_screenshot(name, str(out))
            finally:
                await source.close()


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="methodic-shots-"))
    try:
        await demo_shots(out, WIDE, full=True)
        await demo_shots(out, NARROW, full=False)
        await recovery_shots(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for svg in sorted(out.glob("*.svg")):
        print(svg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    )
    logging.disable(logging.WARNING)
    asyncio.run(main(parser.parse_args().out))
