"""Many small files (issue 15): small bodies over the kept-alive connections of the sendfile
path, and per-file work that does not grow with the asset."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest
from helpers import CEILING, make_checkpoint, tree_digest, wait_until_async
from test_sendfile import _OneShotServer
from test_server import create_asset, make_run, put, stored_files

import methodic._transfer as transfer
from methodic import Chronicle, UploadTracker
from methodic._bandwidth import TokenBucket
from methodic._sendfile import Connections
from methodic._transfer import CHUNK_SIZE, FileIdentity, send_range
from methodic._types import UploadTarget

KiB = 1 << 10


@pytest.mark.parametrize("storage_backend", ["local"])
def test_small_bodies_go_in_one_write_over_one_kept_alive_connection(
    any_server, any_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = transfer.put_body

    async def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return await real(*args, **kwargs)

    monkeypatch.setattr(transfer, "put_body", counting)
    sizes = {f"rank{i:02d}/state.bin": 1 + 997 * i for i in range(30)} | {"empty.bin": 0}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    with Chronicle(any_proxy.url, any_server.api_key, max_upload_workers=1) as chronicle:
        run = chronicle.run(chronicle.create_experiment("small"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        asset = handle.result(timeout=CEILING)
        connections = any_proxy.connections
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert asset.state == "finalized"
    assert sorted(calls) == sorted(sizes.values())
    assert tree_digest(dest) == tree_digest(ckpt)
    assert connections == 1  # one worker: every body on the same kept-alive connection


async def test_small_ranges_arrive_whole_and_a_closed_connection_is_not_reused(
    tmp_path: Path,
) -> None:
    data = os.urandom(CHUNK_SIZE)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    st = path.stat()
    identity = FileIdentity(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    peer = _OneShotServer()
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connections = Connections()
    ranges = ((0, 64 * KiB), (1000, CHUNK_SIZE - 1000), (5, 0))
    try:
        async with httpx.AsyncClient() as http:
            for offset, length in ranges:
                target = UploadTarget(
                    path="f.bin",
                    part=None,
                    method="PUT",
                    url=f"http://127.0.0.1:{port}/b",
                    headers={"x-test": "1"},
                    offset=offset,
                    length=length,
                    expires_at=0.0,
                )
                # The server has closed the previous connection (so it must not be reused).
                await wait_until_async(lambda: peer.closed == peer.connections, what="closed")
                progress: list[int] = []
                etag = await send_range(
                    http, target, identity, TokenBucket(None), progress.append, connections
                )
                digest = hashlib.sha256(data[offset : offset + length]).hexdigest()
                assert etag is not None and etag.strip('"') == digest
                assert sum(progress) == length
    finally:
        connections.close()
        server.close()
        await server.wait_closed()
    assert peer.connections == len(ranges)
    assert peer.bodies == [data[o : o + n] for o, n in ranges]


def test_presign_reads_the_rows_asked_for_not_the_whole_manifest(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A presign call of a few targets costs the same in a 3,000-file asset as in a small one:
    it loads the components it names (and their part receipts), not every component."""
    import methodic.server.records as records

    loaded: list[str] = []
    real = records.component_of

    def counting(row, *args, **kwargs):
        loaded.append(row["path"])
        return real(row, *args, **kwargs)

    monkeypatch.setattr(records, "component_of", counting)
    run_id = make_run(api)
    files = [{"path": f"rank{i:04d}.bin", "size": 10} for i in range(3000)]
    parted = {"path": "big", "size": 10, "part_size": 4}
    asset_id = create_asset(api, run_id, [*files, parted], presign=False).json()["asset_id"]
    url = f"/api/v1/assets/{asset_id}/presign"
    big = [{"path": "big", "part": n} for n in (1, 2, 3)]
    targets = api.post(url, json={"targets": big}).json()["targets"]
    assert [(t["path"], t["part"], t["length"]) for t in targets] == [
        ("big", 1, 4),
        ("big", 2, 4),
        ("big", 3, 2),
    ]
    assert put(targets[0], b"0123456789").status_code in (200, 201)  # a part receipt

    loaded.clear()
    asked = [{"path": "rank2999.bin", "part": None}, {"path": "big", "part": 2}]
    asked += [{"path": f"rank{i:04d}.bin", "part": None} for i in range(5)]
    targets = api.post(url, json={"targets": asked}).json()["targets"]
    assert [(t["path"], t["part"]) for t in targets] == [(a["path"], a["part"]) for a in asked]
    assert sorted(loaded) == sorted({a["path"] for a in asked})  # 7 rows, not 3,001
    missing = api.post(url, json={"targets": [{"path": "nope", "part": None}]})
    assert missing.status_code == 404


@pytest.mark.parametrize("storage_backend", ["local"])
def test_a_small_file_is_read_once_and_sent_as_the_bytes_that_were_hashed(
    any_server, any_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files up to KEEP_BODY go out as the bytes their bound digest was computed from (no
    second read); bigger ones go by sendfile from the file (never read into Python to be sent;
    the receiver checks them against the bound digest). The server stores exactly the files."""
    from methodic._digests import KEEP_BODY

    reads: list[int] = []
    real = transfer._read_slice

    def counting(identity, offset, length):
        reads.append(length)
        return real(identity, offset, length)

    by_sendfile: list[int] = []
    real_range = transfer.put_file_range

    async def counting_range(*args, **kwargs):
        by_sendfile.append(args[1].length)
        return await real_range(*args, **kwargs)

    monkeypatch.setattr(transfer, "_read_slice", counting)
    monkeypatch.setattr(transfer, "put_file_range", counting_range)
    sizes = {f"s{i}.bin": 100 * i for i in range(40)} | {"edge.bin": KEEP_BODY}
    sizes |= {"over.bin": KEEP_BODY + 1}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    with Chronicle(any_proxy.url, any_server.api_key, max_upload_workers=4) as chronicle:
        run = chronicle.run(chronicle.create_experiment("small"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        assert handle.result(timeout=CEILING).state == "finalized"
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert reads == []
    assert by_sendfile == [KEEP_BODY + 1]
    assert tree_digest(dest) == tree_digest(ckpt)


def test_a_brief_create_answers_without_the_components(api: httpx.Client) -> None:
    run_id = make_run(api)
    files = [{"path": f"rank{i:04d}.bin", "size": 10} for i in range(50)]
    body = {
        "asset_id": "brief-1",
        "asset_type": "checkpoint",
        "components": files,
        "checksum_algorithm": "crc64nvme",
        "brief": True,
    }
    created = api.post(f"/api/v1/runs/{run_id}/assets", json=body)
    assert created.status_code == 201
    answer = created.json()
    assert answer["components"] == []
    assert (answer["state"], answer["component_count"], answer["total_size"]) == (
        "pending",
        50,
        500,
    )
    assert answer["checksum_algorithm"] == "crc64nvme"
    again = api.post(f"/api/v1/runs/{run_id}/assets", json=body)  # the same manifest: 200
    assert again.status_code == 200 and again.json()["components"] == []
    full = api.get("/api/v1/assets/brief-1").json()
    assert [c["path"] for c in full["components"]] == [f["path"] for f in files]


def test_finalize_fsyncs_every_file_of_a_many_file_asset(
    server, api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsyncs of finalize run a few files per pool task: still every file, then its
    directories, before the asset is finalized."""
    import methodic.server.storage.local as local

    synced: list[Path] = []
    real = local._fsync_path

    def counting(path: Path, *, directory: bool = False) -> None:
        synced.append(Path(path))
        real(path, directory=directory)

    monkeypatch.setattr(local, "_fsync_path", counting)
    run_id = make_run(api)
    data = {f"rank{i:03d}.bin": os.urandom(i + 1) for i in range(97)}
    files = [{"path": p, "size": len(b)} for p, b in data.items()]
    created = create_asset(api, run_id, files, algorithm="crc64nvme").json()
    for target in created["targets"]:
        assert put(target, data[target["path"]]).status_code in (200, 201)
    assert synced == []
    final = api.post(f"/api/v1/assets/{created['asset_id']}/finalize", json={})
    assert final.status_code == 200 and final.json()["state"] == "finalized"
    stored = stored_files(server)
    assert len(stored) == len(data)
    assert set(stored) <= set(synced)
    assert {f.parent for f in stored} <= set(synced)


@pytest.mark.parametrize("algorithm", ["crc64nvme", "sha256"])
def test_finalize_answers_briefly_and_the_asset_is_what_the_server_settled(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    """The engine's finalize answer carries no components (100,000 of them were the client's
    peak RSS); the asset it returns, its components built from the engine's manifest, is
    exactly the one the server reports, parted files included."""
    from methodic._api import ApiClient

    answers: list[dict] = []
    real = ApiClient._call

    async def recording(self, method, path, *args, **kwargs):
        data = await real(self, method, path, *args, **kwargs)
        if path.endswith("/finalize"):
            answers.append(data)
        return data

    monkeypatch.setattr(ApiClient, "_call", recording)
    sizes = {f"rank{i:02d}.bin": 100 * i for i in range(20)} | {"big.bin": 11 << 20}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    with Chronicle(
        server.url,
        server.api_key,
        part_threshold=6 << 20,
        part_size=5 << 20,
        checksum_algorithm=algorithm,
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("brief"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        asset = handle.result(timeout=CEILING)
        full = chronicle.get_asset(handle.asset_id)
    assert [a["components"] for a in answers] == [[]]
    assert answers[0]["components_fingerprint"]
    assert asset.checksum_algorithm == algorithm
    assert asset == full
    assert {c.path: c.parts_stored for c in asset.components}["big.bin"] == (1, 2, 3)


@pytest.mark.parametrize("storage_backend", ["local"])
def test_components_the_server_did_not_settle_so_are_read_back(
    any_server, any_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the components built from the engine's manifest do not have the fingerprint of
    the brief answer, the asset returned has the server's, read back."""
    import dataclasses

    import methodic._finish as finish

    real = finish.settled_components

    def wrong(*args, **kwargs):
        built = real(*args, **kwargs)
        return (dataclasses.replace(built[0], checksum="crc64nvme:0"), *built[1:])

    monkeypatch.setattr(finish, "settled_components", wrong)
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i}.bin": 10 + i for i in range(5)})
    with Chronicle(any_proxy.url, any_server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("brief"), 0, 0)
        handle = run.register_and_upload_async(
            ckpt, upload_tracker=UploadTracker(tmp_path / "u.sqlite")
        )
        asset = handle.result(timeout=CEILING)
        full = chronicle.get_asset(handle.asset_id)
    assert asset == full and len(asset.components) == 5
    assert all(c.checksum != "crc64nvme:0" for c in asset.components)


async def test_a_detailed_snapshot_of_many_files_holds_the_block_of_the_first_unfinished() -> None:
    """A dashboard's snapshot of a 100,000-file asset builds ``limit`` file snapshots, not all;
    the TUI's attach view chooses the same block from the tracker's rows."""
    from methodic._states import ComponentState
    from methodic._types import ComponentSpec, RunBinding
    from methodic._uploads import AssetUpload, plan_components
    from methodic_tui.source import DETAIL_FILES, detail_window

    count = 2 * DETAIL_FILES + 500
    specs = [
        ComponentSpec(f"f{i:05d}", f"/x/f{i:05d}", 10, None, None, 1, i, 1, 1) for i in range(count)
    ]
    comps = plan_components(specs, part_threshold=1 << 30, part_size=16 << 20)
    up = AssetUpload("a", "checkpoint", RunBinding("u", "r", "e", 0, 0), {}, comps, None)
    ordered = list(comps.values())

    def listed() -> list[str]:
        paths = [c.path for c in up.snapshot(True, DETAIL_FILES).components]
        window = detail_window(ordered, lambda c: c.state == ComponentState.COMPLETED)
        assert paths == [c.path for c in window]
        return paths

    assert listed() == [f"f{i:05d}" for i in range(DETAIL_FILES)]
    for c in ordered[: DETAIL_FILES + 3]:
        c.state = ComponentState.COMPLETED
    assert listed() == [f"f{i:05d}" for i in range(DETAIL_FILES, 2 * DETAIL_FILES)]
    ordered[7].state = ComponentState.FAILED  # an early file not done: its block
    assert listed()[7] == "f00007"
    for c in ordered:
        c.state = ComponentState.COMPLETED
    assert listed() == [f"f{i:05d}" for i in range(count - DETAIL_FILES, count)]
    assert len(up.snapshot(True).components) == count  # no limit: every file
    assert up.snapshot(False, DETAIL_FILES).components == ()
