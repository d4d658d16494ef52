"""Request and response schemas of the control API (they also make /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from typing_extensions import TypedDict

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


# Lowercased once valid: the manifest's digest and the stored rows see one spelling.
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN, to_lower=True)]


class ComponentIn(TypedDict):
    """One manifest entry. A dict, not a model: a create validates 10,000 of them, and
    building as many model instances cost more than the rest of the create (bulk.py)."""

    path: str
    size: Annotated[int, Field(ge=0)]
    sha256: NotRequired[Sha256Hex | None]
    part_size: NotRequired[Annotated[int, Field(ge=1)] | None]


class ManifestDeclared(BaseModel):
    """The whole manifest of a create that carries only its first components: the rest are
    appended (``POST /assets/{id}/components``) and checked against this when the last is in."""

    component_count: int = Field(ge=1)
    total_size: int = Field(ge=0, le=2**63 - 1)
    digest: Sha256Hex  # manifest_digest() of the whole manifest


class AssetCreate(BaseModel):
    asset_id: str
    asset_type: str = Field(min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    components: list[ComponentIn]
    presign: bool = False
    # The digest algorithm of every range digest and whole-file checksum of this asset
    # (None: the server's default, crc64nvme). A repeated create keeps the first one.
    checksum_algorithm: Literal["crc64nvme", "sha256", "blake3"] | None = None
    # The answer leaves its components out (``[]``): a client that knows its manifest does not
    # read back 100,000 of them.
    brief: bool = False
    # A contribution of a multi-rank asset (docs/distributed.md): rank ``rank`` of
    # ``world_size`` joins the asset named ``asset_name`` of the run (all three, or none).
    asset_name: str | None = Field(default=None, min_length=1, max_length=256)
    rank: int | None = Field(default=None, ge=0)
    world_size: int | None = Field(default=None, ge=1, le=1_000_000)
    # Set when ``components`` is only the first slice of the manifest (not for a rank).
    manifest: ManifestDeclared | None = None


class ComponentsAppend(BaseModel):
    """More components of a manifest sent in slices, in any order; one already listed must be
    the same (sending it again is a no-op)."""

    components: list[ComponentIn]


class Contribution(BaseModel):
    rank: int
    state: Literal["registered", "stored"]
    component_count: int
    total_size: int
    registered_at: float
    seen_at: float
    stored_at: float | None


class ComponentOut(BaseModel):
    path: str
    size: int
    sha256: str | None
    checksum: str | None  # the settled whole-file checksum "algo:value", once finalized
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
    checksum_algorithm: str | None  # None: an asset from before algorithms (sha256, legacy)
    # False while a manifest sent in slices still has components to come: then
    # ``component_count`` and ``total_size`` are the declared ones, and it cannot be finalized.
    manifest_complete: bool = True
    # The manifest's canonical digest (methodic._manifest; the declared one while incomplete):
    # a client that resumes compares it with its own. None for a multi-rank asset.
    manifest_digest: str | None = None
    # Of a multi-rank asset only: its name, world size, each rank's contribution so far, the
    # ranks not yet stored, and an operator's one-line account ("waiting for ranks 5, 7 ...").
    asset_name: str | None = None
    world_size: int | None = None
    contributions: list[Contribution] | None = None
    ranks_missing: list[int] | None = None
    waiting: str | None = None
    # Only in the summary (``?components=false``) of a finalized asset the run's retention
    # deleted since: when it did.
    retired_at: float | None = None


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
    # Lowercase hex digest of exactly this range's bytes in the asset's algorithm: bound
    # into the target, so the receiver refuses a body with another digest.
    checksum: str | None = Field(default=None, max_length=128)


class RetentionSet(BaseModel):
    asset_type: str = Field(min_length=1, max_length=256)
    keep_last: int = Field(ge=1, le=1_000_000)


class Retention(BaseModel):
    run_id: str
    asset_type: str
    keep_last: int
    deleted: list[str]


class PresignRequest(BaseModel):
    targets: list[PresignItem]


class TargetList(BaseModel):
    targets: list[Target]


class FinalizeRequest(BaseModel):
    # {path: "algo:value"}: each component's whole-file checksum (docs/http-api.md).
    checksums: dict[str, str] = Field(default_factory=dict)
    # Of a multi-rank asset: the rank whose contribution is complete (its components only
    # are verified; the asset is finalized once every rank's is stored).
    rank: int | None = Field(default=None, ge=0)
    # The answer without its components, with their fingerprint instead (docs/http-api.md).
    brief: bool = False


class DownloadComponent(BaseModel):
    path: str
    size: int
    sha256: str | None
    checksum: str | None
    part_size: int | None
    url: str


class Download(BaseModel):
    asset: Asset
    components: list[DownloadComponent]
