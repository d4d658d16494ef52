"""Dashboard benchmark: does the open dashboard slow the uploads, and how long does a refresh take?

    python bench/tui.py [--size 256MB] [--repeat 3] [--assets 1000] [--components 50]

(a) Throughput: the same checkpoints uploaded to the same embedded server with the dashboard
    open (the real Textual app, headless via ``run_test``, refreshing at its normal 4 Hz) and
    with ``--no-ui`` (the headless reporter), alternating, in one run, measured while the middle
    70% of the bytes move (start-up and finalize are fixed costs). Goal: >= 0.95x.
(b) Refresh: one dashboard refresh (drain, patch every changed cell inside ``batch_update``)
    with 1,000 assets of 50 components each, every asset changed since the last refresh (the
    worst case), from constructed snapshots; and the same plus rendering the visible frame.
    Goal: < 50 ms per refresh.

Prints a table of medians and writes bench/results/tui.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from methodic import (
    AssetSnapshot,
    ChronicleError,
    ComponentSnapshot,
    ComponentSpec,
    PoolSnapshot,
    RunBinding,
    parse_rate,
)
from methodic._states import AssetState, ComponentState
from methodic._uploads import AssetUpload, plan_components
from methodic.server import EmbeddedServer
from methodic_tui.dashboard.app import MethodicApp
from methodic_tui.demo import write_checkpoint
from methodic_tui.engine_source import EngineSource
from methodic_tui.headless import Reporter, run_headless
from methodic_tui.jobs import UploadJob
from methodic_tui.options import Options
from methodic_tui.source import DETAIL_FILES, EMPTY, Labels, StaticSource

MB = 1_000_000
CHECKPOINTS = 8
APP_OPTIONS: dict[str, float] = {}  # e.g. refresh_hz, from the command line


# ------------------------------------------------------------ (a) throughput


def make_checkpoints(root: Path, total: int) -> list[Path]:
    per = total // CHECKPOINTS
    files = {f"shard-{i}.bin": per // 4 for i in range(4)}
    return [write_checkpoint(root / f"checkpoint-{i}", files, i) for i in range(CHECKPOINTS)]


def source_for(server: EmbeddedServer, tmp: Path, dirs: list[Path], tag: str) -> EngineSource:
    assert server.url and server.api_key
    opts = Options(
        server_url=server.url,
        api_key=server.api_key,
        tracker=tmp / f"{tag}.sqlite",
        workers=8,
        experiment=f"bench-{tag}",
    )
    return EngineSource(opts, UploadJob(dirs))


class Window:
    """Wall and CPU time while the middle of the bytes moves (from FROM to TO of the total).

    Start-up (the engine's, the dashboard's first compose and paint) and the finalize at the
    end are the same fixed cost whatever the size, so they are left out of both variants; a
    sampler polls the pool's byte counter every 10 ms in both.
    """

    FROM, TO = 0.15, 0.85

    def __init__(self, source: EngineSource, total: int) -> None:
        self.source, self.total = source, total
        self.start: tuple[float, float, int] | None = None
        self.end: tuple[float, float, int] | None = None

    async def sample(self) -> None:
        while self.end is None:
            await asyncio.sleep(0.01)
            try:
                sent = self.source.snapshot().total_sent
            except ChronicleError:  # not open yet
                continue
            now = (time.perf_counter(), time.process_time(), sent)
            if self.start is None and sent >= self.FROM * self.total:
                self.start = now
            elif self.start is not None and sent >= self.TO * self.total:
                self.end = now

    def result(self) -> tuple[float, float, int]:
        """(wall s, CPU s, bytes) of the window."""
        assert self.start is not None and self.end is not None, "the upload ended unsampled"
        return (
            self.end[0] - self.start[0],
            self.end[1] - self.start[1],
            self.end[2] - self.start[2],
        )


async def with_dashboard(source: EngineSource, total: int) -> tuple[float, float, int]:
    window = Window(source, total)
    app = MethodicApp(source, watch_terminal=False, **APP_OPTIONS)
    async with app.run_test(size=(120, 40)):
        await app.session.ready.wait()
        sampler = asyncio.create_task(window.sample())
        while not source.settled():
            # Not pilot.pause(): it forces a repaint each time, which the app itself never does.
            await asyncio.sleep(0.02)
        sampler.cancel()
    await source.close()
    return window.result()


async def headless(source: EngineSource, total: int) -> tuple[float, float, int]:
    window = Window(source, total)

    async def run() -> int:
        return await run_headless(source, Reporter(err=io.StringIO(), out=io.StringIO()), tick=0.02)

    task = asyncio.create_task(run())
    while source.chronicle is None and not task.done():  # started inside run_headless
        await asyncio.sleep(0.005)
    sampler = asyncio.create_task(window.sample())
    code = await task
    sampler.cancel()
    assert code == 0
    return window.result()


def throughput(total: int, repeat: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="methodic-bench-tui-"))
    try:
        dirs = make_checkpoints(tmp / "data", total)
        rounds: dict[str, list[float]] = {"dashboard": [], "no_ui": []}
        cpu: dict[str, list[float]] = {"dashboard": [], "no_ui": []}
        with EmbeddedServer(tmp / "server") as server:
            asyncio.run(headless(source_for(server, tmp, dirs, "warmup"), total))
            for i in range(repeat):
                order = ["dashboard", "no_ui"] if i % 2 == 0 else ["no_ui", "dashboard"]
                for kind in order:
                    src = source_for(server, tmp, dirs, f"{kind}{i}")
                    run = with_dashboard if kind == "dashboard" else headless
                    wall, cpu_s, moved = asyncio.run(run(src, total))  # CPU: engine, server, UI
                    rounds[kind].append(moved / wall)
                    cpu[kind].append(cpu_s / moved)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {k: statistics.median(v) for k, v in rounds.items()}
    cpu_per_byte = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "bytes": total,
        "repeat": repeat,
        "window": [Window.FROM, Window.TO],
        "rounds_MBps": {k: [r / MB for r in v] for k, v in rounds.items()},
        "cpu_ratio": cpu_per_byte["dashboard"] / cpu_per_byte["no_ui"],
        "dashboard_MBps": rate["dashboard"] / MB,
        "no_ui_MBps": rate["no_ui"] / MB,
        "ratio": rate["dashboard"] / rate["no_ui"],
    }


# ------------------------------------------------------------ (b) refresh


def fleet(n_assets: int, n_components: int, step: int, detail: int) -> PoolSnapshot:
    """n assets of n components, every byte count moved by ``step`` since the previous one."""
    assets = []
    for i in range(n_assets):
        size = 64 * MB
        done = min(size, (i * 7919 + step * 1_310_000) % size)
        comps: tuple[ComponentSnapshot, ...] = ()
        if i == detail:
            comps = tuple(
                ComponentSnapshot(
                    f"shards/model-{j:05d}.safetensors",
                    "uploading",
                    min(size // n_components, done // n_components + j),
                    size // n_components,
                    0,
                    0,
                    1,
                    None,
                )
                for j in range(n_components)
            )
        assets.append(
            AssetSnapshot(
                asset_id=f"asset-{i:06d}",
                asset_type="checkpoint",
                local_dir=f"/ckpt/checkpoint-{i}",
                state="uploading",
                components_done=done * n_components // size,
                component_count=n_components,
                bytes_done=done,
                bytes_total=size,
                rate=1e6 + step + i,
                eta=(size - done) / (1e6 + step + i),
                last_error=None,
                components=comps,
            )
        )
    return PoolSnapshot(
        assets=tuple(assets),
        rate=8e8 + step,
        history=tuple(range(60)),
        total_sent=step,
        bandwidth_cap=None,
        workers=8,
        active_transfers=8,
    )


async def refresh(n_assets: int, n_components: int, repeat: int) -> dict[str, object]:
    variants = [fleet(n_assets, n_components, step, detail=0) for step in range(repeat + 2)]
    source = StaticSource(variants[0], labels=Labels(mode="bench"))
    # The app's own timer would re-apply variant 0 between ours: keep it out of the way.
    app = MethodicApp(source, refresh_hz=0.001, watch_terminal=False)
    patch: list[float] = []
    frame: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        await app.session.ready.wait()
        app._apply(variants[1], [])  # the first sight of 1,000 rows: adds, not patches
        await pilot.pause()
        for snap in variants[2:]:
            snap = replace(snap, assets=snap.assets)
            t0 = time.perf_counter()
            app._apply(snap, [])
            t1 = time.perf_counter()
            app.screen._compositor.render_strips()  # the visible frame, as the screen paints it
            t2 = time.perf_counter()
            patch.append(t1 - t0)
            frame.append(t2 - t0)
            await pilot.pause()
        rows = app.screen.query_one("#assets").row_count
    assert rows == n_assets
    return {
        "assets": n_assets,
        "components": n_components,
        "repeat": repeat,
        "patch_ms": statistics.median(patch) * 1000,
        "patch_max_ms": max(patch) * 1000,
        "frame_ms": statistics.median(frame) * 1000,
    }


# ------------------------------------------------------------ (c) one asset of many files


@dataclass
class UploadSource(StaticSource):
    """One engine upload of many files as the pool snapshots it (``limit``: the files a
    detail holds, None for all), a slice more of them completed at every snapshot."""

    upload: Any = None
    limit: int | None = None
    moved: int = 0

    def snapshot(self, detail: str | None = None) -> PoolSnapshot:
        comps = list(self.upload.components.values())
        step = max(len(comps) // 400, 1)
        for c in comps[self.moved : self.moved + step]:
            c.state, c.bytes_done = ComponentState.COMPLETED, c.size
        for c in comps[self.moved + step : self.moved + 2 * step]:
            c.state, c.bytes_done = ComponentState.UPLOADING, c.size // 2
        self.upload.recount()
        self.moved += step
        with_files = detail == self.upload.asset_id
        return replace(EMPTY, assets=(self.upload.snapshot(with_files, self.limit),))


def many_files(count: int) -> Any:
    specs = [
        ComponentSpec(
            f"rank{i:06d}/state.pt", f"/ckpt/rank{i:06d}/state.pt", 1024, None, None, 1, i, 1, 1
        )
        for i in range(count)
    ]
    up = AssetUpload(
        "asset-many",
        "checkpoint",
        RunBinding("http://127.0.0.1:1", "r", "e", 0, 0),
        {},
        plan_components(specs, part_threshold=64 * MB, part_size=16 * MB),
        None,
        local_dir="/ckpt",
    )
    up.state = AssetState.UPLOADING
    return up


async def one_asset(count: int, limit: int | None, refreshes: int) -> dict[str, object]:
    """Per refresh with the asset of ``count`` files selected: the engine's snapshot, and the
    snapshot plus the dashboard applying it and rendering its frame; then how long the app's
    loop is held (a key press waits that long) while it refreshes at its own rate."""
    source = UploadSource(labels=Labels(mode="bench"), upload=many_files(count), limit=limit)
    snaps: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        source.snapshot(source.upload.asset_id)
        snaps.append(time.perf_counter() - t0)
    source.upload = many_files(count)
    source.moved = 0
    applied: list[float] = []
    keys: list[float] = []
    app = MethodicApp(source, refresh_hz=0.001, watch_terminal=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.session.ready.wait()
        app._apply(source.snapshot(source.upload.asset_id), [])  # the first sight: adds rows
        await pilot.pause()
        for _ in range(refreshes):
            t0 = time.perf_counter()
            app._apply(source.snapshot(app.session.selected), [])
            app.screen._compositor.render_strips()
            applied.append(time.perf_counter() - t0)
            await pilot.pause()
        rows = app.screen.query_one("#components").row_count
    # The app at its own refresh rate, the asset selected: how late a 10 ms timer on its loop
    # fires (a key press waits as long), over ~3 s.
    app = MethodicApp(source, watch_terminal=False, **APP_OPTIONS)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.session.ready.wait()
        app.session.selected = source.upload.asset_id
        await pilot.pause()
        end = time.perf_counter() + 3.0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            keys.append(time.perf_counter() - t0 - 0.01)
    return {
        "files": count,
        "limit": limit,
        "rows": rows,
        "snapshot_ms": statistics.median(snaps) * 1000,
        "refresh_ms": statistics.median(applied) * 1000,
        "refresh_max_ms": max(applied) * 1000,
        "loop_lag_ms": statistics.median(keys) * 1000,
        "loop_lag_max_ms": max(keys) * 1000,
    }


def scale_report(counts: list[int], refreshes: int) -> list[dict[str, object]]:
    rows = []
    print(
        f"{'files':>8}{'detail':>8}{'rows':>8}{'snapshot ms':>13}{'refresh ms':>12}"
        f"{'(max)':>8}{'lag ms':>9}{'(max)':>8}"
    )
    for count in counts:
        for limit in (None, DETAIL_FILES):
            r = asyncio.run(one_asset(count, limit, refreshes))
            rows.append(r)
            print(
                f"{count:>8,}{'all' if limit is None else limit:>8}{r['rows']:>8,}"
                f"{r['snapshot_ms']:>13.1f}{r['refresh_ms']:>12.1f}{r['refresh_max_ms']:>8.0f}"
                f"{r['loop_lag_ms']:>9.1f}{r['loop_lag_max_ms']:>8.0f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256MB", help="bytes uploaded per throughput round")
    parser.add_argument("--repeat", type=int, default=3, help="throughput rounds per variant")
    parser.add_argument("--assets", type=int, default=1000)
    parser.add_argument("--components", type=int, default=50)
    parser.add_argument("--refreshes", type=int, default=30)
    parser.add_argument(
        "--refresh-hz",
        type=float,
        default=None,
        help="the dashboard's refresh rate (default: the app's)",
    )
    parser.add_argument(
        "--scale",
        default=None,
        help="only (c): one asset of this many 1 KiB files, e.g. 10000,100000: the engine's "
        "snapshot, a refresh, key-press latency, with every file detailed and with the "
        "dashboard's bound; writes results/tui-scale.json",
    )
    args = parser.parse_args()
    if args.refresh_hz:
        APP_OPTIONS["refresh_hz"] = args.refresh_hz
    if args.scale:
        counts = [int(n) for n in args.scale.split(",")]
        rows = scale_report(counts, min(args.refreshes, 10))
        out = Path(__file__).parent / "results" / "tui-scale.json"
        out.write_text(json.dumps({"cpus": os.cpu_count(), "scale": rows}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        return
    import logging

    logging.disable(logging.WARNING)  # the embedded server's shutdown notes
    total = int(parse_rate(args.size) or 0)
    tp = throughput(total, args.repeat)
    rf = asyncio.run(refresh(args.assets, args.components, args.refreshes))
    result = {
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "cpus": os.cpu_count(),
        "throughput": tp,
        "refresh": rf,
    }
    print(f"{'measure':<52}{'median':>12}{'goal':>12}")
    print(f"{'upload, --no-ui (MB/s)':<52}{tp['no_ui_MBps']:>12.1f}")
    print(f"{'upload, dashboard open (MB/s)':<52}{tp['dashboard_MBps']:>12.1f}")
    print(f"{'  dashboard / --no-ui':<52}{tp['ratio']:>11.2f}x{'>= 0.95x':>12}")
    print(f"{'  CPU seconds, dashboard / --no-ui':<52}{tp['cpu_ratio']:>11.2f}x")
    label = f"refresh, {args.assets} assets x {args.components} files (ms)"
    print(f"{label:<52}{rf['patch_ms']:>12.1f}{'< 50':>12}")
    print(f"{'  plus rendering the visible frame (ms)':<52}{rf['frame_ms']:>12.1f}")
    out = Path(__file__).parent / "results" / "tui.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
