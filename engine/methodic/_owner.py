"""Who owns an unfinished upload: whether the process that recorded it still runs."""

from __future__ import annotations

import os


def owner_alive(pid: int | None) -> bool:
    """Whether ``pid`` is another process that still runs on this host (not this one)."""
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    # A killed uploader stays a zombie until its parent reaps it (or for good, when the
    # parent ignores it): it has exited and uploads nothing.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no procfs: trust kill(0)
        return True
    return state != b"Z"
