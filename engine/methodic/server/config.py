"""Settings of one Chronicle server instance."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1024 * 1024
DAY = 86400.0
# SigV4 presigned URLs live at most 7 days.
S3_MAX_PRESIGN_TTL = 7 * DAY
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_storage(storage: str) -> S3Location | None:
    """None for ``local``; the bucket and prefix of ``s3://bucket[/prefix]``. Raises ValueError."""
    if storage == "local":
        return None
    if not storage.startswith("s3://"):
        raise ValueError(f"unknown --storage {storage!r}: use local or s3://BUCKET[/PREFIX]")
    bucket, _, prefix = storage.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{storage!r} does not name a valid S3 bucket (3-63 lowercase letters, digits, '.' "
            "or '-'): use s3://BUCKET[/PREFIX]"
        )
    prefix = prefix.strip("/")
    if "//" in prefix or len(prefix) > 512 or any(ord(ch) < 32 for ch in prefix):
        raise ValueError(f"the key prefix of {storage!r} is not usable")
    return S3Location(bucket, f"{prefix}/" if prefix else "")


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to start; ``api_key=None`` means "use or create DATA_DIR/api_key"."""

    data_dir: Path
    api_key: str | None = field(default=None, repr=False)
    public_url: str | None = None
    presign_ttl: float = 3600.0
    host: str = "127.0.0.1"
    port: int = 8765
    # The blob listener's port; None: the one this data dir had last time, else a free one.
    blob_port: int | None = None
    # Origin of presigned blob URLs; None: public_url, else the request's host and blob_port.
    public_blob_url: str | None = None
    # Bounded work per request (docs/http-api.md, Limits): a 100,000-file checkpoint fits twice.
    max_components_per_asset: int = 200_000
    # S3's multipart limit, so that both backends accept the same manifests.
    max_parts_per_component: int = 10_000
    # Targets per presign call, and per create with "presign": true.
    max_presign_batch: int = 1000
    # A control-API request body; 200,000 components with paths of ~200 characters fit.
    max_json_body: int = 64 * MiB
    # How many component files finalize reads (to verify) and fsyncs at once.
    finalize_workers: int = 8
    # "local", or "s3://bucket[/prefix]" (then the data dir keeps only metadata).
    storage: str = "local"
    s3_endpoint_url: str | None = None  # MinIO, Ceph RGW, ...; None: AWS
    s3_region: str | None = None  # None: the AWS configuration's
    # A pending asset with no activity (create, presign, upload, finalize) for this long expires
    # and its stored bytes are removed.
    pending_ttl: float = 3 * DAY
    # How often the server looks for expired assets; None: a quarter of pending_ttl, at most hourly.
    sweep_interval: float | None = None
    # Uploader sessions (docs/monitor.md): silent this long, a session shows as lost; forgotten
    # this long after its last beat; a relayed command not acknowledged this long expires.
    session_lost_after: float = 30.0
    session_retention: float = DAY
    command_ttl: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("public_url", "public_blob_url"):
            url = getattr(self, name)
            if url is None:
                continue
            parts = urlsplit(url)
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.query
                or parts.fragment
            ):
                what = "public URL" if name == "public_url" else "public blob URL"
                raise ValueError(f"{what} {url!r} is not an http(s)://host[:port][/prefix] origin")
            object.__setattr__(self, name, url.rstrip("/"))
        if not _positive(self.presign_ttl):
            raise ValueError("presign_ttl must be a positive number of seconds")
        if not _positive(self.pending_ttl):
            raise ValueError("pending_ttl must be a positive number of seconds")
        for name in ("session_lost_after", "session_retention", "command_ttl"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.sweep_interval is not None and not _positive(self.sweep_interval):
            raise ValueError("sweep_interval must be a positive number of seconds")
        for name in ("max_components_per_asset", "max_presign_batch", "max_json_body"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        location = parse_storage(self.storage)
        if location is None:
            if self.s3_endpoint_url or self.s3_region:
                raise ValueError("the S3 endpoint URL and region need --storage s3://BUCKET")
        else:
            if self.presign_ttl > S3_MAX_PRESIGN_TTL:
                raise ValueError(
                    f"presign_ttl {self.presign_ttl:g} s is over S3's limit of {S3_MAX_PRESIGN_TTL:g} s (7 days)"
                )
            if self.s3_endpoint_url is not None:
                url = urlsplit(self.s3_endpoint_url)
                if url.scheme not in ("http", "https") or not url.netloc or url.query:
                    raise ValueError(
                        f"S3 endpoint URL {self.s3_endpoint_url!r} is not an http(s)://host[:port] URL"
                    )

    @property
    def s3_location(self) -> S3Location | None:
        return parse_storage(self.storage)

    @property
    def effective_sweep_interval(self) -> float:
        if self.sweep_interval is not None:
            return self.sweep_interval
        return min(3600.0, self.pending_ttl / 4)


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)
