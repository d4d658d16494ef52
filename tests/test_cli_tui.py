"""The real ``methodic-tui`` dashboard in a pseudo-terminal: keys, and a dropped SSH session."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from helpers import CEILING, make_checkpoint, wait_until
from tui_helpers import MiB, remote_args, tui_cmd, tui_env

from methodic import UploadTracker

# A new session whose controlling terminal is stdin, then the command (same pid). Not a
# preexec_fn: code run between fork and exec can deadlock when the parent has threads (the
# watchdog test starts terminals from a thread pool; it hung in Popen under load).
CONTROLLING_TTY = [
    sys.executable,
    "-c",
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


class Terminal:
    """A child process on a pty that is its controlling terminal, with its output collected."""

    def __init__(self, args: list[str], tmp_path: Path, size: tuple[int, int] = (80, 24)) -> None:
        self.master, slave = pty.openpty()
        cols, rows = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = tui_env(tmp_path, TERM="xterm-256color")
        self.proc = subprocess.Popen(
            [*CONTROLLING_TTY, *tui_cmd(*args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=tmp_path,
        )
        os.close(slave)
        self.output = bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.output += data

    def wait_for(self, text: str) -> None:
        def shown() -> bool:
            if text.encode() in self.output:
                return True
            if self.proc.poll() is not None and not self._reader.is_alive():  # all read
                raise AssertionError(f"{text!r} never shown; exit {self.proc.returncode}")
            return False

        wait_until(shown, interval=0.05, what=f"{text!r} shown")

    def all_output(self) -> str:
        """Everything the child wrote, once it has exited (the reader stops at the pty's end)."""
        self.proc.wait(CEILING)
        self._reader.join(CEILING)
        return self.output.decode(errors="replace")

    def press(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def hang_up(self) -> None:
        """What a dropped SSH session does: the terminal's master side goes away."""
        self._stop.set()
        self._reader.join()
        os.close(self.master)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._stop.is_set():
            self._stop.set()
            self._reader.join()
            os.close(self.master)


def completed_files(tracker_path: Path) -> int:
    with UploadTracker(tracker_path) as tracker:
        return sum(t.completed_count for t in tracker.list_assets())


@pytest.fixture
def terminals():
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def test_demo_in_a_terminal_finishes_and_q_quits(tmp_path: Path, terminals) -> None:
    term = Terminal(["demo", "--size", "3MB", "--every", "0", "--max-bandwidth", "0"], tmp_path)
    terminals.append(term)
    term.wait_for("all finalized")
    term.press("q")
    assert term.proc.wait(CEILING) == 0


def test_a_dropped_terminal_exits_cleanly_and_the_upload_stays_resumable(
    server, tmp_path: Path, terminals
) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {f"s{i}.bin": MiB // 2 for i in range(16)})
    tracker_path = tmp_path / "u.sqlite"
    term = Terminal(
        [
            "upload",
            str(ckpt),
            *remote_args(server, tracker_path),
            "--max-bandwidth",
            "1MB",
            "--workers",
            "2",
        ],
        tmp_path,
    )
    terminals.append(term)
    term.wait_for("uploading")
    wait_until(lambda: completed_files(tracker_path) > 0, what="a file stored")
    term.hang_up()
    code = term.proc.wait(CEILING)  # not left spinning: it exits by itself
    assert code == 129, term.output[-2000:].decode(errors="replace")
    with UploadTracker(tracker_path) as tracker:
        (left,) = tracker.get_pending_uploads()
    assert 0 < left.completed_count < 16
    resumed = subprocess.run(
        tui_cmd(
            "resume",
            *remote_args(server, tracker_path),
        ),
        capture_output=True,
        text=True,
        timeout=CEILING,
        env=tui_env(tmp_path),
    )
    assert resumed.returncode == 0, resumed.stderr
    with UploadTracker(tracker_path) as tracker:
        assert tracker.get_pending_uploads() == []


def test_sigterm_stops_the_dashboard_cleanly(server, tmp_path: Path, terminals) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"a.bin": 4 * MiB})
    term = Terminal(
        [
            "upload",
            str(ckpt),
            *remote_args(server, tmp_path / "u.sqlite"),
            "--max-bandwidth",
            "500KB",
        ],
        tmp_path,
    )
    terminals.append(term)
    term.wait_for("uploading")
    term.proc.send_signal(signal.SIGTERM)
    assert term.proc.wait(CEILING) == 143
    with UploadTracker(tmp_path / "u.sqlite") as tracker:
        assert len(tracker.get_pending_uploads()) == 1


def test_a_wrong_key_in_the_dashboard_is_one_line_exit_2(server, tmp_path: Path, terminals) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", {"a.bin": 10})
    bad = "sk_agent_NOTTHEKEY000000"
    term = Terminal(
        [
            "upload",
            str(ckpt),
            "--server-url",
            server.url,
            "--api-key",
            bad,
            "--tracker",
            str(tmp_path / "u.sqlite"),
        ],
        tmp_path,
    )
    terminals.append(term)
    assert term.proc.wait(CEILING) == 2
    text = term.all_output()
    assert "methodic-tui: error: the server at" in text and "refused the API key" in text
    assert bad not in text and "Traceback" not in text


def test_python_dash_m_and_version(tmp_path: Path) -> None:
    result = subprocess.run(
        tui_cmd("--version"), capture_output=True, text=True, timeout=30, env=tui_env(tmp_path)
    )
    assert result.returncode == 0 and result.stdout.startswith("methodic-tui ")
