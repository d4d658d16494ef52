"""The operator's CLI: no silent surprises (issue "The operator's experience").

Real ``methodic-tui`` subprocesses against a real server on 127.0.0.1, or a pty; each waits
on a condition (a line shown, a tracker state), never on a sleep.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint, wait_until
from test_cli_tui import Terminal, terminals  # noqa: F401  (the fixture)
from test_headless import assert_one_line_error, remote, run_tui
from tui_data import sample_snapshot
from tui_helpers import MiB, tui_cmd, tui_env

from methodic import ComponentSpec, UploadTracker
from methodic_tui import parsing
from methodic_tui.headless import Reporter, run_headless
from methodic_tui.source import StaticSource

NO_SERVER = ("--server-url", "METHODIC_SERVER_URL", "--embedded")


def finalized(tracker_path: Path) -> list[str]:
    with UploadTracker(tracker_path) as tracker:
        return [t.asset_id for t in tracker.list_assets() if t.state == "finalized"]


def states(tracker_path: Path) -> dict[str, str]:
    with UploadTracker(tracker_path) as tracker:
        return {t.asset_id: t.state for t in tracker.list_assets()}


# ------------------------------------------------------------ 1. a forgotten server URL


@pytest.mark.parametrize("command", ["upload", "watch", "resume"])
def test_a_batch_job_without_a_server_url_is_refused(tmp_path: Path, command: str) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    tracker_path = tmp_path / "u.sqlite"
    UploadTracker(tracker_path).close()  # so that resume gets as far as the server
    target = [] if command == "resume" else [str(ckpt if command == "upload" else tmp_path)]
    result = run_tui(tmp_path, command, *target, "--no-ui", "--tracker", str(tracker_path))
    line = assert_one_line_error(result)
    assert all(word in line for word in NO_SERVER), line
    assert not (tmp_path / "xdg" / "methodic").exists()  # no embedded server was started
    assert finalized(tracker_path) == []


def test_embedded_is_an_explicit_opt_in_and_says_the_bytes_stay_here(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    result = run_tui(tmp_path, "upload", str(ckpt), "--no-ui", "--embedded")
    assert result.returncode == 0, result.stderr
    assert "the bytes stay on this machine" in result.stderr
    assert (tmp_path / "xdg" / "methodic" / "server").is_dir()


def test_json_mode_reports_a_configuration_error_as_json(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    for args in (["upload", str(ckpt)], ["upload", str(ckpt), "--workers", "0"]):
        result = run_tui(tmp_path, *args, "--json")
        assert_one_line_error(result)
        (line,) = [json.loads(x) for x in result.stdout.splitlines()]
        assert line["schema"] == 1 and line["event"] == "error" and line["exit_code"] == 2


def test_the_dashboard_header_says_the_bytes_stay_on_this_machine(
    tmp_path: Path,
    terminals,  # noqa: F811
) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    term = Terminal(
        ["upload", str(ckpt), "--tracker", str(tmp_path / "u.sqlite")], tmp_path, (160, 30)
    )
    terminals.append(term)
    # (the long form, "on this machine"; on a narrow terminal "here": the raw output may hold
    # only the part of the line that changed when the terminal's size became known)
    term.wait_for("LOCAL: bytes stay")
    term.wait_for("all finalized")
    term.press("q")
    assert term.proc.wait(15) == 0


# ------------------------------------------------------------ 3. quitting, and resume's tracker


def test_quitting_the_dashboard_mid_upload_prints_the_resume_command(
    server,
    tmp_path: Path,
    terminals,  # noqa: F811
) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {f"s{i}.bin": MiB // 2 for i in range(8)})
    tracker_path = tmp_path / "u.sqlite"
    term = Terminal(
        ["upload", str(ckpt), *remote(server, tmp_path), "--max-bandwidth", "500KB"],
        tmp_path,
        (120, 30),
    )
    terminals.append(term)
    term.wait_for("uploading")
    term.press("q")
    term.wait_for("Quit now?")
    term.press("y")
    assert term.proc.wait(15) == 0
    term.wait_for(f"1 upload unfinished; resume with: methodic-tui resume --tracker {tracker_path}")


def test_resume_without_a_tracker_is_exit_2_and_creates_none(server, tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    for command in ("resume", "retry", "discard"):
        args = [command] + (["x"] if command != "resume" else [])
        result = run_tui(tmp_path, *args, *remote(server, tmp_path)[:4], "--tracker", str(missing))
        assert "no tracker at" in assert_one_line_error(result)
        assert not missing.exists()


# ------------------------------------------------------------ 4. bad input


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--server-url", "http://[::1", "--api-key", "k"], "is not a valid URL"),
        (["--server-url", "http://127.0.0.1:99999", "--api-key", "k"], "is not a valid URL"),
        (["--server-url", "ftp://host", "--api-key", "k"], "not an http:// or https:// URL"),
        (["--workers", "99999999999999999999"], "more than the 256 allowed"),
        (["--workers", "257"], "more than the 256 allowed"),
        (["--tracker", "."], "is a directory; pass a file in it"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    result = run_tui(tmp_path, "upload", str(ckpt), "--no-ui", "--embedded", *args)
    assert expected in assert_one_line_error(result)


def test_an_empty_directory_or_a_fifo_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name, expected in (("empty", "is an empty directory"), ("fifo", "is a FIFO")):
        result = run_tui(tmp_path, "upload", name, "--no-ui", "--embedded")
        assert expected in assert_one_line_error(result)


@pytest.mark.parametrize(
    "size, expected", [("abc", "'abc' is not a size"), ("0", "'0' is not a size above 0")]
)
def test_demo_size_errors_speak_of_sizes(tmp_path: Path, size: str, expected: str) -> None:
    line = assert_one_line_error(run_tui(tmp_path, "demo", "--no-ui", "--size", size))
    assert expected in line and "bandwidth" not in line


def test_bandwidth_in_bits_and_from_the_environment(tmp_path: Path) -> None:
    assert parsing.rate("200Mbit") == 25_000_000
    assert parsing.rate("1Gbps") == 125_000_000
    assert parsing.rate("200MB") == 200_000_000
    assert parsing.rate("0") is None
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    for env, expected in (
        ({"METHODIC_WORKERS": "0"}, "METHODIC_WORKERS: 0 is not >= 1"),
        ({"METHODIC_MAX_BANDWIDTH": "fast"}, "METHODIC_MAX_BANDWIDTH: 'fast' is not a rate"),
    ):
        result = run_tui(tmp_path, "upload", str(ckpt), "--no-ui", "--embedded", **env)
        assert expected in assert_one_line_error(result)
    ok = run_tui(
        tmp_path,
        "upload",
        str(ckpt),
        "--no-ui",
        "--embedded",
        "--max-bandwidth",
        "800Mbit",
        METHODIC_WORKERS="3",
    )
    assert ok.returncode == 0, ok.stderr


# ------------------------------------------------------------ 5. logs fit for a batch system


class Ticking(StaticSource):
    """Never settles by itself; its asset changes state at tick 50; settles at tick 100."""

    ticks: int = 0

    async def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 50:
            self.fixed = replace(
                self.fixed,
                assets=tuple(
                    replace(a, state="finalized") if a.state == "uploading" else a
                    for a in self.fixed.assets
                ),
            )

    def settled(self) -> bool:
        return self.ticks >= 100


def status_lines(heartbeat: float, verbose: bool = False) -> list[str]:
    err = io.StringIO()
    reporter = Reporter(err=err, out=io.StringIO(), colour=False, verbose=verbose)
    source = Ticking(fixed=sample_snapshot())
    clock = iter(range(10_000))  # one second per tick: a hundred seconds, deterministically
    asyncio.run(
        run_headless(source, reporter, heartbeat=heartbeat, tick=0, clock=lambda: next(clock))
    )
    return [line for line in err.getvalue().splitlines() if " status " in line]


def test_status_lines_on_change_and_on_a_heartbeat_not_every_two_seconds() -> None:
    assert len(status_lines(heartbeat=0)) == 2  # the first, and the change at tick 50
    assert len(status_lines(heartbeat=30)) == 4  # + heartbeats at 30 and 80 s
    line = status_lines(heartbeat=0)[0]
    assert line[:4].isdigit() and line[4] == "-" and line[10] == "T"  # ISO 8601


def test_quiet_log_file_iso_times_and_a_versioned_json_schema(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    log = tmp_path / "upload.log"
    result = run_tui(
        tmp_path, "upload", str(ckpt), "-q", "--log-file", str(log), *remote(server, tmp_path)
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()  # -q: only the summary
    assert "done in" in line and line[10] == "T"
    logged = log.read_text().splitlines()
    assert logged == [line]
    ckpt2 = make_checkpoint(tmp_path / "checkpoint-2", {"x.bin": 1000})
    result = run_tui(tmp_path, "upload", str(ckpt2), "--json", *remote(server, tmp_path))
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines and all(x["schema"] == 1 for x in lines)
    assert lines[-1]["event"] == "summary" and lines[-1]["exit_code"] == 0
    assert (Path(__file__).parent.parent / "docs" / "headless.md").read_text().count('"schema"')


# ------------------------------------------------------------ 6. a CLI way out of every state


def test_list_retry_and_discard_a_failed_asset(server, tmp_path: Path) -> None:
    tracker_path = tmp_path / "u.sqlite"
    a = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000})
    b = make_checkpoint(tmp_path / "checkpoint-2", {"x.bin": 1000})
    server.faults.add(status=400, count=2)  # not transient: both fail
    failed = run_tui(tmp_path, "upload", str(a), str(b), *remote(server, tmp_path))
    assert failed.returncode == 1, failed.stderr
    assert "methodic-tui retry ASSET" in failed.stderr
    listed = run_tui(tmp_path, "list", "--json", "--tracker", str(tracker_path))
    assert listed.returncode == 0, listed.stderr
    assets = json.loads(listed.stdout)["assets"]
    assert [x["state"] for x in assets] == ["failed", "failed"]
    text = run_tui(tmp_path, "list", "--tracker", str(tracker_path)).stdout
    assert "failed" in text and "checkpoint-1" in text

    retried = run_tui(tmp_path, "retry", "checkpoint-1", *remote(server, tmp_path)[:6])
    assert retried.returncode == 0, retried.stderr
    assert "press u" not in retried.stderr  # no keys in a log
    by_name = {x["name"]: x["asset_id"] for x in assets}
    assert states(tracker_path)[by_name["checkpoint-1"]] == "finalized"

    discarded = run_tui(
        tmp_path, "discard", by_name["checkpoint-2"][:20], *remote(server, tmp_path)[:6]
    )
    assert discarded.returncode == 0, discarded.stderr
    assert states(tracker_path)[by_name["checkpoint-2"]] == "discarded"
    again = run_tui(tmp_path, "discard", "checkpoint-1", *remote(server, tmp_path)[:6])
    assert "cannot be discarded" in assert_one_line_error(again)
    unknown = run_tui(tmp_path, "retry", "nothing-like-it", *remote(server, tmp_path)[:6])
    assert "no asset 'nothing-like-it'" in assert_one_line_error(unknown)


def test_seal_an_asset_a_crash_left_unsealed(tmp_path: Path) -> None:
    tracker_path = tmp_path / "u.sqlite"
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 10})
    with UploadTracker(tracker_path) as tracker:
        spec = ComponentSpec("x.bin", ckpt / "x.bin", 10)
        tracker.register_components("asset-1", [spec], asset_type="checkpoint", seal=False)
    result = run_tui(tmp_path, "seal", "asset-1", "--tracker", str(tracker_path))
    assert result.returncode == 0, result.stderr
    assert "sealed" in result.stdout and "methodic-tui resume" in result.stdout
    with UploadTracker(tracker_path) as tracker:
        got = tracker.get_asset("asset-1")
        assert got is not None and got.sealed


def test_dry_run_and_a_finalized_directory_is_skipped_unless_forced(server, tmp_path: Path) -> None:
    tracker_path = tmp_path / "u.sqlite"
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"x.bin": 1000, "sub/y.bin": 20})
    dry = run_tui(tmp_path, "upload", str(ckpt), "--dry-run", "--tracker", str(tracker_path))
    assert dry.returncode == 0, dry.stderr
    assert "would upload: 2 files" in dry.stdout and "sub/y.bin" in dry.stdout
    assert not tracker_path.exists()
    assert run_tui(tmp_path, "upload", str(ckpt), *remote(server, tmp_path)).returncode == 0
    again = run_tui(tmp_path, "upload", str(ckpt), *remote(server, tmp_path))
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stderr and "--force uploads it again" in again.stderr
    assert len(finalized(tracker_path)) == 1
    dry = run_tui(tmp_path, "upload", str(ckpt), "--dry-run", "--tracker", str(tracker_path))
    assert "would skip" in dry.stdout
    forced = run_tui(tmp_path, "upload", str(ckpt), "--force", *remote(server, tmp_path))
    assert forced.returncode == 0, forced.stderr
    assert len(finalized(tracker_path)) == 2


def test_bash_completion_script(tmp_path: Path) -> None:
    result = run_tui(tmp_path, "completion", "bash")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "complete -o filenames -F _methodic_tui methodic-tui" in script
    assert "retry)" in script and "--dry-run" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "command",
    [
        "demo",
        "upload",
        "watch",
        "resume",
        "attach",
        "monitor",
        "status",
        "list",
        "discard",
        "seal",
        "retry",
    ],
)
def test_each_subcommand_help_has_examples_exit_codes_and_only_its_options(
    tmp_path: Path, command: str
) -> None:
    result = subprocess.run(
        tui_cmd(command, "--help"), capture_output=True, text=True, env=tui_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "examples:" in out and "exit codes:" in out and f"methodic-tui {command}" in out
    takes_transfers = command in ("demo", "upload", "watch", "resume", "retry")
    assert ("--workers" in out) == takes_transfers
    # attach and monitor: the server their uploaders beat to (docs/monitor.md), no --embedded.
    assert ("--server-url" in out) == (
        command in ("upload", "watch", "resume", "retry", "discard", "attach", "monitor")
    )
    assert ("--embedded" in out) == (command in ("upload", "watch", "resume", "retry", "discard"))


# ------------------------------------------------------------ choosing files: --include/--exclude


def test_include_and_exclude_choose_the_files_of_an_upload(server, tmp_path: Path) -> None:
    tracker_path = tmp_path / "u.sqlite"
    ckpt = make_checkpoint(
        tmp_path / "checkpoint-1",
        {"__0_0.distcp": 10, "__1_0.distcp": 20, "sub/__1_1.distcp": 30, ".metadata": 5},
    )
    chosen = ("--include", "__1_*.distcp", "--exclude", "sub/*")
    dry = run_tui(tmp_path, "upload", str(ckpt), "--dry-run", *chosen, "--tracker", "t.sqlite")
    assert dry.returncode == 0, dry.stderr
    assert "would upload: 1 file" in dry.stdout and "__1_0.distcp" in dry.stdout
    result = run_tui(tmp_path, "upload", str(ckpt), *chosen, *remote(server, tmp_path))
    assert result.returncode == 0, result.stderr
    with UploadTracker(tracker_path) as tracker:
        (asset,) = tracker.list_assets()
        assert [c.path for c in tracker.get_asset(asset.asset_id).components] == ["__1_0.distcp"]
    # The same directory with another selection is another asset, not "already finalized".
    rank0 = run_tui(tmp_path, "upload", str(ckpt), "--include", "__0_*", *remote(server, tmp_path))
    assert rank0.returncode == 0 and "skipped" not in rank0.stderr, rank0.stderr
    again = run_tui(tmp_path, "upload", str(ckpt), *chosen, *remote(server, tmp_path))
    assert "skipped" in again.stderr, again.stderr
    assert len(finalized(tracker_path)) == 2
    nothing = run_tui(tmp_path, "upload", str(ckpt), "--include", "*.pt", *remote(server, tmp_path))
    line = assert_one_line_error(nothing)
    assert "nothing to upload" in line and "*.pt" in line


def test_watch_never_uploads_its_marker_file(server, tmp_path: Path) -> None:
    root = tmp_path / "out"
    ckpt = make_checkpoint(root / "checkpoint-1", {"w.bin": 100})
    (ckpt / ".complete").write_text("")
    tracker_path = tmp_path / "u.sqlite"
    proc = subprocess.Popen(
        tui_cmd("watch", str(root), "--settle", "600", *remote(server, tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        wait_until(lambda: tracker_path.exists() and finalized(tracker_path), what="finalized")
    finally:
        proc.terminate()
        proc.communicate(timeout=CEILING)
    with UploadTracker(tracker_path) as tracker:
        (asset_id,) = finalized(tracker_path)
        assert [c.path for c in tracker.get_asset(asset_id).components] == ["w.bin"]
