"""Multi-rank assets (docs/distributed.md): N real processes, each a rank with its own tracker,
upload one atomic asset to one server; on local storage and on S3 (moto)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    CEILING,
    connect,
    make_checkpoint,
    sha256_file,
    stop_process,
    subprocess_env,
    tree_digest,
    wait_until,
)
from killharness import Api, run_python
from s3helpers import DataProxy
from test_server import put

from methodic import (
    AssetIncompleteError,
    Chronicle,
    Run,
    UploadFailedError,
    UploadHandle,
    UploadTracker,
)
from methodic._ids import contribution_id
from methodic.server import EmbeddedServer

MiB = 1 << 20
EXPERIMENT = "multirank"
OPTS = f"part_threshold={8 * MiB}, part_size={5 * MiB}, max_upload_workers=2"

# One rank: its own tracker, its own shards (DCP names), rank 0 also the .metadata.
RANK = textwrap.dedent(f"""
    import json, sys, threading
    from pathlib import Path
    from methodic import Chronicle, RetryPolicy, UploadFailedError, UploadTracker
    url, key, tracker_path, ckpt, name, rank, world, rate = sys.argv[1:9]
    include = [f"__{{rank}}_*.distcp"] + ([".metadata"] if rank == "0" else [])
    tracker = UploadTracker(Path(tracker_path))
    with Chronicle(url, key, max_bandwidth=rate or None, {OPTS},
                   retry=RetryPolicy(base=0.05, cap=0.5, max_attempts=4)) as chronicle:
        run = chronicle.run(chronicle.create_experiment("{EXPERIMENT}"), 0, 0)
        handle = run.register_and_upload_async(
            Path(ckpt), asset_type="checkpoint", upload_tracker=tracker, asset_name=name,
            rank=int(rank), world_size=int(world), include=include)
        print("registered", handle.asset_id, flush=True)
        called = threading.Event()
        handle.add_done_callback(lambda h: called.set())
        try:
            asset = handle.result()
            out = {{"state": asset.state, "asset_id": asset.asset_id}}
        except UploadFailedError as exc:
            out = {{"failed": str(exc)}}
        called.wait(60)
        out["stored"] = handle.contribution_stored
        out["callback"] = called.is_set()
        print(json.dumps(out), flush=True)
""")

DRAINER = textwrap.dedent(f"""
    import json, sys
    from pathlib import Path
    from methodic import Chronicle, RetryPolicy, UploadTracker, drain_incomplete_uploads
    url, key, tracker_path = sys.argv[1:4]
    with Chronicle(url, key, {OPTS}, retry=RetryPolicy(base=0.05, cap=0.5)) as chronicle:
        report = drain_incomplete_uploads(chronicle, UploadTracker(Path(tracker_path)))
    print(json.dumps(report.__dict__))
""")


def shards(root: Path, world: int, sizes: dict[int, list[int]] | None = None) -> Path:
    """A DCP-style checkpoint directory: ``__<rank>_<i>.distcp`` per rank, plus ``.metadata``."""
    layout: dict[str, int] = {".metadata": 4321}
    for r in range(world):
        for i, size in enumerate((sizes or {}).get(r, [300_000 + r, 70_000])):
            layout[f"__{r}_{i}.distcp"] = size
    return make_checkpoint(root, layout, seed=world)


class Ranks:
    """Rank processes against one server, and the server's API as an operator sees it."""

    def __init__(self, url: str, key: str, workdir: Path, ckpt: Path, world: int) -> None:
        self.url, self.key, self.workdir, self.ckpt, self.world = url, key, workdir, ckpt, world
        self.name = "checkpoint-1000"
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.api = httpx.Client(
            base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        exp = self.api.post("/experiments", json={"name": EXPERIMENT}).json()["id"]
        self.run_id = self.api.put(f"/experiments/{exp}/runs/0/0").json()["id"]
        self.asset_id = contribution_id(self.run_id, self.name)

    def tracker(self, rank: int) -> Path:
        return self.workdir / f"uploads-rank{rank}.sqlite"

    def start(self, rank: int, rate: str = "", url: str | None = None) -> subprocess.Popen[str]:
        args = [str(self.tracker(rank)), str(self.ckpt), self.name, str(rank), str(self.world)]
        proc = subprocess.Popen(
            [sys.executable, "-c", RANK, url or self.url, self.key, *args, rate],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        self.procs[rank] = proc
        return proc

    def finish(self, rank: int) -> dict[str, Any]:
        out, err = self.procs[rank].communicate(timeout=CEILING)
        assert self.procs[rank].returncode == 0, err
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def listed(self) -> list[dict[str, Any]]:
        assets: list[dict[str, Any]] = self.api.get(f"/runs/{self.run_id}/assets").json()["assets"]
        return assets

    def summary(self) -> dict[str, Any] | None:
        r = self.api.get(f"/assets/{self.asset_id}", params={"components": "false"})
        return None if r.status_code == 404 else dict(r.json())

    def stored_ranks(self) -> int:
        s = self.summary()
        return 0 if s is None else s["world_size"] - len(s["ranks_missing"])

    def assert_invisible(self) -> None:
        assert self.listed() == []
        assert self.api.get(f"/assets/{self.asset_id}/download").status_code == 404

    def download(self, dest: Path) -> Path:
        return Api(self.url, self.key).download(self.asset_id, dest)

    def close(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        self.api.close()


def test_n_rank_processes_make_one_asset_visible_only_once_all_are_stored(
    tmp_path: Path, any_server: EmbeddedServer
) -> None:
    world = 4
    srv = any_server
    assert srv.url is not None and srv.api_key is not None
    # Rank 1 has a shard large enough to go in parts, sent slowly: the other ranks' contributions
    # are stored (on S3: their multipart uploads completed) while its own is still open.
    ckpt = shards(tmp_path / "ckpt", world, {1: [9 * MiB + 17, 1000]})
    ranks = Ranks(srv.url, srv.api_key, tmp_path, ckpt, world)
    try:
        for r in range(world - 1):
            ranks.start(r, rate="3MB" if r == 1 else "")
        wait_until(lambda: ranks.stored_ranks() == world - 1, what="3 of 4 contributions stored")
        ranks.assert_invisible()
        summary = ranks.summary()
        assert summary is not None and summary["state"] == "pending"
        assert summary["ranks_missing"] == [world - 1]
        assert summary["waiting"].startswith(f"waiting for rank {world - 1} (last seen: ")
        assert all(p.poll() is None for p in ranks.procs.values())  # each waits for the asset

        ranks.start(world - 1)
        results = [ranks.finish(r) for r in range(world)]
        assert all(res["state"] == "finalized" for res in results), results
        assert {res["asset_id"] for res in results} == {ranks.asset_id}
        assert all(res["stored"] and res["callback"] for res in results)

        listed = ranks.listed()
        assert [a["asset_id"] for a in listed] == [ranks.asset_id]
        assert listed[0]["component_count"] == 1 + 2 * world
        assert listed[0]["ranks_missing"] == [] and listed[0]["waiting"] is None
        assert tree_digest(ranks.download(tmp_path / "download")) == tree_digest(ckpt)
    finally:
        ranks.close()


def test_a_rank_sigkilled_mid_upload_resumes_with_drain(
    tmp_path: Path, any_server: EmbeddedServer, any_proxy: DataProxy
) -> None:
    world = 3
    victim = random.randrange(world)
    sizes = {r: [200_000 + r, 1000] for r in range(world)}
    sizes[victim] = [12 * MiB + 5, 3000]  # sent in parts, slowly
    ckpt = shards(tmp_path / "ckpt", world, sizes)
    srv, proxy = any_server, any_proxy
    assert srv.url is not None and srv.api_key is not None
    ranks = Ranks(srv.url, srv.api_key, tmp_path, ckpt, world)
    try:
        others = [r for r in range(world) if r != victim]
        for r in others:
            ranks.start(r)
        wait_until(lambda: ranks.stored_ranks() == world - 1, what="the others stored")
        start = proxy.bytes_up
        child = ranks.start(victim, rate="4MB")
        wait_until(lambda: proxy.bytes_up - start >= 6 * MiB, what=f"rank {victim} mid-upload")
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=CEILING)
        ranks.assert_invisible()
        assert ranks.summary() is not None
        assert ranks.summary()["ranks_missing"] == [victim]  # type: ignore[index]

        drained = run_python(DRAINER, srv.url, srv.api_key, str(ranks.tracker(victim)))
        assert drained.returncode == 0, drained.stderr
        report = json.loads(drained.stdout)
        assert report["failed"] == {} and report["resumed"] == [ranks.asset_id], report
        results = [ranks.finish(r) for r in others]
        assert all(res["state"] == "finalized" for res in results), (victim, results)
        assert [a["asset_id"] for a in ranks.listed()] == [ranks.asset_id]
        assert tree_digest(ranks.download(tmp_path / "download")) == tree_digest(ckpt)
        # Only what was missing was sent again: the victim's bytes once, plus in-flight parts.
        sent = proxy.bytes_up - start
        assert sent <= sum(sizes[victim]) + 2 * 5 * MiB + 512 * 1024, (victim, sent)
    finally:
        ranks.close()


def test_a_straggler_leaves_the_asset_pending_until_an_operator_discards_it(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    world = 3
    assert server.url is not None and server.api_key is not None
    ckpt = shards(tmp_path / "ckpt", world)
    ranks = Ranks(server.url, server.api_key, tmp_path, ckpt, world)
    try:
        ranks.start(0)
        ranks.start(1)
        wait_until(lambda: ranks.stored_ranks() == 2, what="ranks 0 and 1 stored")
        summary = ranks.summary()
        assert summary is not None and summary["waiting"] == (
            "waiting for rank 2 (last seen: 2 never)"
        )
        ranks.assert_invisible()

        env = subprocess_env(METHODIC_SERVER_URL=server.url, METHODIC_API_KEY=server.api_key)
        # An operator discards it from the CLI (with rank 0's tracker, while rank 0 runs): every
        # waiting rank's handle fails, and the rank processes go on.
        discard = subprocess.run(
            methodic_cmd_tui("discard", ranks.asset_id, "--tracker", str(ranks.tracker(0))),
            capture_output=True,
            text=True,
            env=env,
            timeout=CEILING,
        )
        assert discard.returncode == 0, discard.stderr
        for r in (0, 1):
            res = ranks.finish(r)
            assert "failed" in res and res["stored"] and res["callback"], res
        assert ranks.summary() is None
        assert ranks.listed() == []
    finally:
        ranks.close()


def methodic_cmd_tui(*args: str) -> list[str]:
    return [sys.executable, "-m", "methodic_tui", *args]


def test_a_pending_multi_rank_asset_expires_like_any_orphan(
    tmp_path: Path, server: EmbeddedServer, api: httpx.Client
) -> None:
    run = _run(api)
    asset_id = contribution_id(run, "ckpt")
    r = api.post(f"/api/v1/runs/{run}/assets", json=_contribution(asset_id, 0, 2, {"a": 3}))
    assert r.status_code == 201, r.text
    sweeper = server._state.sweeper
    report = sweeper.sweep(now=time.time() + server._state.config.pending_ttl + 1)
    assert asset_id in report.expired
    assert api.get(f"/api/v1/assets/{asset_id}").status_code == 404


def _run(api: httpx.Client) -> str:
    exp = api.post("/api/v1/experiments", json={"name": "conflicts"}).json()["id"]
    return str(api.put(f"/api/v1/experiments/{exp}/runs/0/0").json()["id"])


def _contribution(
    asset_id: str, rank: int, world: int, files: dict[str, int], name: str = "ckpt"
) -> dict[str, Any]:
    return {
        "asset_id": asset_id,
        "asset_type": "checkpoint",
        "asset_name": name,
        "rank": rank,
        "world_size": world,
        "components": [{"path": p, "size": s} for p, s in files.items()],
    }


def test_conflicting_contributions_are_refused_at_registration(api: httpx.Client) -> None:
    run = _run(api)
    asset_id = contribution_id(run, "ckpt")
    create = f"/api/v1/runs/{run}/assets"
    assert (
        api.post(create, json=_contribution(asset_id, 0, 2, {"a": 3, "d/x": 1})).status_code == 201
    )
    # The same path from another rank with different content.
    r = api.post(create, json=_contribution(asset_id, 1, 2, {"a": 4}))
    assert r.status_code == 409
    assert "rank 1 claims 'a'" in r.json()["error"]["message"]
    assert "rank 0 registered (different content" in r.json()["error"]["message"]
    # A file of one rank cannot be a directory of another.
    r = api.post(create, json=_contribution(asset_id, 1, 2, {"d": 3}))
    assert r.status_code == 409 and "file and a directory" in r.json()["error"]["message"]
    # Another world size.
    r = api.post(create, json=_contribution(asset_id, 1, 3, {"b": 3}))
    assert r.status_code == 409
    assert "world_size 3, but it was created with world_size 2" in r.json()["error"]["message"]
    # The same rank with other files.
    r = api.post(create, json=_contribution(asset_id, 0, 2, {"a": 3}))
    assert r.status_code == 409 and "rank 0 already registered other files" in r.text
    # An id that is not the name's.
    r = api.post(create, json=_contribution("0" * 32, 1, 2, {"b": 3}))
    assert r.status_code == 400 and asset_id in r.json()["error"]["message"]
    # Nothing of the refused joins was recorded: rank 1 still joins with its own files.
    r = api.post(create, json=_contribution(asset_id, 1, 2, {"b": 3}))
    assert r.status_code == 201, r.text
    summary = api.get(f"/api/v1/assets/{asset_id}", params={"components": "false"}).json()
    assert summary["component_count"] == 3 and summary["ranks_missing"] == [0, 1]


@contextlib.contextmanager
def rank_runs(server: EmbeddedServer, n: int = 2) -> Iterator[list[Run]]:
    """``n`` ranks in this process, each with a Chronicle of its own, on one run."""
    with contextlib.ExitStack() as stack:
        chronicles = [stack.enter_context(Chronicle(server.url, server.api_key)) for _ in range(n)]
        yield [c.run(c.create_experiment("e"), 0, 0) for c in chronicles]


def contribute(
    run: Run, local_dir: Path, tracker: Path | UploadTracker, rank: int, world: int = 2, **kw: Any
) -> UploadHandle:
    """Rank ``rank``'s DCP files (rank 0: with .metadata) of asset "ckpt", unless ``kw`` says."""
    kw.setdefault("include", [f"__{rank}_*"] + ([".metadata"] if rank == 0 else []))
    kw.setdefault("asset_name", "ckpt")
    return run.register_and_upload_async(
        local_dir,
        upload_tracker=tracker if isinstance(tracker, UploadTracker) else UploadTracker(tracker),
        rank=rank,
        world_size=world,
        **kw,
    )


def test_a_conflicting_rank_fails_its_handle_not_the_trainer(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    assert server.url is not None
    ckpt = shards(tmp_path / "ckpt", 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".metadata").write_bytes(b"not the same metadata")
    with rank_runs(server, 3) as (run0, run1, run2):
        h0 = contribute(run0, ckpt, tmp_path / "t0.sqlite", 0)
        wait_until(lambda: h0.contribution_stored, what="rank 0 stored")
        h1 = contribute(run1, tmp_path / "other", tmp_path / "t1.sqlite", 1, include=None)
        with pytest.raises(UploadFailedError, match=r"rank 1 claims '\.metadata'"):
            h1.result(CEILING)
        assert not h0.done()  # rank 0 still waits for rank 1's contribution
        bad = contribute(run2, ckpt, tmp_path / "t2.sqlite", 1, world=3)
        with pytest.raises(UploadFailedError, match="world_size 3, but it was created with"):
            bad.result(CEILING)
        # An operator's process discards it through the API: rank 0's handle fails.
        with Chronicle(server.url, server.api_key) as operator:
            operator.discard(h0.asset_id)
        with pytest.raises(UploadFailedError, match="gone from the server: discarded"):
            h0.result(CEILING)


def test_retention_keeps_the_latest_k_and_deletes_only_after_a_newer_finalize(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    assert server.url is not None
    tracker = UploadTracker(tmp_path / "t.sqlite")
    with rank_runs(server) as (run, run1):
        ids = []
        for step in range(3):
            ck = make_checkpoint(tmp_path / f"ck{step}", {"model.bin": 1000 + step})
            ids.append(
                run.register_and_upload_async(ck, upload_tracker=tracker).result(CEILING).asset_id
            )
        other = run.upload_asset(
            make_checkpoint(tmp_path / "cfg", {"c.json": 10}), asset_type="config"
        )
        assert run.set_retention(asset_type="checkpoint", keep_last=2) == [ids[0]]
        listed = [a.asset_id for a in run.list_assets()]
        assert listed == [ids[1], ids[2], other.asset_id]

        # A newer checkpoint of two ranks: the older ones stay until it is finalized.
        ckpt = shards(tmp_path / "dcp", 2)
        h0 = contribute(run, ckpt, tracker, 0, asset_name="step-3")
        wait_until(lambda: h0.contribution_stored, what="rank 0 stored")
        assert [a.asset_id for a in run.list_assets()] == [ids[1], ids[2], other.asset_id]
        h1 = contribute(run1, ckpt, tmp_path / "t1.sqlite", 1, asset_name="step-3")
        newest = h1.result(CEILING).asset_id
        assert h0.result(CEILING).asset_id == newest
        listed = [a.asset_id for a in run.list_assets(asset_type="checkpoint")]
        assert listed == [ids[2], newest]
        # keep_last=1 keeps the newest only; never fewer.
        assert run.set_retention(asset_type="checkpoint", keep_last=1) == [ids[2]]
        assert [a.asset_id for a in run.list_assets(asset_type="checkpoint")] == [newest]
        # A deleted asset is gone; its summary says it was finalized, then retired (what a
        # rank still waiting for it reads, instead of "lost").
        with connect(server) as api:
            assert api.get(f"/api/v1/assets/{ids[2]}").status_code == 404
            gone = api.get(f"/api/v1/assets/{ids[2]}", params={"components": "false"}).json()
            assert gone["state"] == "finalized" and gone["retired_at"] > 0
        with pytest.raises(Exception, match="keep_last must be a whole number >= 1"):
            run.set_retention(asset_type="checkpoint", keep_last=0)
        assert tree_digest(run.download_asset(newest, tmp_path / "dl")) == tree_digest(ckpt)


def test_delete_local_removes_the_contribution_only_after_the_asset_is_finalized(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    assert server.url is not None
    ckpt = shards(tmp_path / "ckpt", 2)
    (ckpt / "notes.txt").write_text("not part of any contribution")
    before = tree_digest(ckpt)
    with rank_runs(server) as (run0, run1):
        h0 = contribute(run0, ckpt, tmp_path / "t0.sqlite", 0, delete_local=True)
        wait_until(lambda: h0.contribution_stored, what="rank 0 stored")
        assert tree_digest(ckpt) == before  # stored, not finalized: nothing deleted
        h1 = contribute(run1, ckpt, tmp_path / "t1.sqlite", 1, delete_local=True)
        asset = h0.result(CEILING)
        h1.result(CEILING)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]
    assert sha256_file(ckpt / "notes.txt") == before["notes.txt"]
    assert asset.state == "finalized"


def test_force_finalize_of_a_contribution_asks_for_that_ranks_files_only(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    ckpt = shards(tmp_path / "ckpt", 2, {0: [6 * MiB], 1: [1000]})
    with rank_runs(server) as (run0, run1):
        h0 = contribute(run0, ckpt, tmp_path / "t0.sqlite", 0, include=["__0_*"])
        c0 = run0._chronicle
        c0.pause(h0.asset_id)
        # The server verifies rank 0's contribution, not the asset: rank 1 is not "missing".
        with pytest.raises(AssetIncompleteError) as refused:
            c0.force_finalize(h0.asset_id)
        assert refused.value.missing == ["__0_0.distcp"]
        c0.resume(h0.asset_id)
        wait_until(lambda: h0.contribution_stored, what="rank 0 stored")
        h1 = contribute(run1, ckpt, tmp_path / "t1.sqlite", 1, include=["__1_*"])
        assert h0.result(CEILING).state == h1.result(CEILING).state == "finalized"


def test_a_stored_contribution_takes_no_more_uploads(api: httpx.Client) -> None:
    """Once a rank's contribution is verified, neither a new presign nor a URL presigned
    before can change its bytes while the asset waits for the other ranks."""
    run = _run(api)
    asset_id = contribution_id(run, "ckpt")
    body = _contribution(asset_id, 0, 2, {"a": 3})
    body["presign"] = True
    created = api.post(f"/api/v1/runs/{run}/assets", json=body).json()
    (target,) = created["targets"]
    stale = dict(target)  # a second URL for the same bytes, presigned before the store
    assert put(target, b"abc").status_code == 201
    done = api.post(f"/api/v1/assets/{asset_id}/finalize", json={"rank": 0})
    assert done.status_code == 200 and done.json()["state"] == "pending", done.text
    again = api.post(f"/api/v1/assets/{asset_id}/presign", json={"targets": [{"path": "a"}]})
    assert again.status_code == 409 and "stored and verified" in again.text
    assert put(stale, b"xyz").status_code == 409
    # Finalizing the asset without a rank is refused: each rank finalizes its own.
    assert api.post(f"/api/v1/assets/{asset_id}/finalize", json={}).status_code == 400
    summary = api.get(f"/api/v1/assets/{asset_id}", params={"components": "false"}).json()
    assert summary["ranks_missing"] == [1] and summary["contributions"][0]["state"] == "stored"


def test_latest_moves_only_when_a_newer_checkpoint_is_finalized(
    tmp_path: Path, server: EmbeddedServer
) -> None:
    """run.latest (the restore's --latest) and retention agree on "newest": by creation. A
    multi-rank checkpoint waiting for a rank is never the latest; an older one that finalizes
    late never takes the latest back, and retention never deletes the latest."""
    tracker = UploadTracker(tmp_path / "t.sqlite")
    with rank_runs(server) as (run, run1):
        first = run.register_and_upload_async(
            make_checkpoint(tmp_path / "ck0", {"model.bin": 1000}), upload_tracker=tracker
        ).result(CEILING)
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == first.asset_id

        # step-1: two ranks; rank 0 stored, rank 1 not yet: the latest stays put.
        ckpt = shards(tmp_path / "dcp", 2)
        h0 = contribute(run, ckpt, tracker, 0, asset_name="step-1")
        wait_until(lambda: h0.contribution_stored, what="rank 0 stored")
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == first.asset_id

        # step-2, created after step-1, is finalized first: it is the latest.
        second = run.register_and_upload_async(
            make_checkpoint(tmp_path / "ck2", {"model.bin": 2000}), upload_tracker=tracker
        ).result(CEILING)
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == second.asset_id

        # step-1 finalizes late: listed, but older by creation, so not the latest...
        h1 = contribute(run1, ckpt, tmp_path / "t1.sqlite", 1, asset_name="step-1")
        step1 = h1.result(CEILING).asset_id
        assert step1 == h0.result(CEILING).asset_id
        assert step1 in [a.asset_id for a in run.list_assets(asset_type="checkpoint")]
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == second.asset_id
        # ...and retention, keeping one, keeps that latest.
        retired = run.set_retention(asset_type="checkpoint", keep_last=1)
        assert sorted(retired) == sorted([first.asset_id, step1])
        assert [a.asset_id for a in run.list_assets(asset_type="checkpoint")] == [second.asset_id]
        copy = run.download_asset(second.asset_id, tmp_path / "restore")
        assert tree_digest(copy) == tree_digest(tmp_path / "ck2")


def test_checkpoints_are_created_on_the_server_in_the_order_they_were_registered(
    tmp_path: Path, server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool begins assets concurrently; were their creates to race, a checkpoint registered
    second could be created first and count as older (for latest and retention). Here the first
    create is held until the second one starts, or for a few seconds when it never does (the
    engine creates in order, so it waits for the first)."""
    import asyncio

    from methodic._api import ApiClient

    original = ApiClient.create_asset
    entered: list[str] = []
    second_started = asyncio.Event()

    async def create_asset(self: ApiClient, run_id: str, **kw: Any) -> Any:
        entered.append(kw["asset_id"])
        if len(entered) == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second_started.wait(), 3)  # a bound, not a condition
        else:
            second_started.set()
        return await original(self, run_id, **kw)

    monkeypatch.setattr(ApiClient, "create_asset", create_asset)
    tracker = UploadTracker(tmp_path / "t.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("order"), 0, 0)
        older, newer = (
            run.register_and_upload_async(
                make_checkpoint(tmp_path / f"ck{i}", {"model.bin": 1000 + i}),
                upload_tracker=tracker,
            )
            for i in range(2)
        )
        assert older.result(CEILING) and newer.result(CEILING)
        assert entered == [older.asset_id, newer.asset_id]
        assert [a.asset_id for a in run.list_assets()] == [older.asset_id, newer.asset_id]
        latest = run.latest("checkpoint")
        assert latest is not None and latest.asset_id == newer.asset_id
