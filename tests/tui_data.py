"""Fixed data (not tests) for the dashboard's snapshot tests: no live rates, times or ports."""

from __future__ import annotations

from methodic import (
    AssetFinalized,
    AssetSnapshot,
    AssetStateChanged,
    ComponentSnapshot,
    ComponentStateChanged,
    Event,
    PoolSnapshot,
    RetryScheduled,
    RunBinding,
    TrackedAsset,
    TrackedComponent,
)
from methodic_tui.notices import Notice
from methodic_tui.source import Labels, StaticSource

NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
MB = 1_000_000


def _components(done_upto: int, *, failed: bool = False) -> tuple[ComponentSnapshot, ...]:
    comps = []
    for i in range(1, 5):
        size = 14 * MB
        state = "completed" if i <= done_upto else "uploading" if i == done_upto + 1 else "queued"
        done = size if state == "completed" else size // 3 if state == "uploading" else 0
        comps.append(
            ComponentSnapshot(
                f"model-{i:05d}-of-00004.safetensors",
                state,
                done,
                size,
                0,
                0,
                1 if state != "queued" else 0,
                None,
            )
        )
    comps.append(
        ComponentSnapshot(
            "optimizer.pt",
            "failed" if failed else "uploading",
            10 * MB,
            24 * MB,
            2,
            5,
            3 if failed else 2,
            "HTTP 503: injected fault 503 (test or demo)",
        )
    )
    comps.append(ComponentSnapshot("rng_state[0].pth", "completed", 1000, 1000, 0, 0, 1, None))
    return tuple(comps)


def asset(
    n: int,
    state: str,
    done: int,
    total: int,
    files: tuple[int, int],
    rate: float | None = None,
    eta: float | None = None,
    error: str | None = None,
    components: tuple[ComponentSnapshot, ...] = (),
) -> AssetSnapshot:
    return AssetSnapshot(
        asset_id=f"0190a1b2-0000-7000-8000-{n:012d}",
        asset_type="checkpoint",
        local_dir=f"/scratch/run42/checkpoint-{n * 1000}",
        state=state,
        components_done=files[0],
        component_count=files[1],
        bytes_done=done,
        bytes_total=total,
        rate=rate,
        eta=eta,
        last_error=error,
        components=components,
    )


def sample_snapshot() -> PoolSnapshot:
    assets = (
        asset(1, "finalized", 60 * MB, 60 * MB, (8, 8)),
        asset(
            2,
            "uploading",
            31 * MB,
            60 * MB,
            (3, 8),
            rate=12.4 * MB,
            eta=2.3,
            components=_components(2),
        ),
        asset(
            3,
            "failed",
            52 * MB,
            60 * MB,
            (6, 8),
            error="optimizer.pt: HTTP 503 (after 3 attempts)",
            components=_components(4, failed=True),
        ),
        asset(4, "paused", 5 * MB, 60 * MB, (1, 8)),
        asset(5, "uploading", 300_000, 60 * MB, (0, 8)),  # just started: no rate or ETA yet
    )
    history = tuple(float((i * 7) % 25) * MB for i in range(60))
    return PoolSnapshot(
        assets=assets,
        rate=24.6 * MB,
        history=history,
        total_sent=148 * MB,
        bandwidth_cap=25 * MB,
        workers=8,
        active_transfers=5,
    )


def sample_events() -> list[Event]:
    ids = [a.asset_id for a in sample_snapshot().assets]
    return [
        Notice(
            None,
            "info",
            "no --server-url: started an embedded Chronicle server at http://127.0.0.1:8765",
            at=NOW - 30,
        ),
        AssetStateChanged(ids[0], "uploading", at=NOW - 29),
        RetryScheduled(
            ids[0],
            "model-00001-of-00004.safetensors",
            1,
            0.4,
            "HTTP 503: injected fault 503 (test or demo)",
            at=NOW - 28,
        ),
        AssetFinalized(ids[0], "checkpoint", 60 * MB, 8, at=NOW - 20),
        ComponentStateChanged(
            ids[2],
            "optimizer.pt",
            "failed",
            "optimizer.pt: HTTP 503 (after 3 attempts)",
            at=NOW - 10,
        ),
        AssetStateChanged(
            ids[2], "failed", "optimizer.pt: HTTP 503 (after 3 attempts)", at=NOW - 10
        ),
        AssetStateChanged(ids[3], "paused", at=NOW - 5),
    ]


def tracked(
    n: int, state: str, done: int, *, error: str | None = None, pid: int | None = None
) -> TrackedAsset:
    comps = tuple(
        TrackedComponent(
            asset_id=f"0190a1b2-0000-7000-8000-{n:012d}",
            path=f"shard-{i:02d}.bin",
            local_path=f"/scratch/run42/checkpoint-{n * 1000}/shard-{i:02d}.bin",
            size=10 * MB,
            sha256=None,
            mtime_ns=None,
            inode=None,
            part_size=None,
            state="completed" if i < done else "queued",
            bytes_sent=10 * MB if i < done else 0,
            attempts=1 if i < done else 0,
            last_error=None,
            checksum=None,
        )
        for i in range(6)
    )
    return TrackedAsset(
        asset_id=f"0190a1b2-0000-7000-8000-{n:012d}",
        asset_type="checkpoint",
        state=state,
        sealed=True,
        metadata={},
        binding=RunBinding("http://127.0.0.1:8765", "r", "e", 0, 0),
        local_dir=f"/scratch/run42/checkpoint-{n * 1000}",
        created_at=NOW - 3600 * n,
        updated_at=NOW - 600,
        last_error=error,
        owner_pid=pid,
        component_count=6,
        completed_count=done,
        total_bytes=60 * MB,
        bytes_sent=done * 10 * MB,
        components=comps,
    )


def sample_pending() -> list[TrackedAsset]:
    return [
        tracked(7, "uploading", 2),
        tracked(8, "failed", 5, error="shard-05.bin: HTTP 500 (after 6 attempts)"),
        tracked(9, "paused", 1),
    ]


def held_snapshot() -> PoolSnapshot:
    held = tuple(
        asset(
            n,
            "interrupted" if t.state != "paused" else "paused",
            t.bytes_sent,
            t.total_bytes,
            (t.completed_count, t.component_count),
        )
        for n, t in zip((7, 8, 9), sample_pending(), strict=True)
    )
    return PoolSnapshot(
        assets=held,
        rate=0.0,
        history=(0.0,) * 60,
        total_sent=0,
        bandwidth_cap=None,
        workers=8,
        active_transfers=0,
    )


def labels() -> Labels:
    return Labels(
        server="http://127.0.0.1:8765",
        run="demo v0 r0",
        tracker="/scratch/run42/uploads.sqlite",
        mode="upload",
    )


def sample_source() -> StaticSource:
    return StaticSource(sample_snapshot(), sample_events(), labels=labels())


def recovery_source() -> StaticSource:
    return StaticSource(held_snapshot(), [], held=sample_pending(), labels=labels())
