"""The settings every command shares, resolved from flags and the environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from methodic import RetryPolicy

DEFAULT_TRACKER = Path("uploads.sqlite")


@dataclass
class Options:
    server_url: str | None = None  # None: start an embedded server
    embedded: bool = False  # no server URL: the bytes stay on this machine (said in the header)
    api_key: str | None = field(default=None, repr=False)
    tracker: Path = DEFAULT_TRACKER
    workers: int = 8
    max_bandwidth: float | None = None  # bytes/s; None: no cap
    experiment: str = "uploads"
    variation: int = 0
    run: int = 0
    asset_type: str = "checkpoint"
    server_dir: Path | None = None  # the embedded server's data dir (default: user data dir)
    part_threshold: int | None = None  # None: the engine's defaults
    part_size: int | None = None
    retry: RetryPolicy | None = None
    include: list[str] | None = None  # globs relative to each directory: only these files
    exclude: list[str] = field(default_factory=list)  # globs: never these files

    def chronicle_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {
            "max_upload_workers": self.workers,
            "max_bandwidth": self.max_bandwidth,
        }
        if self.retry is not None:
            kwargs["retry"] = self.retry
        if self.part_threshold is not None:
            kwargs["part_threshold"] = self.part_threshold
        if self.part_size is not None:
            kwargs["part_size"] = self.part_size
        return kwargs
