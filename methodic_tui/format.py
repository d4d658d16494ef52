"""Text for sizes, rates, durations, progress and events: shared by the dashboard and --no-ui.

Plain strings only (no rich, no textual), so the headless path can use it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from collections.abc import Callable, Sequence

import humanize

from methodic import (
    DONE_STATES,
    AssetFinalized,
    AssetSnapshot,
    AssetState,
    AssetStateChanged,
    Event,
    PoolSnapshot,
    RanksChanged,
    RetryScheduled,
)
from methodic_tui.notices import Notice

DASH = "-"
_BLOCKS = " ▏▎▍▌▋▊▉█"


def plural(n: int, noun: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shown_state(a: AssetSnapshot) -> str:
    """The state to show: ``queued`` for an asset uploading with no file in flight yet/now.

    The engine says ``uploading`` from the moment an asset is queued; with more assets than
    workers most of them wait, and the operator must tell those from the ones that send.
    """
    if a.state == AssetState.UPLOADING and a.files_uploading == 0:
        return "queued"
    if a.state == AssetState.FINALIZING and a.contribution_stored and a.ranks_missing:
        return "waiting"  # this rank's contribution is stored; others are not yet
    return a.state


# ---------------------------------------------------------------- multi-rank assets

_RANKS_SHOWN = 10


def rank_list(ranks: Sequence[int]) -> str:
    """``5, 7``; ``0, 1, ... 9 and 22 more``."""
    shown = ", ".join(str(r) for r in ranks[:_RANKS_SHOWN])
    more = len(ranks) - _RANKS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def ranks_summary(a: AssetSnapshot) -> str | None:
    """``rank 3 of 8: 6/8 ranks stored, missing 5, 7`` for a rank's contribution, else None."""
    if a.rank is None or a.world_size is None:
        return None
    head = f"rank {a.rank} of {a.world_size}"
    if a.state == AssetState.FINALIZED:
        return f"{head}: all {a.world_size} ranks stored"
    if a.ranks_stored is None:
        return head
    text = f"{head}: {a.ranks_stored}/{a.world_size} ranks stored"
    return f"{text}, missing {rank_list(a.ranks_missing)}" if a.ranks_missing else text


def contribution_lines(a: AssetSnapshot, now: float, limit: int = 9) -> list[str]:
    """One line per rank of the asset, as the server last reported them: the ranks not yet
    stored first, at most ``limit`` lines and one more saying how many are left out."""
    if a.world_size is None:
        return []
    by_rank = {c.rank: c for c in a.contributions}
    stored = {c.rank for c in a.contributions if c.state == "stored"}
    if a.state == AssetState.FINALIZED:
        stored = set(range(a.world_size))
    order = [r for r in range(a.world_size) if r not in stored] + sorted(stored)
    lines = []
    for r in order[:limit]:
        c = by_rank.get(r)
        mine = " (this process)" if r == a.rank else ""
        if c is None:
            what = "stored" if a.state == AssetState.FINALIZED else "not registered yet"
            lines.append(f"rank {r:<4} {what}{mine}")
            continue
        files = plural(c.component_count, "file")
        if c.state == "stored":
            when = f"stored {age(c.stored_at or c.seen_at, now)}"
        else:
            when = f"uploading, last seen {age(c.seen_at, now)}"
        lines.append(f"rank {r:<4} {files}, {size(c.total_size)}, {when}{mine}")
    if len(order) > limit:
        left = order[limit:]
        lines.append(f"... and {len(left)} more ranks ({len(stored & set(left))} stored)")
    return lines


def size(n: float) -> str:
    """``1.2 GB``: decimal units, like the ``--max-bandwidth 200MB`` the user types."""
    return humanize.naturalsize(n, format="%.1f").replace(" Bytes", " B").replace(" Byte", " B")


def rate(bytes_per_s: float | None) -> str:
    if not bytes_per_s or bytes_per_s <= 0:
        return DASH
    text = humanize.naturalsize(bytes_per_s, format="%.3g")
    return text.replace(" Bytes", " B").replace(" Byte", " B") + "/s"


def cap(bytes_per_s: float | None) -> str:
    return "no cap" if not bytes_per_s else f"cap {rate(bytes_per_s)}"


def size_pair(done: int, total: int) -> str:
    """``0.5/1.2 GB``: done in the unit of the total, so the column stays narrow."""
    total_text = size(total)
    number, _, unit = total_text.partition(" ")
    factor = total / float(number) if float(number) else 1.0
    if unit == "B" or factor <= 1.0:
        return f"{done}/{total} B"
    return f"{done / factor:.1f}/{total_text}"


def fraction(done: int, total: int) -> float:
    return 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)


def percent(done: int, total: int) -> str:
    return f"{math.floor(fraction(done, total) * 100):d}%"


def bar(frac: float, width: int) -> str:
    """A text progress bar of ``width`` cells with eighth-block resolution."""
    frac = min(max(frac, 0.0), 1.0)
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_BLOCKS[part] if part and full < width else "")
    return text.ljust(width)


def duration(seconds: float | None) -> str:
    """Compact duration for table cells: ``45s``, ``4m05s``, ``2h13m``, ``3d04h``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return DASH
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def long_duration(seconds: float | None) -> str:
    """``4 minutes``, for the header and the status line."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return DASH
    return humanize.naturaldelta(dt.timedelta(seconds=max(seconds, 0.0)))


def age(then: float, now: float) -> str:
    """``3 minutes ago``."""
    return humanize.naturaltime(dt.timedelta(seconds=max(now - then, 0.0)))


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def asset_name(asset_id: str, local_dir: str | None) -> str:
    """What the operator recognises: the checkpoint directory's name, else a short id."""
    if local_dir:
        name = os.path.basename(os.path.normpath(local_dir))
        if name:
            return name
    return asset_id[:13]


def name_of(a: AssetSnapshot) -> str:
    return asset_name(a.asset_id, a.local_dir)


# ---------------------------------------------------------------- events

NameLookup = Callable[[str | None], str]


def describe_event(
    event: Event, name: NameLookup, was: str | None = None
) -> tuple[str, str] | None:
    """(level, text) for an event worth a line, None for progress and samples.

    Levels: ``ok``, ``info``, ``warn`` (retries, interruptions), ``error``. A failed file
    is not a line of its own: its asset fails with the same message, naming the file.
    ``was``: the asset's state before this event, when the caller knows it (a paused or
    interrupted asset uploading again is a line: "resumed").
    """
    who = name(event.asset_id)
    if isinstance(event, RetryScheduled):
        return "warn", (
            f"retry {who}/{event.path}: attempt {event.attempt} failed "
            f"({event.cause}); next in {event.delay:.1f}s"
        )
    if isinstance(event, AssetFinalized):
        files = plural(event.component_count, "file")
        return "ok", f"finalized {who}: {files}, {size(event.total_size)}"
    if isinstance(event, AssetStateChanged):
        if event.state == AssetState.UPLOADING and was in (
            AssetState.PAUSED,
            AssetState.INTERRUPTED,
        ):
            return "info", f"resumed {who}"
        if event.state == AssetState.UPLOADING and was == AssetState.FAILED:
            return "info", f"retrying {who}"
        return _describe_state(who, event)
    if isinstance(event, Notice):
        return event.level, event.message
    if isinstance(event, RanksChanged):
        head = f"{who}: rank {event.rank}'s contribution is stored"
        if not event.ranks_missing:
            return "info", f"{head}; all {event.world_size} ranks stored, finalizing"
        return "info", (
            f"{head}; {event.ranks_stored}/{event.world_size} ranks stored, "
            f"{event.waiting or 'waiting for ranks ' + rank_list(event.ranks_missing)}"
        )
    return None


def _describe_state(who: str, event: AssetStateChanged) -> tuple[str, str] | None:
    state = event.state
    if state == "failed":
        return "error", f"failed {who}: {event.error}"
    if state == "paused":
        return "info", f"paused {who}"
    if state == "discarded":
        return "warn", f"discarded {who}"
    if state == "interrupted":
        return "warn", f"unfinished {who}: left by an earlier process; press u to resume"
    # registered/uploading: the start of every asset would drown the log; finalizing and
    # finalized: AssetFinalized says it better.
    return None


# ---------------------------------------------------------------- summaries


def count_states(snapshot: PoolSnapshot) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in snapshot.assets:
        counts[a.state] = counts.get(a.state, 0) + 1
    return counts


def status_line(snapshot: PoolSnapshot) -> str:
    """``2/5 assets finalized, 40/120 files, 1.2/3.4 GB (35%), 45 MB/s, ETA 49 seconds``
    (a download counts as ``1/1 downloaded``)."""
    assets = [a for a in snapshot.assets if a.state != "discarded"]
    if not assets:
        return "no assets yet"
    counts = count_states(snapshot)
    files_done = sum(a.components_done for a in assets)
    files = sum(a.component_count for a in assets)
    done = sum(a.bytes_done for a in assets)
    total = sum(a.bytes_total for a in assets)
    downloads = sum(1 for a in assets if a.asset_type == "download")
    uploads = len(assets) - downloads
    parts = [
        *([f"{counts.get('finalized', 0)}/{uploads} assets finalized"] if uploads else []),
        *([f"{counts.get('downloaded', 0)}/{downloads} downloaded"] if downloads else []),
        f"{files_done}/{files} files",
        f"{size_pair(done, total)} ({percent(done, total)})",
        rate(snapshot.rate) if snapshot.rate > 0 else "idle",
    ]
    if snapshot.eta is not None:
        parts.append(f"ETA {long_duration(snapshot.eta)}")
    for state in (AssetState.FAILED, AssetState.PAUSED, AssetState.INTERRUPTED):
        if counts.get(state):
            parts.append(f"{counts[state]} {state}")
    for a in assets:
        ranks = ranks_summary(a)
        if ranks is not None and a.state not in (*DONE_STATES, AssetState.FAILED):
            parts.append(f"{name_of(a)} {ranks}")
    return ", ".join(parts)
