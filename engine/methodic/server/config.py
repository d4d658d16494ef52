"""Settings of one Chronicle server instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to start; ``api_key=None`` means "use or create DATA_DIR/api_key"."""

    data_dir: Path
    api_key: str | None = field(default=None, repr=False)
    public_url: str | None = None
    presign_ttl: float = 3600.0
    host: str = "127.0.0.1"
    port: int = 8765
    max_components_per_asset: int = 1_000_000
    # S3's multipart limit, so that both backends accept the same manifests.
    max_parts_per_component: int = 10_000
    max_presign_batch: int = 1000
    max_json_body: int = 256 * MiB
    # How many component files finalize reads (to verify) and fsyncs at once.
    finalize_workers: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.query
                or parts.fragment
            ):
                raise ValueError(
                    f"public URL {self.public_url!r} is not an http(s)://host[:port][/prefix] origin"
                )
            object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
        if not self.presign_ttl > 0:
            raise ValueError("presign_ttl must be a positive number of seconds")
