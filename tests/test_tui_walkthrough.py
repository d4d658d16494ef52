"""A walk-through of the real ``methodic-tui`` in a pseudo-terminal at 80x24 and 120x40: each
way out (q with uploads in flight, q when idle, the ctrl+c key, SIGINT, SIGTERM, finishing with
--no-ui) leaves with the documented exit code, no traceback, and the key facts on screen
(server, run, state) written whole, never cut.

Exit codes (README): 0 all finalized or the operator chose to quit, 130/143 on SIGINT/SIGTERM.
The Pilot tests of test_tui_operator check the same facts on the rendered screen.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint
from test_cli_tui import Terminal, terminals  # noqa: F401  (the fixture)
from tui_helpers import MiB, remote_args, tui_cmd, tui_env

from methodic import UploadTracker

SIZES = [(80, 24), (120, 40)]
SLOW = "500KB"  # 4 MiB stay in flight for the whole walk-through


def start(server, tmp_path: Path, size: tuple[int, int], *, busy: bool) -> Terminal:
    files = {"a.bin": 4 * MiB} if busy else {"a.bin": 1000}
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", files)
    args = ["upload", str(ckpt), *remote_args(server, tmp_path / "u.sqlite")]
    if busy:
        args += ["--max-bandwidth", SLOW]
    return Terminal(args, tmp_path, size)


def key_facts_shown(term: Terminal, server) -> None:
    """Server (its port whole) and run on the first line, at any of the sizes."""
    term.wait_for(server.url.split("://", 1)[1])
    term.wait_for("v0 r0")


def left_cleanly(term: Terminal, code: int) -> str:
    assert term.proc.wait(CEILING) == code
    text = term.all_output()
    assert "Traceback" not in text, text[-2000:]
    return text


def pending(tmp_path: Path) -> int:
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        return len(tracker.get_pending_uploads())


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_q_with_uploads_in_flight(server, tmp_path: Path, terminals, size) -> None:  # noqa: F811
    term = start(server, tmp_path, size, busy=True)
    terminals.append(term)
    key_facts_shown(term, server)
    term.wait_for("uploading")
    term.press("a")  # pause all: the state is on screen
    term.wait_for("PAUSED")
    term.press("a")
    term.wait_for("resumed checkpoint-1")
    term.press("q")
    term.wait_for("Quit now?")
    term.wait_for("Not finished: 1 upload")
    term.wait_for("Resumable:")
    term.press("y")
    text = left_cleanly(term, 0)
    assert "1 upload unfinished; resume with: methodic-tui resume --tracker" in text
    assert pending(tmp_path) == 1


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_q_when_idle(server, tmp_path: Path, terminals, size) -> None:  # noqa: F811
    term = start(server, tmp_path, size, busy=False)
    terminals.append(term)
    key_facts_shown(term, server)
    term.wait_for("all finalized")
    term.press("q")
    text = left_cleanly(term, 0)
    assert "unfinished" not in text
    assert pending(tmp_path) == 0


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_the_ctrl_c_key_asks_like_q(server, tmp_path: Path, terminals, size) -> None:  # noqa: F811
    """In the dashboard ctrl+c is a key (the terminal is raw): it asks first, as q does ("n"
    staying is test_tui's)."""
    term = start(server, tmp_path, size, busy=True)
    terminals.append(term)
    key_facts_shown(term, server)
    term.wait_for("uploading")
    term.press("\x03")
    term.wait_for("Quit now?")
    term.press("y")
    left_cleanly(term, 0)
    assert pending(tmp_path) == 1


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_it_with_128_plus_the_signal(
    server,
    tmp_path: Path,
    terminals,  # noqa: F811
    size,
    sig: signal.Signals,
) -> None:
    term = start(server, tmp_path, size, busy=True)
    terminals.append(term)
    key_facts_shown(term, server)
    term.wait_for("uploading")
    term.proc.send_signal(sig)
    text = left_cleanly(term, 128 + sig)
    assert "1 upload unfinished; resume with" in text
    assert pending(tmp_path) == 1  # flushed: resume continues it


def test_finishing_with_no_ui(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"a.bin": 1000, "b.bin": 2000})
    done = subprocess.run(
        tui_cmd("upload", str(ckpt), *remote_args(server, tmp_path / "u.sqlite"), "--no-ui"),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=tui_env(tmp_path),
        cwd=tmp_path,
        timeout=CEILING,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert "finalized checkpoint-1: 2 files" in out
    assert "1/1 assets finalized" in out
    assert pending(tmp_path) == 0
