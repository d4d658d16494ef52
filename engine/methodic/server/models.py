"""Request and response schemas of the control API (they also make /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
RunStatus = Literal["running", "succeeded", "failed"]


class ErrorBody(BaseModel):
    """``code`` and ``message``, plus extra fields some errors carry (``missing``, ``errors``)."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class ExperimentCreate(BaseModel):
    name: str = Field(min_length=1, max_length=1024)


class Experiment(BaseModel):
    id: str
    name: str
    created_at: float


class ExperimentList(BaseModel):
    experiments: list[Experiment]


class Run(BaseModel):
    id: str
    experiment_id: str
    variation: int
    run: int
    status: RunStatus
    created_at: float
    updated_at: float


class RunStatusUpdate(BaseModel):
    status: RunStatus


class ComponentIn(BaseModel):
    path: str
    size: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    part_size: int | None = Field(default=None, ge=1)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value is not None else None


class AssetCreate(BaseModel):
    asset_id: str
    asset_type: str = Field(min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    components: list[ComponentIn]
    presign: bool = False


class ComponentOut(BaseModel):
    path: str
    size: int
    sha256: str | None
    part_size: int | None
    stored: bool
    parts_stored: list[int]


class Target(BaseModel):
    path: str
    part: int | None
    method: Literal["PUT"]
    url: str
    headers: dict[str, str]
    offset: int
    length: int
    expires_at: float


class AssetSummary(BaseModel):
    asset_id: str
    run_id: str
    experiment_id: str
    asset_type: str
    state: Literal["pending", "finalized"]
    metadata: dict[str, Any]
    created_at: float
    finalized_at: float | None
    component_count: int
    total_size: int


class Asset(AssetSummary):
    components: list[ComponentOut] | None = None
    targets: list[Target] | None = None
    # With "presign": true: how many PUTs the targets leave out (get them from .../presign).
    targets_remaining: int | None = None


class AssetList(BaseModel):
    assets: list[AssetSummary]


class PresignItem(BaseModel):
    path: str
    part: int | None = None


class PresignRequest(BaseModel):
    targets: list[PresignItem]


class TargetList(BaseModel):
    targets: list[Target]


class FinalizeRequest(BaseModel):
    checksums: dict[str, str] = Field(default_factory=dict)

    @field_validator("checksums")
    @classmethod
    def _hex(cls, value: dict[str, str]) -> dict[str, str]:
        for path, digest in value.items():
            if len(digest) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digest):
                raise ValueError(f"checksum of {path!r} is not a sha256 hex digest")
        return {path: digest.lower() for path, digest in value.items()}


class DownloadComponent(BaseModel):
    path: str
    size: int
    sha256: str | None
    url: str


class Download(BaseModel):
    asset: Asset
    components: list[DownloadComponent]
