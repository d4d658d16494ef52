"""What a command uploads: directories given on the command line, or nothing new (resume, attach)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from methodic_tui.options import Options

if TYPE_CHECKING:
    from methodic_tui.engine_source import EngineSource


class BaseJob:
    name = "job"
    continuous = False
    needs_run = True
    resumable = True  # what it leaves unfinished can be resumed later (not the demo's temp dir)

    def prepare(self, options: Options) -> None:
        pass

    async def run(self, source: EngineSource) -> None:
        pass

    def cleanup(self) -> None:
        pass


@dataclass
class UploadJob(BaseJob):
    """``methodic-tui upload DIR...``: each directory becomes one asset."""

    dirs: Sequence[Path]
    asset_type: str | None = None
    name = "upload"

    async def run(self, source: EngineSource) -> None:
        for d in self.dirs:
            await source.upload_dir(d.expanduser().absolute(), self.asset_type)


class ResumeJob(BaseJob):
    """``methodic-tui resume``: only the tracker's unfinished uploads (adopted by the source)."""

    name = "resume"
    needs_run = False


def check_dirs(dirs: Sequence[Path]) -> str | None:
    """The first problem with the directories to upload, as one line, or None."""
    for d in dirs:
        p = d.expanduser()
        if not p.exists():
            return f"{d}: no such directory"
        if not p.is_dir():
            return f"{d} is a file, not a directory; pass the checkpoint directory"
    return None
