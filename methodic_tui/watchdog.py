"""A dropped terminal ends the dashboard, whatever state Textual is in.

Textual writes to the terminal from one thread through a queue of 30 writes. When the terminal
stops taking bytes (an SSH session or a tmux pane going away) that thread blocks, then dies on
EIO; the queue fills and the app's event loop blocks for ever on its next write, so neither
SIGHUP (delivered through that loop) nor the app's own terminal check ever runs, and the process
lives on as the owner of uploads nobody can resume. This watchdog is a plain thread that needs
neither: it notices the loss (SIGHUP, or the terminal no longer answering), asks the app to leave,
and if the process is still here ``grace`` seconds later it flushes the engine (bounded) and
``os._exit``\\ s with 129.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import threading
from collections.abc import Callable
from types import FrameType

EXIT_HANGUP = 128 + signal.SIGHUP


def terminal_gone(fds: tuple[int, ...]) -> bool:
    """True once none of ``fds`` is a terminal that still answers (a hung-up tty gives EIO)."""
    for fd in fds:
        try:
            termios.tcgetattr(fd)
        except (OSError, ValueError, termios.error):
            return True
    return False


def _terminal_fds() -> tuple[int, ...]:
    fds = []
    for stream in (sys.__stdin__, sys.__stdout__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream is not None and os.isatty(stream.fileno()):
                fds.append(stream.fileno())
    return tuple(fds)


class TerminalWatchdog:
    """Watches the controlling terminal from a thread of its own (see the module's docstring).

    ``leave`` is called (from the watchdog's thread) once the terminal is lost: it should ask the
    app to exit the ordinary way. ``flush(timeout)`` closes the engine within ``timeout`` seconds
    when the ordinary way did not end the process in time.
    """

    def __init__(
        self,
        leave: Callable[[], None],
        flush: Callable[[float], None],
        *,
        grace: float = 2.0,
        flush_timeout: float = 3.0,
        poll: float = 0.25,
        fds: tuple[int, ...] | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self._leave = leave
        self._flush = flush
        self.grace = grace
        self.flush_timeout = flush_timeout
        self.poll = poll
        self._fds = _terminal_fds() if fds is None else fds
        self._exit = exit
        self._lost = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="methodic-watchdog", daemon=True)
        self._previous: Callable[[int, FrameType | None], object] | int | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def start(self) -> None:
        """Start watching; call from the main thread (it installs the SIGHUP handler)."""
        self._previous = signal.signal(signal.SIGHUP, self._on_sighup)
        self._thread.start()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread even while it waits on a lock; it only wakes the watchdog.
        self._lost.set()

    def stop(self) -> None:
        """The app ended by itself: stop watching for loss (an exit already under way goes on)."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._lost.wait(self.poll) or (self._fds and terminal_gone(self._fds)):
                self._lost.set()
                break
        else:
            return
        with contextlib.suppress(Exception):
            self._leave()
        # Whatever ends the process the ordinary way has `grace` seconds; after that, Textual is
        # stuck on the dead terminal: flush the tracker ourselves and go.
        threading.Event().wait(self.grace)
        try:
            self._flush(self.flush_timeout)
        finally:
            self._exit(EXIT_HANGUP)
