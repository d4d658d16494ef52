"""``methodic-tui --no-ui`` in real subprocesses: output, exit codes 0/1/2/130/143, no Textual."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CEILING, Lines, make_checkpoint, tracked_assets, wait_until
from tui_data import sample_snapshot
from tui_helpers import MiB, remote_args, tui_cmd, tui_env

import methodic_tui
from methodic import AssetFinalized, RetryScheduled, UploadTracker
from methodic_tui.headless import Reporter, use_colour

ANSI = "\x1b["


def run_tui(
    tmp_path: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tui_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tui_env(tmp_path, **env),
        cwd=tmp_path,
    )


def remote(server, tmp_path: Path) -> list[str]:
    return [
        *remote_args(server, tmp_path / "u.sqlite"),
        "--experiment",
        "headless",
    ]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("methodic-tui") and ": error: " in lines[0]
    assert "Traceback" not in result.stderr
    for secret in secrets:
        assert secret not in result.stderr + result.stdout
    return lines[0]


def test_upload_finishes_with_status_and_event_lines_and_exit_0(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 300_000, "y.bin": 1000})
    b = make_checkpoint(tmp_path / "checkpoint-2", {"z.bin": 200_000})
    server.faults.add(status=503)  # transient: retried, and said so
    result = run_tui(tmp_path, "upload", str(a), str(b), *remote(server, tmp_path))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "status " in err and "finalized checkpoint-1: 2 files" in err
    assert "retry checkpoint-" in err and "503" in err
    assert "done in" in err and "2/2 assets finalized" in err
    assert ANSI not in err and result.stdout == ""
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        assert {t.state for t in tracker.list_assets()} == {"finalized"}


def test_json_lines_go_to_stdout(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 100_000})
    result = run_tui(tmp_path, "upload", str(a), "--json", *remote(server, tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [line["event"] for line in lines]
    assert "AssetFinalized" in kinds and "status" in kinds
    assert kinds[-1] == "summary" and lines[-1]["exit_code"] == 0
    assert lines[-1]["states"] == {"finalized": 1} and lines[-1]["bytes_done"] == 100_000
    finalized = next(line for line in lines if line["event"] == "AssetFinalized")
    assert finalized["name"] == "checkpoint-1"


def test_a_failed_upload_exits_1(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    server.faults.add(status=400, count=5)  # not transient
    result = run_tui(tmp_path, "upload", str(a), *remote(server, tmp_path))
    assert result.returncode == 1, result.stderr
    assert "failed checkpoint-1" in result.stderr and "400" in result.stderr
    assert "1 failed (checkpoint-1)" in result.stderr and "Traceback" not in result.stderr


def test_wrong_api_key_is_one_line_exit_2_without_the_key(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    bad = "sk_agent_WRONGWRONGWRONG123"
    args = remote(server, tmp_path)
    args[args.index(server.api_key)] = bad
    line = assert_one_line_error(run_tui(tmp_path, "upload", str(a), *args), bad, server.api_key)
    assert "refused the API key" in line


def test_wrong_api_key_from_the_environment_is_not_printed(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    bad = "sk_agent_FROMTHEENVIRONMENT9"
    result = run_tui(
        tmp_path,
        "upload",
        str(a),
        "--tracker",
        str(tmp_path / "u.sqlite"),
        METHODIC_SERVER_URL=server.url,
        METHODIC_API_KEY=bad,
    )
    assert "refused the API key" in assert_one_line_error(result, bad)


def test_missing_directory_is_one_line_exit_2(server, tmp_path: Path) -> None:
    line = assert_one_line_error(
        run_tui(tmp_path, "upload", str(tmp_path / "nope"), *remote(server, tmp_path)),
        server.api_key,
    )
    assert "nope: no such directory" in line
    assert not (tmp_path / "u.sqlite").exists()  # nothing was started


@pytest.mark.parametrize(
    "args, expected",
    [
        (["upload", ".", "--max-bandwidth", "fast"], "is not a rate"),
        (["upload", ".", "--workers", "0"], "is not >= 1"),
        (["upload"], "the following arguments are required: DIR"),
        (["frobnicate"], "invalid choice"),
        (["upload", ".", "--server-url", "http://127.0.0.1:9"], "needs an API key"),
        (["status", "--tracker", "missing.sqlite"], "no tracker at"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    assert expected in assert_one_line_error(run_tui(tmp_path, *args, "--no-ui"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_cleanly_and_resume_continues(
    server, tmp_path: Path, sig: int, code: int
) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {f"s{i}.bin": MiB // 2 for i in range(16)})
    tracker_path = tmp_path / "u.sqlite"
    proc = subprocess.Popen(
        tui_cmd(
            "upload",
            str(ckpt),
            *remote(server, tmp_path),
            "--max-bandwidth",
            "1MB",
            "--workers",
            "2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        wait_until(
            lambda: any(t.completed_count > 0 for t in tracked_assets(tracker_path)),
            what="a file stored",
        )
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=CEILING)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name}: 1 unfinished upload, resumable with" in err
    assert "Traceback" not in err
    with UploadTracker(tracker_path) as tracker:
        (pending,) = tracker.get_pending_uploads()
    assert 0 < pending.completed_count < 16  # what was stored stays recorded
    resumed = run_tui(
        tmp_path,
        "resume",
        *remote_args(server, tracker_path),
    )
    assert resumed.returncode == 0, resumed.stderr
    with UploadTracker(tracker_path) as tracker:
        assert tracker.get_pending_uploads() == []


def test_resume_with_nothing_to_do_exits_0(server, tmp_path: Path) -> None:
    UploadTracker(tmp_path / "u.sqlite").close()  # no tracker at all is exit 2: test_cli_operator
    result = run_tui(
        tmp_path, "resume", *remote(server, tmp_path)[:4], "--tracker", str(tmp_path / "u.sqlite")
    )
    assert result.returncode == 0, result.stderr
    assert "done in" in result.stderr and "no assets yet" in result.stderr


def test_demo_no_ui_retries_and_exits_0(tmp_path: Path) -> None:
    result = run_tui(
        tmp_path, "demo", "--no-ui", "--size", "6MB", "--max-bandwidth", "0", "--every", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "started an embedded Chronicle server" in result.stderr
    assert "retry checkpoint-1000" in result.stderr and "503" in result.stderr
    assert result.stderr.count("finalized checkpoint-") == 5


def test_embedded_server_on_request_under_the_user_data_dir(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    result = run_tui(tmp_path, "upload", str(a), "--embedded")
    assert result.returncode == 0, result.stderr
    assert f"(data in {tmp_path / 'xdg' / 'methodic' / 'server'})" in result.stderr
    assert (tmp_path / "uploads.sqlite").exists()  # the default tracker, in the cwd


def test_watch_uploads_each_complete_directory_once(server, tmp_path: Path) -> None:
    root = tmp_path / "out"
    make_checkpoint(root / "checkpoint-100", {"a.bin": 1000, ".complete": 0})
    make_checkpoint(root / "checkpoint-200", {"a.bin": 2000})  # settles
    make_checkpoint(root / "other", {"a.bin": 1})  # does not match the pattern
    tracker_path = tmp_path / "u.sqlite"
    proc = subprocess.Popen(
        tui_cmd("watch", str(root), "--settle", "0.5", "--stats", "1", *remote(server, tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        err_lines = Lines(proc.stderr)
        wait_until(
            lambda: sum(t.state == "finalized" for t in tracked_assets(tracker_path)) == 2,
            what="both checkpoints finalized",
        )
        # More scans (every 0.2 s here) while two more status lines (a heartbeat a second) are
        # printed: nothing is uploaded twice.
        err_lines.wait_for("status ", times=err_lines.count("status ") + 2)
        proc.send_signal(signal.SIGINT)
        proc.wait(CEILING)
        err = err_lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        names = sorted(Path(t.local_dir or "").name for t in tracker.list_assets())
    assert names == ["checkpoint-100", "checkpoint-200"]
    # Restarted, the watch remembers what the tracker already holds.
    again = subprocess.Popen(
        tui_cmd("watch", str(root), "--settle", "0.2", "--stats", "1", *remote(server, tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        err_lines = Lines(again.stderr)
        # Watching (its signal handlers are set), then scans for two status lines (>= 1 s).
        err_lines.wait_for("watching ")
        err_lines.wait_for("status ", times=2)
        again.send_signal(signal.SIGTERM)
        again.wait(CEILING)
        err = err_lines.rest()
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    assert again.returncode == 143, err
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        assert len(tracker.list_assets()) == 2


def test_status_json_and_text(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    assert run_tui(tmp_path, "upload", str(a), *remote(server, tmp_path)).returncode == 0
    result = run_tui(tmp_path, "status", "--json", "--tracker", str(tmp_path / "u.sqlite"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["states"] == {"finalized": 1} and data["unfinished"] == []
    text = run_tui(tmp_path, "status", "--tracker", str(tmp_path / "u.sqlite"))
    assert "1 asset (1 finalized)" in text.stdout


def test_the_headless_path_never_imports_textual(server, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    code = (
        "import sys\n"
        "from methodic_tui.cli import main\n"
        f"rc = main({['upload', str(a), '--no-ui', *remote(server, tmp_path)]!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich'))\n"
        "print(rc, loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=tui_env(tmp_path),
    )
    assert result.stdout.strip() == "0 []", result.stdout + result.stderr


def test_no_textual_free_module_loads_textual_or_rich(tmp_path: Path) -> None:
    """Every module of methodic_tui outside ``methodic_tui.dashboard`` imports without them."""
    package = Path(methodic_tui.__file__).parent
    modules = sorted(f"methodic_tui.{p.stem}" for p in package.glob("*.py") if p.stem != "__main__")
    assert {"methodic_tui.cli", "methodic_tui.headless", "methodic_tui.status"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=tui_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


# ------------------------------------------------------------ the reporter, in-process


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_colour(FakeTTY()) and not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(FakeTTY())


def test_reporter_lines_and_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    err = FakeTTY()
    reporter = Reporter(err=err, out=io.StringIO())
    reporter.learn(sample_snapshot())
    aid = sample_snapshot().assets[0].asset_id
    reporter.event(RetryScheduled(aid, "a.bin", 1, 0.5, "HTTP 503"))
    reporter.event(AssetFinalized(aid, "checkpoint", 10, 1))
    reporter.status(sample_snapshot())
    lines = err.getvalue().splitlines()
    assert "retry checkpoint-1000/a.bin: attempt 1 failed (HTTP 503); next in 0.5s" in lines[0]
    assert lines[0].startswith("\x1b[33m") and lines[1].startswith("\x1b[32m")
    assert "status 1/5 assets finalized, 18/40 files, 148.3/300.0 MB (49%), 24.6 MB/s" in lines[2]
    assert "1 failed, 1 paused" in lines[2]
