"""``methodic-tui watch DIR``: upload each new checkpoint directory once it is complete.

Polling, not inotify: inotify misses writes other nodes make on NFS or Lustre. A directory
is complete when it holds a marker file, or when nothing in it changed for ``settle``
seconds. Each directory is uploaded once: the tracker remembers every asset's local_dir.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import ChronicleError
from methodic_tui.jobs import BaseJob

if TYPE_CHECKING:
    from methodic_tui.engine_source import EngineSource

MARKERS = (".complete", "COMPLETE", ".done", "DONE")
Signature = tuple[tuple[str, int, int], ...]


def tree_signature(root: Path) -> Signature:
    """(path, size, mtime) of every file under root; any write changes it."""
    out: list[tuple[str, int, int]] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:  # removed while we looked: still changing
                continue
            out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def has_marker(d: Path) -> bool:
    return any((d / m).exists() for m in MARKERS)


@dataclass
class DirWatcher:
    """Which candidate directories have become complete (no UI, no engine: testable alone)."""

    root: Path
    pattern: str = "checkpoint-*"
    settle: float = 30.0
    seen: set[str] = field(default_factory=set)  # absolute paths already uploaded or taken
    _last: dict[str, tuple[Signature, float]] = field(default_factory=dict)

    def candidates(self) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        return [
            Path(e.path).absolute()
            for e in entries
            if e.is_dir(follow_symlinks=False)
            and fnmatch.fnmatch(e.name, self.pattern)
            and os.fspath(Path(e.path).absolute()) not in self.seen
        ]

    def complete(self, now: float) -> list[Path]:
        ready: list[Path] = []
        for d in self.candidates():
            key = os.fspath(d)
            sig = tree_signature(d)
            if not sig:
                continue
            if has_marker(d):
                ready.append(d)
                continue
            last = self._last.get(key)
            if last is None or last[0] != sig:
                self._last[key] = (sig, now)
            elif now - last[1] >= self.settle:
                ready.append(d)
        for d in ready:
            self.seen.add(os.fspath(d))
            self._last.pop(os.fspath(d), None)
        return ready


@dataclass
class WatchJob(BaseJob):
    root: Path
    pattern: str = "checkpoint-*"
    settle: float = 30.0
    poll: float | None = None  # seconds between scans (default: a quarter of settle, 0.2..2 s)
    name = "watch"
    continuous = True

    async def run(self, source: EngineSource) -> None:
        assert source.tracker is not None
        known = await asyncio.to_thread(source.tracker.list_assets, None)
        watcher = DirWatcher(
            self.root.expanduser().absolute(),
            self.pattern,
            self.settle,
            seen={os.fspath(Path(a.local_dir).absolute()) for a in known if a.local_dir},
        )
        interval = self.poll or min(max(self.settle / 4, 0.2), 2.0)
        source.notice(
            "info",
            f"watching {watcher.root} for {self.pattern!r} (complete: a marker "
            f"file {'/'.join(MARKERS[:2])} or no change for {self.settle:g}s)",
        )
        loop = asyncio.get_running_loop()
        while True:
            for d in await asyncio.to_thread(watcher.complete, loop.time()):
                try:
                    await source.upload_dir(d, exclude=MARKERS)
                except ChronicleError as exc:  # one bad directory must not stop the watch
                    source.notice("error", f"watch: {exc}")
            await asyncio.sleep(interval)
