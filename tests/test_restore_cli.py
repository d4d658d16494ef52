"""``methodic-tui download``: headless in real subprocesses (exit codes 0/1/2, --json), and the
dashboard's download view driven by Pilot."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import CEILING, make_checkpoint, tree_digest, wait_until_async
from test_headless import run_tui
from tui_helpers import screen_text

from methodic import Chronicle, RetryPolicy

MiB = 1 << 20


def remote(server) -> list[str]:
    return ["--server-url", server.url, "--api-key", server.api_key]


def uploaded(server, tmp_path: Path, sizes: dict[str, int], experiment: str = "cli") -> tuple:
    ckpt = make_checkpoint(tmp_path / "ckpt", sizes)
    with Chronicle(server.url, server.api_key, retry=RetryPolicy(base=0.05)) as chronicle:
        run = chronicle.run(chronicle.create_experiment(experiment), 0, 2)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=CEILING)
    return handle.asset_id, ckpt


def test_download_by_id_headless_exit_0_and_again_keeps_everything(server, tmp_path: Path) -> None:
    asset_id, ckpt = uploaded(server, tmp_path, {"a.bin": 2 * MiB, "sub/b.bin": 1000})
    dest = tmp_path / "restore"
    result = run_tui(tmp_path, "download", asset_id, str(dest), "--no-ui", *remote(server))
    assert result.returncode == 0, result.stderr
    assert tree_digest(dest) == tree_digest(ckpt)
    assert "Traceback" not in result.stderr
    done = result.stderr.strip().splitlines()[-1]
    assert "1/1 downloaded, 2/2 files" in done and "assets finalized" not in done, done
    assert not (tmp_path / "uploads.sqlite").exists()  # a download opens no upload tracker
    again = run_tui(tmp_path, "download", asset_id, str(dest), "--no-ui", *remote(server))
    assert again.returncode == 0, again.stderr


def test_download_latest_subset_as_json(server, tmp_path: Path) -> None:
    sizes = {f"__{r}_0.distcp": 100_000 + r for r in range(3)}
    asset_id, ckpt = uploaded(server, tmp_path, sizes, experiment="llama")
    dest = tmp_path / "restore"
    result = run_tui(
        tmp_path,
        "download",
        "--latest",
        "--experiment",
        "llama",
        "--run",
        "2",
        str(dest),
        "--include",
        "__1_*",
        "--json",
        *remote(server),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["exit_code"] == 0
    assert tree_digest(dest) == {"__1_0.distcp": tree_digest(ckpt)["__1_0.distcp"]}
    assert any(asset_id in json.dumps(line) for line in lines)


def test_download_usage_and_failure_exit_codes(server, tmp_path: Path) -> None:
    usage = run_tui(tmp_path, "download", str(tmp_path / "d"), "--no-ui", *remote(server))
    assert usage.returncode == 2 and "ASSET_ID and DEST" in usage.stderr
    both = run_tui(tmp_path, "download", "--latest", "x", "d", "--no-ui", *remote(server))
    assert both.returncode == 2 and "only DEST" in both.stderr
    missing = run_tui(tmp_path, "download", "nope", str(tmp_path / "d"), "--no-ui", *remote(server))
    assert missing.returncode == 1, missing.stderr
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
    none = run_tui(
        tmp_path, "download", "--latest", "--experiment", "empty", "d", "--no-ui", *remote(server)
    )
    assert none.returncode == 1 and "no experiment" in none.stderr


async def test_the_dashboard_shows_a_download_and_pauses_and_resumes_it(
    server, tmp_path: Path
) -> None:
    from methodic_tui.dashboard.app import MethodicApp
    from methodic_tui.download import DownloadJob
    from methodic_tui.engine_source import EngineSource
    from methodic_tui.options import Options

    asset_id, ckpt = uploaded(server, tmp_path, {"weights.bin": 6 * MiB, "meta.json": 500})
    dest = tmp_path / "restore"
    opts = Options(
        server_url=server.url,
        api_key=server.api_key,
        tracker=tmp_path / "unused.sqlite",
        max_bandwidth=1 * MiB,  # slow enough to be seen in flight
    )
    source = EngineSource(opts, DownloadJob(asset_id, dest), pending="leave")
    app = MethodicApp(source)
    async with app.run_test(size=(140, 40)) as pilot:
        row = f"download:{asset_id}"

        def shows(text: str):
            return lambda: text in screen_text(app)

        await wait_until_async(shows("downloading"), pause=pilot.pause, what="the row")
        assert "download" in screen_text(app)
        await pilot.press("p")
        await wait_until_async(
            lambda: any(
                a.asset_id == row and a.state == "paused" for a in source.snapshot().assets
            ),
            pause=pilot.pause,
            what="paused",
        )
        await wait_until_async(shows("paused"), pause=pilot.pause, what="paused on screen")
        source.set_bandwidth(None)
        await pilot.press("p")  # resume
        await wait_until_async(shows("downloaded"), pause=pilot.pause, what="downloaded")
        await pilot.press("enter")
        await wait_until_async(shows("weights.bin"), pause=pilot.pause, what="per-file rows")
    assert tree_digest(dest) == tree_digest(ckpt)
