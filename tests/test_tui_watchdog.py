"""A dropped terminal ends the dashboard within seconds, however stuck Textual's writer is.

Each drop runs the real ``methodic-tui upload`` on a pty (its controlling terminal) with a slow
upload. Half the drops first stop reading the terminal until Textual's output thread is blocked
in write(2) and its event loop is blocked behind it (the state a py-spy dump showed hung for
ever); the others drop a terminal that is being read, or send SIGHUP first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint, tree_digest, wait_until
from test_cli_tui import Terminal
from tui_helpers import remote_args, tui_cmd, tui_env

from methodic import Chronicle, UploadTracker

DROPS = 20
AT_ONCE = 4
KiB = 1 << 10
FILES = 6
WRITE, FUTEX = 1, 202  # x86-64 syscall numbers, as /proc/PID/task/TID/syscall shows them


def _syscalls(pid: int) -> dict[int, list[str]] | None:
    """What each thread of ``pid`` is blocked in (number and arguments), or None if unreadable."""
    out: dict[int, list[str]] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                out[int(tid)] = f.read().split()
    except OSError:
        return None
    return out


def _stuck_on_the_terminal(pid: int) -> bool:
    """A thread blocked writing to stderr (fd 2, the terminal) and the main thread not in its
    event loop's epoll but on a lock: Textual's write queue is full."""
    calls = _syscalls(pid)
    if not calls or pid not in calls:
        return False
    writing = any(c[:2] == [str(WRITE), "0x2"] for tid, c in calls.items() if tid != pid)
    return writing and calls[pid][:1] == [str(FUTEX)]


def _can_see_syscalls() -> bool:
    import platform

    return platform.machine() == "x86_64" and _syscalls(os.getpid()) is not None


def _drop(server, root: Path, i: int) -> tuple[int, Path, Path]:
    ckpt = make_checkpoint(
        root / f"checkpoint-{i}", {f"s{k}.bin": 256 * KiB for k in range(FILES)}, seed=i
    )
    tracker_path = root / f"u{i}.sqlite"
    term = Terminal(
        [
            "upload",
            str(ckpt),
            *remote_args(server, tracker_path),
            "--max-bandwidth",
            "100KB",
            "--workers",
            "1",
        ],
        root,
        size=(200, 60),
    )
    try:
        term.wait_for("uploading")
        mode = i % 4
        if mode in (0, 1) and _can_see_syscalls():
            term._stop.set()  # nobody reads the terminal any more (a frozen SSH link)
            term._reader.join()

            def stuck() -> bool:
                if _stuck_on_the_terminal(term.proc.pid):
                    return True
                term.press("?\x1b")  # help, closed again: repaints fill Textual's write queue
                return False

            wait_until(stuck, interval=0.05, what="Textual's writer blocked and its loop behind it")
            os.close(term.master)
        elif mode == 2:
            term.proc.send_signal(signal.SIGHUP)
            term.hang_up()
        else:
            term.hang_up()
        code = term.proc.wait(CEILING)
    finally:
        term.close()
    return code, ckpt, tracker_path


@pytest.mark.timeout(600)
def test_twenty_dropped_terminals_each_end_the_process_and_resume_finishes(
    server, tmp_path: Path
) -> None:
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(lambda i: _drop(server, tmp_path, i), range(DROPS)))
    for i, (code, _, tracker_path) in enumerate(results):
        assert code == 129, f"drop {i}: exit {code}"
        with UploadTracker(tracker_path) as tracker:
            assets = tracker.list_assets()
            pending = tracker.get_pending_uploads()
        # Consistent: one asset, unfinished, resumable (its owner is gone), nothing lost.
        assert len(assets) == 1 and [p.asset_id for p in pending] == [assets[0].asset_id], i
        (left,) = pending
        assert not left.owner_alive, f"drop {i}: the dead dashboard still owns its upload"
        assert left.completed_count < FILES
    # `resume` finishes what the last drops left, byte-identical.
    with Chronicle(server.url, server.api_key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("uploads"), 0, 0)
        for _, ckpt, tracker_path in results[-2:]:
            resumed = subprocess.run(
                tui_cmd("resume", "--no-ui", *remote_args(server, tracker_path)),
                capture_output=True,
                text=True,
                timeout=CEILING,
                env=tui_env(tmp_path),
            )
            assert resumed.returncode == 0, resumed.stderr
            with UploadTracker(tracker_path) as tracker:
                (asset,) = tracker.list_assets()
                assert tracker.get_pending_uploads() == []
            dest = run.download_asset(asset.asset_id, tmp_path / f"dl-{ckpt.name}")
            assert tree_digest(dest) == tree_digest(ckpt)


STUCK_CHILD = """
import sys, threading
from methodic_tui.watchdog import TerminalWatchdog

def flush(timeout):
    open(sys.argv[1], "w").write(f"flushed within {timeout}")

TerminalWatchdog(lambda: None, flush, grace=0.1, fds=()).start()
print("ready", flush=True)
lock = threading.Lock()
lock.acquire()
lock.acquire()  # what Textual's loop does behind a dead writer thread: wait for ever
"""


def test_sighup_ends_a_process_whose_main_thread_is_stuck_and_flushes_first(
    tmp_path: Path,
) -> None:

    marker = tmp_path / "flushed"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_CHILD, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        env=tui_env(tmp_path),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(CEILING) == 129
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert marker.read_text().startswith("flushed within")
