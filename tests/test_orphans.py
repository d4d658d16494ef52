"""Orphans: pending assets nobody finalizes expire, and their stored bytes are removed (both backends)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import backend_config
from helpers import connect, make_checkpoint, tree_digest, wait_until
from s3helpers import bucket_keys, multipart_uploads

from methodic import Chronicle, UploadTracker, drain_incomplete_uploads
from methodic.server import EmbeddedServer

MiB = 1 << 20
# Far longer than any step of the client takes, even on a loaded machine (a 6 MiB PUT, an
# upload at 400 kB/s): a pending asset must not expire while its client is still at work.
TTL = 10.0
SWEEP = 0.1


def new_asset(api: httpx.Client, components: list[dict[str, Any]]) -> dict[str, Any]:
    exp = api.post("/api/v1/experiments", json={"name": "orphans"}).json()["id"]
    run = api.put(f"/api/v1/experiments/{exp}/runs/0/0").json()["id"]
    body = {
        "asset_id": uuid.uuid4().hex,
        "asset_type": "x",
        "components": components,
        "presign": True,
    }
    response = api.post(f"/api/v1/runs/{run}/assets", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def put(target: dict[str, Any], data: bytes) -> None:
    body = data[target["offset"] : target["offset"] + target["length"]]
    response = httpx.put(target["url"], content=body, headers=target["headers"], trust_env=False)
    assert response.status_code < 300, response.text


def stored_bytes(
    srv: EmbeddedServer, storage_backend: str, request: pytest.FixtureRequest
) -> list[str]:
    """Every stored object and unfinished multipart upload of the server's storage."""
    if storage_backend == "local":
        return sorted(str(p) for p in (srv.data_dir / "blobs").rglob("*") if p.is_file())
    endpoint, bucket = (
        request.getfixturevalue("moto_endpoint"),
        request.getfixturevalue("s3_bucket"),
    )
    return bucket_keys(endpoint, bucket) + [k for k, _ in multipart_uploads(endpoint, bucket)]


def test_an_idle_pending_asset_expires_and_its_bytes_are_removed(
    storage_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = backend_config(
        storage_backend, tmp_path / "srv", request, pending_ttl=TTL, sweep_interval=SWEEP
    )
    data = bytes(range(256)) * (24 * 1024)  # 6 MiB: two parts
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        finalized = new_asset(api, [{"path": "done", "size": 3}])
        put(finalized["targets"][0], b"abc")
        assert api.post(f"/api/v1/assets/{finalized['asset_id']}/finalize").status_code == 200
        orphan = new_asset(
            api, [{"path": "a", "size": 3}, {"path": "m", "size": len(data), "part_size": 5 * MiB}]
        )
        put(orphan["targets"][0], b"abc")
        put(orphan["targets"][1], data)
        assert len(stored_bytes(srv, storage_backend, request)) == 3  # done, a, m (part or upload)

        wait_until(lambda: api.get(f"/api/v1/assets/{orphan['asset_id']}").status_code == 404)
        wait_until(lambda: len(stored_bytes(srv, storage_backend, request)) == 1)
        assert api.get(f"/api/v1/assets/{finalized['asset_id']}").json()["state"] == "finalized"
        url = api.get(f"/api/v1/assets/{finalized['asset_id']}/download").json()["components"][0][
            "url"
        ]
        assert httpx.get(url, trust_env=False).content == b"abc"


def test_activity_keeps_a_pending_asset_alive(
    storage_backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from methodic.server import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "_TOUCH_GRANULARITY_S", 0.0)  # every presign counts
    # A TTL well over the client's pauses (0.5 s, plus a loaded machine's delays), and the
    # client active for longer than the TTL.
    ttl = 4.0
    config = backend_config(
        storage_backend, tmp_path / "srv", request, pending_ttl=ttl, sweep_interval=SWEEP
    )
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        asset = new_asset(api, [{"path": "a", "size": 3}])
        presign = f"/api/v1/assets/{asset['asset_id']}/presign"
        active_until = time.monotonic() + 1.5 * ttl
        while time.monotonic() < active_until:  # a slow client, active for 1.5 x the TTL
            assert (
                api.post(presign, json={"targets": [{"path": "a", "part": None}]}).status_code
                == 200
            )
            time.sleep(0.5)
        assert api.get(f"/api/v1/assets/{asset['asset_id']}").status_code == 200
        wait_until(lambda: api.get(f"/api/v1/assets/{asset['asset_id']}").status_code == 404)


def test_assets_that_expired_while_the_server_was_down_go_at_start(tmp_path: Path) -> None:
    from methodic.server import ServerConfig

    with EmbeddedServer(tmp_path / "srv") as srv, connect(srv) as api:
        asset = new_asset(api, [{"path": "a", "size": 3}])
        put(asset["targets"][0], b"abc")
    time.sleep(0.3)
    config = ServerConfig(data_dir=tmp_path / "srv", port=0, pending_ttl=0.2, sweep_interval=3600)
    with EmbeddedServer.from_config(config) as srv, connect(srv) as api:
        wait_until(lambda: api.get(f"/api/v1/assets/{asset['asset_id']}").status_code == 404)
        assert not [p for p in (tmp_path / "srv" / "blobs").rglob("*") if p.is_file()]


def test_a_failed_removal_is_retried_by_the_next_sweep(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "srv") as srv, connect(srv) as api:
        asset = new_asset(api, [{"path": "a", "size": 3}])
        put(asset["targets"][0], b"abc")
        catalog = srv._state.catalog  # type: ignore[union-attr]
        real = catalog.storage.delete_asset

        def failing(asset_id: str) -> None:
            raise OSError("disk unplugged")

        catalog.storage.delete_asset = failing
        try:
            assert api.delete(f"/api/v1/assets/{asset['asset_id']}").status_code == 204
        finally:
            catalog.storage.delete_asset = real
        assert [p for p in (tmp_path / "srv" / "blobs").rglob("*") if p.is_file()]
        report = srv._state.sweeper.sweep()  # type: ignore[union-attr]
        assert report.purged == [asset["asset_id"]]
        assert not [p for p in (tmp_path / "srv" / "blobs").rglob("*") if p.is_file()]


def test_a_client_back_after_expiry_uploads_everything_again(
    storage_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = backend_config(
        storage_backend, tmp_path / "srv", request, pending_ttl=TTL, sweep_interval=SWEEP
    )
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 600_000, "b.bin": 600_000, "c.bin": 10})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with EmbeddedServer.from_config(config) as srv:
        with Chronicle(
            srv.url, srv.api_key, max_upload_workers=1, max_bandwidth="400KB"
        ) as chronicle:
            run = chronicle.run(chronicle.create_experiment("back"), 0, 0)
            handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
            wait_until(lambda: chronicle.snapshot().assets[0].components_done >= 1)
        # The process is gone for longer than the TTL: the server forgets the pending asset.
        with connect(srv) as api:
            wait_until(lambda: api.get(f"/api/v1/assets/{handle.asset_id}").status_code == 404)
        with Chronicle(srv.url, srv.api_key) as chronicle:
            report = drain_incomplete_uploads(chronicle, tracker)
            assert report.finalized == [handle.asset_id], report
            dest = chronicle.run(run.experiment_id, 0, 0).download_asset(
                handle.asset_id, tmp_path / "dl"
            )
    assert tree_digest(dest) == tree_digest(ckpt)
