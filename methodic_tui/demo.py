"""``methodic-tui demo``: synthetic checkpoints, an embedded server in a temp dir, one 503."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from methodic import RetryPolicy
from methodic_tui.jobs import BaseJob
from methodic_tui.options import Options

if TYPE_CHECKING:
    from methodic_tui.engine_source import EngineSource

MiB = 1 << 20
DEFAULT_SIZE = 300_000_000
DEFAULT_BANDWIDTH = 25_000_000  # so a newcomer sees the uploads move (--max-bandwidth 0: none)
PART_SIZE = 5 * MiB  # the smallest part the engine allows
SHARDS = 4


def checkpoint_files(total: int) -> dict[str, int]:
    """The files of one synthetic checkpoint of about ``total`` bytes.

    The optimizer state is the big one (sent in parts when large enough); one name has a
    ``[`` in it, as real checkpoints do, to show it is never read as markup.
    """
    big = int(total * 0.4)
    shard = int(total * 0.14)
    small = max(total - big - SHARDS * shard, 3)
    files = {f"model-{i:05d}-of-{SHARDS:05d}.safetensors": shard for i in range(1, SHARDS + 1)}
    files["optimizer.pt"] = big
    files["rng_state[0].pth"] = max(small // 2, 1)
    files["trainer_state.json"] = max(small - small // 2 - 1, 1)
    files["config.json"] = 0  # written as real JSON below
    return files


def write_checkpoint(root: Path, files: dict[str, int], step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in files.items():
        path = root / name
        if name == "config.json":
            path.write_text(json.dumps({"model_type": "demo", "hidden_size": 768, "step": step}))
            continue
        block = os.urandom(min(n, MiB) or 1)
        with open(path, "wb") as f:
            left = n
            while left > 0:
                f.write(block[:left])
                left -= len(block)
    return root


@dataclass
class DemoJob(BaseJob):
    total_size: int = DEFAULT_SIZE
    checkpoints: int = 5
    interval: float = 1.0  # seconds between checkpoints, as a training loop would write them
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="methodic-demo-")))
    name = "demo"
    resumable = False  # its temp dir goes when it exits

    @property
    def files(self) -> dict[str, int]:
        return checkpoint_files(max(self.total_size // self.checkpoints, 16))

    def prepare(self, options: Options) -> None:
        options.server_dir = self.root / "server"
        options.tracker = self.root / "uploads.sqlite"
        options.experiment = "demo"
        big = max(self.files.values())
        options.part_size = PART_SIZE
        options.part_threshold = min(16 * MiB, big) if big > PART_SIZE else 16 * MiB
        options.retry = options.retry or RetryPolicy(base=0.5, cap=2.0)

    async def run(self, source: EngineSource) -> None:
        if source.server is not None:
            source.server.faults.add(status=503)
            source.notice(
                "info",
                "demo: the server will refuse the first upload once "
                "(503 Service Unavailable) to show a retry",
            )
        else:
            source.notice("info", "demo: with --server-url no fault is injected")
        files = self.files
        for i in range(1, self.checkpoints + 1):
            step = i * 1000
            ckpt = await asyncio.to_thread(
                write_checkpoint, self.root / "checkpoints" / f"checkpoint-{step}", files, step
            )
            await source.upload_dir(ckpt)
            if i < self.checkpoints:
                await asyncio.sleep(self.interval)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
