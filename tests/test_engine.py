"""The transfer engine over real sockets: faults, parts, expiry, controls, bandwidth, events."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from helpers import CEILING, make_checkpoint, tree_digest, wait_until

from methodic import (
    AssetFinalized,
    AssetIncompleteError,
    AsyncChronicle,
    Chronicle,
    ComponentProgress,
    ComponentStateChanged,
    NotFoundError,
    RetryPolicy,
    RetryScheduled,
    UploadFailedError,
    UploadTracker,
    drain_incomplete_uploads,
)

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=6, base=0.05, cap=0.5)


def fresh_run(chronicle: Chronicle, name: str = "engine"):
    return chronicle.run(chronicle.create_experiment(name), 0, 0)


def test_connections_cut_mid_body_are_retried_to_identical_bytes(
    any_server, any_proxy, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 900_000 + i for i in range(6)})
    any_proxy.cut_after(300_000, connections=4)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        any_proxy.url, any_server.api_key, max_upload_workers=3, retry=FAST_RETRY
    ) as chronicle:
        sub = chronicle.subscribe()
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        handle.result(timeout=CEILING)
        retries = [e for e in sub.get_nowait() if isinstance(e, RetryScheduled)]
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert any_proxy.faults_fired >= 1 and retries
    assert tree_digest(dest) == tree_digest(ckpt)
    tracked = tracker.get_asset(handle.asset_id)
    assert tracked is not None and tracked.state == "finalized"
    assert sum(c.attempts for c in tracked.components) > len(tracked.components)


@pytest.mark.parametrize("storage_backend", ["local"])  # the local blob listener
def test_bytes_corrupted_in_transit_are_caught_and_sent_again(
    any_server, any_proxy, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"big.bin": 11 * MiB, "small.bin": 3 * MiB})
    any_proxy.corrupt(after=2 * MiB)
    with Chronicle(
        any_proxy.url,
        any_server.api_key,
        max_upload_workers=1,
        retry=FAST_RETRY,
        part_threshold=8 * MiB,
        part_size=5 * MiB,
    ) as chronicle:
        sub = chronicle.subscribe()
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=CEILING)
        causes = [e.cause for e in sub.get_nowait() if isinstance(e, RetryScheduled)]
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert any_proxy.faults_fired == 1
    assert any("checksum mismatch" in c for c in causes), causes
    assert tree_digest(dest) == tree_digest(ckpt)


@pytest.mark.parametrize("storage_backend", ["local"])  # the local blob listener
def test_stalled_transfer_is_aborted_and_retried(any_server, any_proxy, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 3 * MiB})
    # The stalled connection never moves again (within the test): only the stall timeout ends it.
    any_proxy.stall(2 * CEILING, after=1 * MiB)
    with Chronicle(
        any_proxy.url, any_server.api_key, retry=FAST_RETRY, stall_timeout=1.5
    ) as chronicle:
        sub = chronicle.subscribe()
        run = fresh_run(chronicle)
        run.register_and_upload_async(ckpt).result(timeout=CEILING)
        causes = [e.cause for e in sub.get_nowait() if isinstance(e, RetryScheduled)]
    assert any("Timeout" in c for c in causes), causes


def test_service_unavailable_and_429_are_retried_honouring_retry_after(
    server, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 1000, "b.bin": 2000})
    server.faults.add(status=503, count=1)
    server.faults.add(status=429, count=1, retry_after=1.0)
    started = time.monotonic()
    with Chronicle(server.url, server.api_key, retry=FAST_RETRY, max_upload_workers=1) as chronicle:
        sub = chronicle.subscribe()
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=CEILING)
        retries = [e for e in sub.get_nowait() if isinstance(e, RetryScheduled)]
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)
    assert [("503" in r.cause, "429" in r.cause) for r in retries] == [(True, False), (False, True)]
    assert retries[1].delay == pytest.approx(1.0)
    assert time.monotonic() - started >= 1.0


def test_a_component_waiting_for_its_retry_is_queued(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 1000})
    # Long enough that the poll below sees the wait even on a loaded machine.
    server.faults.add(status=503, count=1, retry_after=5.0)
    with Chronicle(server.url, server.api_key, retry=FAST_RETRY) as chronicle:
        sub = chronicle.subscribe()
        handle = fresh_run(chronicle).register_and_upload_async(ckpt)

        def component():
            (a,) = chronicle.snapshot(with_components=True).assets
            return a.components[0]

        # The 503 came back: the snapshot that shows it is the one checked.
        waiting = wait_until(lambda: (c := component()).last_error is not None and c)
        assert waiting.state == "queued" and "503" in (waiting.last_error or "")
        assert chronicle.snapshot().assets[0].state == "uploading"  # the asset is not paused
        handle.result(timeout=CEILING)
        events = [
            e for e in sub.get_nowait() if isinstance(e, ComponentStateChanged | RetryScheduled)
        ]
    assert [(e.kind, getattr(e, "state", None)) for e in events] == [
        ("ComponentStateChanged", "uploading"),
        ("RetryScheduled", None),
        ("ComponentStateChanged", "queued"),
        ("ComponentStateChanged", "uploading"),
        ("ComponentStateChanged", "completed"),
    ]
    assert "503" in (events[2].error or "")


def test_a_just_started_asset_has_no_rate_nor_eta_until_its_meter_settles(
    server, tmp_path: Path
) -> None:
    # One worker: the second asset waits (uploading, nothing sent) while the first goes, as in
    # a queue of checkpoints; when its bytes start, its first samples would say little.
    size, cap = 6 * MiB, 1.5e6
    first = make_checkpoint(tmp_path / "first", {"a.bin": 3 * MiB})
    second = make_checkpoint(tmp_path / "second", {"b.bin": size})
    seen = []
    with Chronicle(
        server.url, server.api_key, max_upload_workers=1, max_bandwidth=cap
    ) as chronicle:
        run = fresh_run(chronicle)
        run.register_and_upload_async(first)
        handle = run.register_and_upload_async(second)
        while not handle.done():
            snap = chronicle.snapshot()
            seen += [(time.monotonic(), a) for a in snap.assets if a.asset_id == handle.asset_id]
            time.sleep(0.05)
        handle.result(timeout=CEILING)
    moving = [(at, a) for at, a in seen if a.state == "uploading" and a.bytes_done > 0]
    started_at, started = moving[0]
    assert started.rate is None and started.eta is None  # not "16 B/s, ETA 29d"
    rated = [(at, a) for at, a in moving if a.rate is not None]
    assert rated, "a rate once a few seconds were measured"
    assert rated[0][0] - started_at >= 1.0  # two one-second samples after the first bytes
    for _, a in rated:
        assert 0.6 * cap <= a.rate <= 1.4 * cap, a.rate
        assert a.eta == pytest.approx((size - a.bytes_done) / a.rate)


def test_client_error_fails_at_once_with_the_servers_message(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 1000})
    server.faults.add(status=400, count=10)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, retry=FAST_RETRY) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        with pytest.raises(UploadFailedError, match="400"):
            handle.result(timeout=CEILING)
    tracked = tracker.get_asset(handle.asset_id)
    assert tracked is not None and tracked.state == "failed"
    comp = tracked.components[0]
    assert comp.state == "failed" and comp.attempts == 1 and "injected" in (comp.last_error or "")


@pytest.mark.parametrize("storage_backend", ["local"])  # the local blob listener
def test_retries_exhausted_then_retry_failed_finishes(
    any_server, any_proxy, tmp_path: Path
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 600_000})
    any_proxy.cut_after(100_000, connections=50)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    policy = RetryPolicy(max_attempts=2, base=0.01, cap=0.05)
    with Chronicle(any_proxy.url, any_server.api_key, retry=policy) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        with pytest.raises(UploadFailedError) as info:
            handle.result(timeout=CEILING)
        assert info.value.cause is not None
        tracked = tracker.get_asset(handle.asset_id)
        assert tracked is not None and tracked.state == "failed"
        assert tracked.components[0].state == "failed" and tracked.components[0].last_error
        any_proxy.faults.clear()
        assert chronicle.retry_failed() == [handle.asset_id]
        run.wait_for_uploads(timeout=CEILING)
    assert tracker.get_asset(handle.asset_id).state == "finalized"


def test_parts_resume_sends_only_the_missing_parts(any_server, any_proxy, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"big.bin": 40 * MiB})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    opts = dict(part_threshold=8 * MiB, part_size=5 * MiB, retry=FAST_RETRY)
    with Chronicle(
        any_proxy.url, any_server.api_key, max_upload_workers=2, max_bandwidth="12MB", **opts
    ) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: len(tracker.get_asset(handle.asset_id).components[0].parts_done) >= 3)
    # The Chronicle closed mid-upload: some parts stored, others not.
    done = tracker.get_asset(handle.asset_id).components[0].parts_done
    remote = httpx.get(
        f"{any_server.url}/api/v1/assets/{handle.asset_id}",
        headers={"Authorization": f"Bearer {any_server.api_key}"},
    ).json()
    stored = set(remote["components"][0]["parts_stored"])
    assert done <= stored and 3 <= len(stored) < 8
    before = any_proxy.bytes_up
    with Chronicle(any_proxy.url, any_server.api_key, **opts) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.finalized == [handle.asset_id] and report.ok
        dest = chronicle.run(run.experiment_id, 0, 0).download_asset(
            handle.asset_id, tmp_path / "dl"
        )
    resent = any_proxy.bytes_up - before
    missing = 40 * MiB - len(stored) * 5 * MiB
    assert report.bytes_skipped == len(stored) * 5 * MiB
    assert report.bytes_resent == missing
    assert missing <= resent < missing + 256 * 1024  # plus HTTP heads and API calls
    assert tree_digest(dest) == tree_digest(ckpt)


def test_expired_targets_are_presigned_again(tmp_path: Path) -> None:
    from methodic.server import EmbeddedServer

    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i}.bin": 400_000 for i in range(8)})
    with (
        EmbeddedServer(tmp_path / "srv", presign_ttl=2.0) as srv,
        Chronicle(
            srv.url, srv.api_key, max_upload_workers=1, max_bandwidth="800KB", retry=FAST_RETRY
        ) as chronicle,
    ):
        sub = chronicle.subscribe()
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=CEILING)  # ~4 s of transfers with 2 s targets
        # Now make the client trust stale targets: the server's 403 must trigger one re-presign.
        chronicle.core._pool.scheduler.presign_margin = -3600.0
        ckpt2 = make_checkpoint(tmp_path / "ckpt2", {f"g{i}.bin": 400_000 for i in range(8)})
        handle2 = run.register_and_upload_async(ckpt2)
        handle2.result(timeout=CEILING)
        retried = [e for e in sub.get_nowait() if isinstance(e, RetryScheduled)]
        dest = run.download_asset(handle2.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt2)
    assert retried == []  # a refresh is not a retry


def test_the_next_batch_is_presigned_while_targets_remain(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers do not wait on a presign round trip every batch: the next batch is presigned
    in the background once half the cached targets are used."""
    from methodic._jobs import PRESIGN_BATCH, Scheduler

    calls: list[tuple[bool, int]] = []  # (for a job waiting on it, targets cached then)
    real = Scheduler._presign

    async def presign(self: Scheduler, up, first):  # type: ignore[no-untyped-def]
        calls.append((first is not None, len(up.targets)))
        await real(self, up, first)

    monkeypatch.setattr(Scheduler, "_presign", presign)
    count = 3 * PRESIGN_BATCH
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i:04d}.bin": 100 for i in range(count)})
    with Chronicle(server.url, server.api_key, max_upload_workers=1) as chronicle:
        handle = fresh_run(chronicle).register_and_upload_async(ckpt)
        assert handle.result(timeout=CEILING).component_count == count
    ahead = [cached for waited, cached in calls if not waited]
    assert ahead and all(cached > 0 for cached in ahead)


def test_pause_stops_transfers_and_resume_finishes(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 2 * MiB for i in range(4)})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        server.url, server.api_key, max_upload_workers=2, max_bandwidth="4MB"
    ) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 300_000)
        assert chronicle.pause() == [handle.asset_id]
        # The transfers in flight are cancelled: none is uploading any more.
        wait_until(
            lambda: all(
                c.state != "uploading"
                for c in chronicle.snapshot(with_components=True).assets[0].components
            ),
            what="the transfers in flight stopped",
        )
        first = chronicle.snapshot().assets[0]
        time.sleep(1.0)  # a window in which a paused asset must send nothing
        second = chronicle.snapshot().assets[0]
        assert first.state == second.state == "paused"
        assert second.bytes_done == first.bytes_done < 8 * MiB
        assert tracker.get_asset(handle.asset_id).state == "paused"
        assert not handle.done()
        assert chronicle.resume(handle.asset_id) == [handle.asset_id]
        handle.result(timeout=CEILING)
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)


def test_paused_asset_stays_paused_across_a_restart(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"s.bin": 4 * MiB})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key, max_bandwidth="2MB") as chronicle:
        handle = fresh_run(chronicle).register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0)
        chronicle.pause(handle.asset_id)
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    assert handle.asset_id in report.skipped and report.finalized == []
    assert tracker.get_asset(handle.asset_id).state == "paused"


def test_force_finalize_succeeds_when_storage_is_complete(any_server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 3 * MiB, "b.bin": 1000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        any_server.url, any_server.api_key, max_upload_workers=1, max_bandwidth="1MB"
    ) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0)
        chronicle.pause(handle.asset_id)
        # Out of band, someone stores every byte (e.g. another tool): the server can finalize.
        auth = {"Authorization": f"Bearer {any_server.api_key}"}
        targets = httpx.post(
            f"{any_server.url}/api/v1/assets/{handle.asset_id}/presign",
            headers=auth,
            json={"targets": [{"path": "a.bin", "part": None}, {"path": "b.bin", "part": None}]},
        ).json()["targets"]
        for t in targets:
            httpx.put(t["url"], content=(ckpt / t["path"]).read_bytes()).raise_for_status()
        asset = chronicle.force_finalize(handle.asset_id)
        assert asset.state == "finalized"
        assert handle.result(timeout=CEILING).state == "finalized"
        assert [a.asset_id for a in run.list_assets()] == [handle.asset_id]
    assert tracker.get_asset(handle.asset_id).state == "finalized"


def test_force_finalize_refused_lists_what_is_missing(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 4 * MiB, "b.bin": 1000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        server.url, server.api_key, max_upload_workers=1, max_bandwidth="1MB"
    ) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0)
        with pytest.raises(AssetIncompleteError) as info:
            chronicle.force_finalize(handle.asset_id)
        assert "a.bin" in info.value.missing
        assert run.list_assets() == []
    # A refusal changes nothing (tests/test_no_silent_surprises.py): the upload goes on.
    assert tracker.get_asset(handle.asset_id).state in ("uploading", "finalized")


def test_discard_stops_forgets_and_aborts_on_the_server(any_server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 4 * MiB})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(any_server.url, any_server.api_key, max_bandwidth="2MB") as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0)
        chronicle.discard(handle.asset_id)
        with pytest.raises(UploadFailedError, match="discarded"):
            handle.result(timeout=CEILING)
        with pytest.raises(NotFoundError):
            chronicle.get_asset(handle.asset_id)
        assert run.list_assets(include_pending=True) == []
    assert tracker.get_asset(handle.asset_id).state == "discarded"
    assert tracker.get_pending_uploads() == []


def test_bandwidth_cap_holds_across_workers(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"s{i}.bin": 2 * MiB for i in range(6)})
    with Chronicle(
        server.url, server.api_key, max_upload_workers=4, max_bandwidth="4MiB"
    ) as chronicle:
        run = fresh_run(chronicle)
        started = time.monotonic()
        run.register_and_upload_async(ckpt).result(timeout=CEILING)
        elapsed = time.monotonic() - started
    assert elapsed >= 12 / 4 * 0.8  # 12 MiB at 4 MiB/s, less a generous burst allowance


def test_a_file_changed_after_registration_fails_clearly(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 2 * MiB, "z.bin": 1000})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        server.url, server.api_key, max_upload_workers=1, max_bandwidth="2MB"
    ) as chronicle:
        run = fresh_run(chronicle)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        with open(ckpt / "z.bin", "ab") as f:  # still queued behind a.bin
            f.write(b"torn")
        with pytest.raises(UploadFailedError, match="changed after it was registered"):
            handle.result(timeout=CEILING)
        assert run.list_assets(include_pending=False) == []
    comp = next(c for c in tracker.get_asset(handle.asset_id).components if c.path == "z.bin")
    assert comp.state == "failed" and "register" in comp.last_error


async def test_events_are_throttled_and_snapshot_is_consistent(server, tmp_path: Path) -> None:
    ckpt = await asyncio.to_thread(
        make_checkpoint, tmp_path / "ckpt", {"a.bin": 6 * MiB, "b.bin": 10}
    )
    async with AsyncChronicle(server.url, server.api_key, max_bandwidth="4MB") as chronicle:
        sub = chronicle.subscribe()
        run = await chronicle.run(await chronicle.create_experiment("events"), 0, 0)
        started = time.monotonic()
        handle = await run.register_and_upload_async(ckpt)
        snap = await chronicle.snapshot(with_components=True)
        assert (
            snap.assets[0].asset_id == handle.asset_id
            and snap.assets[0].bytes_total == 6 * MiB + 10
        )
        await handle.result(timeout=CEILING)
        elapsed = time.monotonic() - started
        events = sub.get_nowait()
    progress = [e for e in events if isinstance(e, ComponentProgress) and e.path == "a.bin"]
    assert len(progress) <= elapsed / 0.25 + 2
    assert len(progress) >= 2
    assert [e.asset_id for e in events if isinstance(e, AssetFinalized)] == [handle.asset_id]
    assert all(e.to_json()["event"] for e in events)


def test_set_bandwidth_while_running(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 8 * MiB})
    cap = 100_000  # bytes/s: the 8 MiB would take 84 s
    with Chronicle(server.url, server.api_key, max_bandwidth=cap) as chronicle:
        handle = fresh_run(chronicle).register_and_upload_async(ckpt)
        wait_until(lambda: chronicle.snapshot().bytes_done > 0, what="the first bytes")
        assert not handle.done()
        chronicle.set_bandwidth(None)
        started = time.monotonic()
        handle.result(timeout=CEILING)
    # Far less than what is left would take at the cap: the cap was lifted mid-transfer.
    assert time.monotonic() - started < 8 * MiB / cap / 2


def test_unknown_asset_controls_raise_not_found(server) -> None:
    with Chronicle(server.url, server.api_key) as chronicle:
        with pytest.raises(NotFoundError):
            chronicle.pause("nope")
        with pytest.raises(NotFoundError):
            chronicle.discard("nope")
        assert chronicle.pause() == [] and chronicle.retry_failed() == []
