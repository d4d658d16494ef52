"""A big manifest sent in slices (issue 15, first byte): the create carries the first
components and declares the whole; the rest are appended while the first files send. The
asset cannot be finalized until every component is listed and the whole is the one declared.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CEILING, make_checkpoint, subprocess_env, tree_digest, wait_until
from killharness import Api, run_python
from test_server import assert_error, make_run, put

import methodic._intake as intake
from methodic import (
    Chronicle,
    ServerError,
    UploadFailedError,
    UploadTracker,
    drain_incomplete_uploads,
)
from methodic._api import ApiClient
from methodic._ids import contribution_id
from methodic._manifest import manifest_digest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_of(count: int) -> dict[str, bytes]:
    return {f"rank{i:03d}.bin": os.urandom(10 + i) for i in range(count)}


def entries(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]


def sliced_create(
    api: httpx.Client, run_id: str, manifest: list[dict[str, Any]], first: int, **over: Any
) -> httpx.Response:
    declared = {
        "component_count": len(manifest),
        "total_size": sum(e["size"] for e in manifest),
        "digest": manifest_digest(run_id, "checkpoint", manifest),
    }
    body = {
        "asset_id": over.pop("asset_id", uuid.uuid4().hex),
        "asset_type": "checkpoint",
        "components": manifest[:first],
        "checksum_algorithm": "sha256",
        "brief": True,
        "manifest": declared | over,
    }
    return api.post(f"/api/v1/runs/{run_id}/assets", json=body)


def append(api: httpx.Client, asset_id: str, part: list[dict[str, Any]]) -> httpx.Response:
    return api.post(f"/api/v1/assets/{asset_id}/components", json={"components": part})


def listed(api: httpx.Client, asset_id: str) -> list[str]:
    return [c["path"] for c in api.get(f"/api/v1/assets/{asset_id}").json()["components"]]


def test_a_sliced_manifest_is_finalized_only_once_every_component_is_listed(
    api: httpx.Client,
) -> None:
    run_id = make_run(api)
    files = files_of(7)
    manifest = entries(files)
    created = sliced_create(api, run_id, manifest, 3)
    assert created.status_code == 201, created.text
    asset = created.json()
    asset_id = asset["asset_id"]
    assert (asset["manifest_complete"], asset["component_count"], asset["total_size"]) == (
        False,
        7,
        sum(len(d) for d in files.values()),
    )
    assert listed(api, asset_id) == list(files)[:3]

    # What is listed can be presigned and sent now; what is not, not yet.
    url = f"/api/v1/assets/{asset_id}/presign"
    first = api.post(url, json={"targets": [{"path": "rank000.bin"}]}).json()["targets"][0]
    assert put(first, files["rank000.bin"]).status_code == 201
    assert api.post(url, json={"targets": [{"path": "rank005.bin"}]}).status_code == 404
    error = assert_error(
        api.post(f"/api/v1/assets/{asset_id}/finalize"), 409, "manifest_incomplete"
    )
    assert "lists 3 of its 7 components" in error["message"]

    # In any order; what is listed already may come again, unchanged.
    assert append(api, asset_id, manifest[5:]).json()["manifest_complete"] is False
    done = append(api, asset_id, manifest[2:5])
    assert done.status_code == 200, done.text
    assert done.json()["manifest_complete"] is True
    assert sorted(listed(api, asset_id)) == sorted(files)
    assert append(api, asset_id, manifest).status_code == 200  # a repeat: nothing changes

    targets = api.post(url, json={"targets": [{"path": p} for p in files]}).json()["targets"]
    for target in targets:
        assert put(target, files[target["path"]]).status_code == 201
    finalized = api.post(f"/api/v1/assets/{asset_id}/finalize")
    assert finalized.status_code == 200, finalized.text
    assert finalized.json()["state"] == "finalized"
    for c in api.get(f"/api/v1/assets/{asset_id}/download").json()["components"]:
        assert httpx.get(c["url"], trust_env=False).content == files[c["path"]]


def test_a_sliced_manifest_cannot_change_nor_close_as_another(api: httpx.Client) -> None:
    run_id = make_run(api)
    manifest = entries(files_of(6))
    asset_id = sliced_create(api, run_id, manifest, 2).json()["asset_id"]

    changed = [dict(manifest[1], size=manifest[1]["size"] + 1), *manifest[2:4]]
    error = assert_error(append(api, asset_id, changed), 409, "conflict")
    assert "a manifest cannot change" in error["message"]
    twice = assert_error(append(api, asset_id, [manifest[2], manifest[2]]), 400, "invalid_request")
    assert "appears twice" in twice["message"]
    extra = {"path": "extra.bin", "size": 1}
    past = assert_error(append(api, asset_id, [*manifest[2:], extra]), 400, "invalid_request")
    assert "go past the count" in past["message"]
    # A file in one slice that a path of another needs as a directory: found when it closes.
    assert (
        append(api, asset_id, [{"path": f"{manifest[0]['path']}/x", "size": 1}]).status_code == 200
    )
    clash = assert_error(append(api, asset_id, manifest[2:5]), 400, "invalid_request")
    assert "needs it to be a directory" in clash["message"]
    assert "delete the asset and create it again" in clash["message"]
    api.delete(f"/api/v1/assets/{asset_id}")
    asset_id = sliced_create(api, run_id, manifest, 2).json()["asset_id"]

    # The last slice closes the manifest only if the whole is the one declared.
    other = [*manifest[2:5], {**manifest[5], "sha256": sha(b"something else")}]
    error = assert_error(append(api, asset_id, other), 409, "conflict")
    assert "not the manifest the create declared" in error["message"]
    status = api.get(f"/api/v1/assets/{asset_id}").json()
    assert status["manifest_complete"] is False and len(status["components"]) == 2
    assert append(api, asset_id, manifest[2:]).json()["manifest_complete"] is True


def test_a_sliced_create_again_is_the_same_asset(api: httpx.Client) -> None:
    run_id = make_run(api)
    manifest = entries(files_of(5))
    asset_id = sliced_create(api, run_id, manifest, 2).json()["asset_id"]
    again = sliced_create(api, run_id, manifest, 3, asset_id=asset_id)
    assert again.status_code == 200 and again.json()["manifest_complete"] is False
    assert len(listed(api, asset_id)) == 3  # what the repeat carried is listed
    other = sliced_create(api, run_id, manifest[:4], 2, asset_id=asset_id)
    assert_error(other, 409, "conflict")
    # The whole manifest in one create, as a client that does not slice sends it: it closes.
    whole = {"asset_id": asset_id, "asset_type": "checkpoint", "components": manifest}
    answer = api.post(f"/api/v1/runs/{run_id}/assets", json=whole)
    assert answer.status_code == 200 and answer.json()["manifest_complete"] is True


def test_a_sliced_create_is_refused_when_its_declaration_is_wrong(
    api: httpx.Client, server: Any
) -> None:
    run_id = make_run(api)
    manifest = entries(files_of(4))
    whole_but_other = sliced_create(api, run_id, manifest, 4, total_size=1)
    assert_error(whole_but_other, 409, "conflict")
    more_than_declared = sliced_create(api, run_id, manifest, 4, component_count=3)
    assert_error(more_than_declared, 400, "invalid_request")
    too_many = server.config.max_components_per_asset + 1
    assert_error(
        sliced_create(api, run_id, manifest, 2, component_count=too_many), 413, "too_large"
    )
    rank = {
        "asset_id": contribution_id(run_id, "ckpt"),
        "asset_type": "checkpoint",
        "components": manifest[:2],
        "asset_name": "ckpt",
        "rank": 0,
        "world_size": 2,
        "manifest": {"component_count": 4, "total_size": 1, "digest": "0" * 64},
    }
    error = assert_error(
        api.post(f"/api/v1/runs/{run_id}/assets", json=rank), 400, "invalid_request"
    )
    assert "whole manifest" in error["message"]
    assert_error(append(api, "nope", manifest), 404, "not_found")


# ---- the engine ------------------------------------------------------------------------------


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Slices of 10 and 25 components; the calls that carry components, as (what, count)."""
    monkeypatch.setattr(intake, "FIRST_SLICE", 10)
    monkeypatch.setattr(intake, "APPEND_SLICE", 25)
    calls: list[tuple[str, int]] = []
    create, append_ = ApiClient.create_asset, ApiClient.append_components

    async def counted_create(self: ApiClient, run_id: str, **kw: Any) -> Any:
        calls.append(("create", len(kw["components"])))
        return await create(self, run_id, **kw)

    async def counted_append(self: ApiClient, asset_id: str, part: Any) -> Any:
        calls.append(("append", len(part)))
        return await append_(self, asset_id, part)

    monkeypatch.setattr(ApiClient, "create_asset", counted_create)
    monkeypatch.setattr(ApiClient, "append_components", counted_append)
    return calls


def test_the_engine_sends_the_first_files_while_the_rest_of_the_manifest_is_listed(
    any_server: Any,
    any_proxy: Any,
    tmp_path: Path,
    small_slices: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i:02d}.bin": 100 + i for i in range(60)})
    completed_at_append: list[int] = []
    counted_append = ApiClient.append_components

    async def recording(self: ApiClient, asset_id: str, part: Any) -> Any:
        completed_at_append.append(pool.assets[asset_id].completed)
        return await counted_append(self, asset_id, part)

    monkeypatch.setattr(ApiClient, "append_components", recording)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(any_proxy.url, any_server.api_key) as chronicle:
        pool = chronicle.core._pool
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        asset = handle.result(timeout=CEILING)
        dest = run.download_asset(asset.asset_id, tmp_path / "dl")
    assert asset.state == "finalized" and asset.component_count == 60
    assert small_slices == [("create", 10), ("append", 25), ("append", 25)]
    # The rest is listed once a first file is stored: the first files do not wait for it, and
    # the appends do not delay them.
    assert 1 <= completed_at_append[0] <= 10
    assert tree_digest(dest) == tree_digest(ckpt)
    assert tracker.get_asset(asset.asset_id).state == "finalized"


def test_a_resume_lists_the_rest_of_a_manifest_an_earlier_process_left_open(
    server: Any,
    tmp_path: Path,
    small_slices: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The scan lists a directory's files before its subdirectories; the tracker gives them
    # back by path: the rest is what the server does not list, whatever the order.
    sizes = {f"z{i:02d}.bin": 100 + i for i in range(20)} | {f"a/f{i:02d}": i for i in range(20)}
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    counted_append = ApiClient.append_components

    async def never(self: ApiClient, asset_id: str, part: Any) -> Any:
        await asyncio.Event().wait()  # this process stops before any append is answered

    monkeypatch.setattr(ApiClient, "append_components", never)
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        wait_until(
            lambda: chronicle.snapshot().assets[0].components_done == 10,
            what="the first slice sent",
        )
    api = Api(server.url, server.api_key)
    left = api.client.get(f"/assets/{handle.asset_id}").json()
    assert left["manifest_complete"] is False and len(left["components"]) == 10
    assert tracker.get_asset(handle.asset_id).state == "uploading"

    monkeypatch.setattr(ApiClient, "append_components", counted_append)
    small_slices.clear()
    with Chronicle(server.url, server.api_key) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
        assert report.finalized == [handle.asset_id], report
        dest = chronicle.run(chronicle.create_experiment("x"), 0, 0).download_asset(
            handle.asset_id, tmp_path / "dl"
        )
    assert small_slices == [("append", 25), ("append", 5)]  # read, not created again
    assert tree_digest(dest) == tree_digest(ckpt)


UPLOADER = """
import asyncio, sys
import methodic._intake as intake
from methodic import Chronicle, UploadTracker
from methodic._api import ApiClient
from methodic._ids import contribution_id
intake.FIRST_SLICE, intake.APPEND_SLICE = 10, 25
real = ApiClient.append_components
calls = []
async def append(self, asset_id, part):
    calls.append(part)
    if len(calls) == 2:  # the second append never leaves: killed with two slices listed
        print("second-append", flush=True)
        await asyncio.Event().wait()
    return await real(self, asset_id, part)
ApiClient.append_components = append
url, key, tracker, ckpt = sys.argv[1:]
with Chronicle(url, key) as chronicle:
    run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
    handle = run.register_and_upload_async(ckpt, upload_tracker=UploadTracker(tracker))
    print(handle.asset_id, flush=True)
    handle.result()
"""

DRAINER = """
import json, sys
from methodic import Chronicle, UploadTracker, drain_incomplete_uploads
url, key, tracker = sys.argv[1:]
with Chronicle(url, key) as chronicle:
    report = drain_incomplete_uploads(chronicle, UploadTracker(tracker))
print(json.dumps({"finalized": report.finalized, "failed": report.failed}))
"""


def test_sigkilled_with_the_manifest_half_listed_then_drained(server: Any, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i:02d}.bin": 1000 + i for i in range(70)})
    tracker = tmp_path / "u.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, server.url, server.api_key, str(tracker), str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert child.stdout is not None
        asset_id = child.stdout.readline().strip()
        assert child.stdout.readline().strip() == "second-append"
        api = Api(server.url, server.api_key)
        wait_until(
            lambda: (
                sum(c["stored"] for c in api.client.get(f"/assets/{asset_id}").json()["components"])
                == 35
            ),
            what="the two listed slices stored",
        )
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(CEILING)
    left = api.client.get(f"/assets/{asset_id}").json()
    assert (left["state"], left["manifest_complete"], len(left["components"])) == (
        "pending",
        False,
        35,
    )
    assert api.client.post(f"/assets/{asset_id}/finalize").status_code == 409

    drained = run_python(DRAINER, server.url, server.api_key, str(tracker))
    assert drained.returncode == 0, drained.stderr
    assert f'"finalized": ["{asset_id}"]' in drained.stdout, drained.stdout
    dest = api.download(asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)


def test_a_retry_after_a_failed_append_lists_the_rest_and_finishes(
    server: Any,
    tmp_path: Path,
    small_slices: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i:02d}.bin": 100 + i for i in range(40)})
    counted_append = ApiClient.append_components
    failures = [ServerError("the server is away")]

    async def failing_once(self: ApiClient, asset_id: str, part: Any) -> Any:
        if failures:
            raise failures.pop()
        return await counted_append(self, asset_id, part)

    monkeypatch.setattr(ApiClient, "append_components", failing_once)
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        with pytest.raises(UploadFailedError, match="the server is away"):
            handle.result(timeout=CEILING)
        assert chronicle.retry_failed(handle.asset_id) == [handle.asset_id]
        run.wait_for_uploads(timeout=CEILING)
        asset = chronicle.get_asset(handle.asset_id)
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert asset.state == "finalized" and asset.component_count == 40
    assert tree_digest(dest) == tree_digest(ckpt)


def test_a_server_that_takes_no_manifest_in_slices_gets_it_whole(
    server: Any,
    tmp_path: Path,
    small_slices: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older server ignores ``manifest`` and creates the first slice as the whole: the
    engine sees it in the answer, removes that asset and creates it whole."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"f{i:02d}.bin": 100 + i for i in range(30)})
    counted_create = ApiClient.create_asset

    async def older(self: ApiClient, run_id: str, **kw: Any) -> Any:
        kw["manifest"] = None
        return await counted_create(self, run_id, **kw)

    monkeypatch.setattr(ApiClient, "create_asset", older)
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        first = run.register_and_upload_async(ckpt, upload_tracker=UploadTracker(tmp_path / "u"))
        asset = first.result(timeout=CEILING)
        again = run.register_and_upload_async(ckpt, upload_tracker=UploadTracker(tmp_path / "u"))
        assert again.result(timeout=CEILING).component_count == 30
        dest = run.download_asset(asset.asset_id, tmp_path / "dl")
    assert asset.state == "finalized" and asset.component_count == 30
    assert tree_digest(dest) == tree_digest(ckpt)
    # Once seen, the next asset is created whole at once.
    assert small_slices == [("create", 10), ("create", 30), ("create", 30)]
