"""The seed page's Pattern, end to end against a real server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import CEILING, make_checkpoint, sha256_file, tree_checksums, tree_digest

from methodic import (
    AssetIncompleteError,
    AsyncChronicle,
    AuthenticationError,
    Chronicle,
    ChronicleError,
    ComponentSpec,
    InvalidInputError,
    RetryPolicy,
    ServerError,
    UploadTracker,
)

MiB = 1 << 20


def upload_pattern(
    url: str, api_key: str, ckpt: Path, tracker_path: Path, **kw: object
) -> tuple[str, str]:
    """The seed page's Pattern, verbatim in spirit. Returns (run id, asset id)."""
    tracker = UploadTracker(db_path=tracker_path)
    with Chronicle(server_url=url, api_key=api_key, **kw) as chronicle:
        exp_id = chronicle.create_experiment("seed-pattern")
        run = chronicle.run(exp_id, variation=0, run=0)
        handle = run.register_and_upload_async(
            local_dir=ckpt, asset_type="checkpoint", upload_tracker=tracker
        )
        run.wait_for_uploads()
        run.succeed()
        assert run.status == "succeeded"
        assert handle.done()
        asset = handle.result()
        assert asset.state == "finalized"
        return run.id, handle.asset_id


def check_uploaded(
    url: str, api_key: str, run_id: str, asset_id: str, ckpt: Path, tmp: Path
) -> None:
    with Chronicle(server_url=url, api_key=api_key) as chronicle:
        exp = chronicle.create_experiment("seed-pattern")
        run = chronicle.run(exp, 0, 0)
        assert run.id == run_id
        listed = run.list_assets()
        assert [a.asset_id for a in listed] == [asset_id]
        assert listed[0].state == "finalized"
        dest = run.download_asset(asset_id, tmp / "download")
    assert tree_digest(dest) == tree_digest(ckpt)


def test_seed_pattern_in_process(any_server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(
        tmp_path / "out" / "checkpoint-1000",
        {
            "model-00001-of-00003.safetensors": 3 * MiB + 17,
            "model-00002-of-00003.safetensors": 2 * MiB,
            "model-00003-of-00003.safetensors": 1,
            "optimizer/state.pt": 700_000,
            "config.json": 0,
            "nested/deeper/[weird] name.bin": 1234,
        },
    )
    tracker_path = tmp_path / "uploads.sqlite"
    run_id, asset_id = upload_pattern(
        any_server.url, any_server.api_key, ckpt, tracker_path, max_upload_workers=3
    )
    check_uploaded(any_server.url, any_server.api_key, run_id, asset_id, ckpt, tmp_path)

    tracker = UploadTracker(tracker_path)
    tracked = tracker.get_asset(asset_id)
    assert tracked is not None and tracked.state == "finalized"
    assert {c.state for c in tracked.components} == {"completed"}
    assert {c.path: c.checksum for c in tracked.components} == tree_checksums(ckpt)
    assert tracked.binding is not None and tracked.binding.run_id == run_id
    assert tracker.get_pending_uploads() == []
    assert oct(tracker_path.stat().st_mode & 0o777) == "0o600"


def test_seed_pattern_against_methodic_serve(served, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {f"shard-{i}.bin": 300_000 + i for i in range(12)})
    run_id, asset_id = upload_pattern(served.url, served.api_key, ckpt, tmp_path / "u.sqlite")
    check_uploaded(served.url, served.api_key, run_id, asset_id, ckpt, tmp_path)


def test_large_file_goes_in_parts(any_server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"big.bin": 23 * MiB + 5, "small.bin": 10})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(
        any_server.url,
        any_server.api_key,
        max_upload_workers=4,
        part_threshold=8 * MiB,
        part_size=5 * MiB,
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("parts"), 0, 0)
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        handle.result(timeout=CEILING)
        remote = chronicle.get_asset(handle.asset_id)
        big = next(c for c in remote.components if c.path == "big.bin")
        assert big.part_size == 5 * MiB and sorted(big.parts_stored) == [1, 2, 3, 4, 5]
        dest = run.download_asset(handle.asset_id, tmp_path / "dl")
    assert tree_digest(dest) == tree_digest(ckpt)
    tracked = tracker.get_asset(handle.asset_id)
    assert tracked is not None
    big_t = next(c for c in tracked.components if c.path == "big.bin")
    assert big_t.parts_done == frozenset({1, 2, 3, 4, 5}) and big_t.state == "completed"


def test_finalize_is_idempotent_and_pending_is_invisible(any_server, tmp_path: Path) -> None:
    f1 = tmp_path / "a.bin"
    f1.write_bytes(os.urandom(1000))
    f2 = tmp_path / "b.bin"
    f2.write_bytes(os.urandom(2000))
    with Chronicle(any_server.url, any_server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("presigned"), 0, 1)
        p = run.create_asset_presigned(
            asset_type="eval",
            components=[ComponentSpec("a.bin", f1, 1000), ComponentSpec("b.bin", f2, 2000)],
        )
        assert {t.path for t in p.targets} == {"a.bin", "b.bin"}
        assert run.list_assets() == []
        assert [a.asset_id for a in run.list_assets(include_pending=True)] == [p.asset_id]
        assert run.list_assets(include_pending=True)[0].state == "pending"

        first = next(t for t in p.targets if t.path == "a.bin")
        httpx.put(first.url, content=f1.read_bytes(), headers=first.headers).raise_for_status()
        with pytest.raises(AssetIncompleteError) as info:
            run.finalize_asset(p.asset_id)
        assert info.value.missing == ["b.bin"]
        assert "b.bin" in str(info.value)
        assert run.list_assets() == []

        second = next(t for t in p.targets if t.path == "b.bin")
        httpx.put(second.url, content=f2.read_bytes(), headers=second.headers).raise_for_status()
        done = run.finalize_asset(p.asset_id)
        again = run.finalize_asset(p.asset_id)
        assert done.state == again.state == "finalized"
        assert done.finalized_at == again.finalized_at
        assert [a.asset_id for a in run.list_assets()] == [p.asset_id]
        dest = run.download_asset(p.asset_id, tmp_path / "dl")
        assert sha256_file(dest / "b.bin") == sha256_file(f2)


def test_upload_asset_one_shot_file_and_dir(any_server, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("lr: 0.1\n")
    d = make_checkpoint(tmp_path / "d", {"x": 10, "y/z": 20})
    with Chronicle(any_server.url, any_server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("one-shot"), 0, 0)
        a = run.upload_asset(cfg, asset_type="config")
        b = run.upload_asset(d, asset_type="dataset")
        assert a.state == b.state == "finalized"
        assert {x.asset_id for x in run.list_assets()} == {a.asset_id, b.asset_id}
        out = run.download_asset(a.asset_id, tmp_path / "dl")
        assert (out / "config.yaml").read_text() == "lr: 0.1\n"


def test_wrong_api_key_is_an_authentication_error_without_the_key(server, tmp_path: Path) -> None:
    bad = "sk_agent_definitely-not-the-right-key-1234567890"
    with Chronicle(server.url, bad) as chronicle:
        with pytest.raises(AuthenticationError) as info:
            chronicle.create_experiment("nope")
        assert bad not in str(info.value)
        assert bad not in repr(chronicle)
        assert "--api-key" in str(info.value)
    with pytest.raises(AuthenticationError):
        Chronicle(server.url, "")


def test_upload_failure_surfaces_without_losing_state(server, tmp_path: Path) -> None:
    """A component refused by the server (here: the run does not exist) fails the asset, typed."""
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a": 10})
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("x"), 0, 0)
        run.core.id = "no-such-run"
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        with pytest.raises(ChronicleError):
            handle.result(timeout=CEILING)
        with pytest.raises(ChronicleError):
            run.wait_for_uploads()
    tracked = tracker.get_asset(handle.asset_id)
    assert tracked is not None and tracked.state == "failed" and tracked.last_error
    assert [a.asset_id for a in tracker.get_pending_uploads()] == [handle.asset_id]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "dangling", "outside", "fifo"])
def test_bad_local_dir_is_refused_before_anything_is_registered(
    server, tmp_path: Path, case: str
) -> None:
    root = tmp_path / "ckpt"
    if case == "missing":
        target = root
    elif case == "file":
        root.write_text("x")
        target = root
    else:
        root.mkdir()
        (root / "ok.bin").write_bytes(b"1")
        target = root
        if case == "empty":
            (root / "ok.bin").unlink()
        elif case == "dangling":
            (root / "link").symlink_to(tmp_path / "nowhere")
        elif case == "outside":
            (tmp_path / "secret").write_text("s")
            (root / "link").symlink_to(tmp_path / "secret")
        elif case == "fifo":
            os.mkfifo(root / "pipe")
    tracker = UploadTracker(tmp_path / "u.sqlite")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("bad"), 0, 0)
        with pytest.raises(InvalidInputError) as info:
            run.register_and_upload_async(target, upload_tracker=tracker)
        assert str(root) in str(info.value)
        assert run.list_assets(include_pending=True) == []
    assert tracker.list_assets() == []


def test_symlink_inside_the_directory_is_followed(server, tmp_path: Path) -> None:
    root = make_checkpoint(tmp_path / "ckpt", {"real.bin": 100})
    (root / "alias.bin").symlink_to(root / "real.bin")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("links"), 0, 0)
        asset = run.upload_asset(root, asset_type="checkpoint")
        out = run.download_asset(asset.asset_id, tmp_path / "dl")
    assert sha256_file(out / "alias.bin") == sha256_file(root / "real.bin")


def test_duplicate_and_bad_component_paths_are_refused(server, tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("dups"), 0, 0)
        for comps in (
            [ComponentSpec("a", f, 3), ComponentSpec("a", f, 3)],
            [ComponentSpec("/etc/passwd", f, 3)],
            [ComponentSpec("x/../../a", f, 3)],
            [ComponentSpec("a\x00b", f, 3)],
        ):
            with pytest.raises(InvalidInputError):
                run.create_asset_presigned(asset_type="x", components=comps)
        assert run.list_assets(include_pending=True) == []


def test_import_methodic_loads_no_ui_library() -> None:
    code = "import sys, methodic; print(sorted(m for m in ('textual', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parse_rate_is_public_and_the_tui_uses_that_name() -> None:
    import ast

    import methodic

    assert "parse_rate" in methodic.__all__
    assert methodic.parse_rate("1.5GiB/s") == 1.5 * 2**30
    assert methodic.parse_rate("200MB") == 200e6 and methodic.parse_rate(0) is None
    with pytest.raises(InvalidInputError, match="not a rate"):
        methodic.parse_rate("fast")
    tui = Path(__file__).resolve().parents[1] / "methodic_tui"
    private = [
        f"{path.name}: from {node.module} import {', '.join(a.name for a in node.names)}"
        for path in tui.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "methodic._bandwidth"
    ]
    assert private == []


async def test_find_experiment_by_name_or_id_and_none_only_when_not_found(server) -> None:
    async with AsyncChronicle(server.url, server.api_key) as chronicle:
        exp_id = await chronicle.create_experiment("team/exp1")
        assert await chronicle.find_experiment("team/exp1") == exp_id
        assert await chronicle.find_experiment(exp_id) == exp_id
        for unknown in ("nope", "a/runs/0/0", "exp?1", "..", "0" * 32):
            assert await chronicle.find_experiment(unknown) is None, unknown


class _IdLookupFails:
    """A Chronicle API on a real socket: no experiment by name; the id lookup answers
    ``status`` (0: the connection is dropped without an answer)."""

    def __init__(self, status: int) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.id_lookups = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/api/v1/experiments?"):
                    code, body = 200, {"experiments": []}
                else:
                    outer.id_lookups += 1
                    if status == 0:
                        self.close_connection = True
                        return
                    code, body = status, {"error": {"code": "x", "message": f"injected {status}"}}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("status", "error", "lookups"),
    [
        (404, None, 1),
        (401, AuthenticationError, 1),
        (503, ServerError, 3),  # retried, then raised
        (500, ServerError, 3),
        (0, ServerError, 3),  # no answer at all
    ],
)
async def test_find_experiment_raises_every_error_but_not_found(
    status: int, error: type[Exception] | None, lookups: int
) -> None:
    stub = _IdLookupFails(status)
    try:
        async with AsyncChronicle(
            stub.url, "sk_test", retry=RetryPolicy(max_attempts=3, base=0.01, cap=0.02)
        ) as chronicle:
            if error is None:
                assert await chronicle.find_experiment("some-id") is None
            else:
                with pytest.raises(error):
                    await chronicle.find_experiment("some-id")
        assert stub.id_lookups == lookups
    finally:
        stub.close()


def test_include_and_exclude_globs_choose_the_components(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(
        tmp_path / "ckpt", {"__3_0.distcp": 11, "__3_1.distcp": 12, "__4_0.distcp": 13, "a/x": 1}
    )
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("globs"), 0, 0)
        h = run.register_and_upload_async(ckpt, include=["__3_*.distcp", "a/*"], exclude=["__3_1*"])
        asset = h.result(timeout=120)
        assert sorted(c.path for c in asset.components) == ["__3_0.distcp", "a/x"]
        run.download_asset(h.asset_id, tmp_path / "restore")
        assert tree_digest(tmp_path / "restore") == {
            k: v for k, v in tree_digest(ckpt).items() if k in ("__3_0.distcp", "a/x")
        }
        with pytest.raises(InvalidInputError, match="nothing to upload"):
            run.register_and_upload_async(ckpt, include=["*.pt"])
        with pytest.raises(InvalidInputError, match="list of non-empty glob"):
            run.register_and_upload_async(ckpt, include="*.distcp")  # type: ignore[arg-type]
