"""Who owns an unfinished upload: whether the process that recorded it still runs.

A pid alone does not name a process for long: once the owner dies the kernel may give its pid
to any new process. The tracker therefore records the owner's pid *and* its start time (clock
ticks since boot, field 22 of ``/proc/<pid>/stat``); a live process whose start time differs
is another process that reuses the pid, and owns nothing. Where there is no procfs the start
time is unknown and the pid alone decides.
"""

from __future__ import annotations

import functools
import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None without procfs (or no such pid)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields is not None else None  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


@functools.cache
def _my_start(pid: int) -> int | None:
    return process_start(pid)


def my_identity() -> tuple[int, int | None]:
    """This process as a tracker records its owner: (pid, start time or None)."""
    pid = os.getpid()  # keyed by pid: a forked child is another process
    return pid, _my_start(pid)


def owner_alive(pid: int | None, start: int | None = None) -> bool:
    """Whether ``pid`` is another process that still runs on this host (not this one).

    With ``start`` (the owner's recorded start time), a live process with that pid but another
    start time is not the owner: the pid was reused after the owner died.
    """
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    fields = _stat_fields(pid)
    if fields is None:  # no procfs (or it just exited): trust kill(0)
        return True
    # A killed uploader stays a zombie until its parent reaps it (or for good, when the
    # parent ignores it): it has exited and uploads nothing.
    if fields[0] == b"Z":
        return False
    if start is not None:
        try:
            return int(fields[19]) == start
        except (IndexError, ValueError):
            return True
    return True
