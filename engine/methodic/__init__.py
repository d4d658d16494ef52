"""methodic: crash-safe background uploads of ML checkpoints to a Chronicle server."""

import sys as _sys

# httpx imports its command-line client (and with it rich, ~30 ms) whenever rich is installed,
# which it always is beside methodic-tui. The engine must load no UI library, so keep httpx's
# CLI module out unless something imported httpx first; `httpx` the command is unaffected.
if "httpx" not in _sys.modules:
    _sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from methodic._bandwidth import parse_rate
from methodic._client import AsyncChronicle, AsyncRun
from methodic._errors import (
    AssetIncompleteError,
    AuthenticationError,
    ChronicleError,
    ConflictError,
    DownloadError,
    InvalidInputError,
    NotFoundError,
    ServerError,
    TrackerError,
    UploadFailedError,
)
from methodic._events import (
    AssetFinalized,
    AssetSnapshot,
    AssetStateChanged,
    BandwidthSample,
    ComponentProgress,
    ComponentSnapshot,
    ComponentStateChanged,
    Event,
    PoolSnapshot,
    RanksChanged,
    RateMeter,
    RetryScheduled,
    Subscription,
)
from methodic._recovery import (
    DrainReport,
    adopt_incomplete_uploads,
    drain_incomplete_uploads_async,
)
from methodic._retry import RetryPolicy
from methodic._scan import scan_directory
from methodic._sessions import CommandResult, UploaderSession
from methodic._states import (
    DONE_STATES,
    HELD_STATES,
    IN_FLIGHT_STATES,
    UNFINISHED_STATES,
    AssetState,
    ComponentState,
    DownloadState,
)
from methodic._sync import (
    Chronicle,
    EventStream,
    LoopThread,
    Run,
    UploadHandle,
    drain_incomplete_uploads,
)
from methodic._tracker import UploadTracker
from methodic._types import (
    Asset,
    ComponentSpec,
    PresignedAsset,
    RankContribution,
    RemoteComponent,
    RunBinding,
    TrackedAsset,
    TrackedComponent,
    UploadTarget,
)
from methodic._uploads import AsyncUploadHandle

__version__ = "0.1.0"

__all__ = [
    "DONE_STATES",
    "HELD_STATES",
    "IN_FLIGHT_STATES",
    "UNFINISHED_STATES",
    "Asset",
    "AssetFinalized",
    "AssetIncompleteError",
    "AssetSnapshot",
    "AssetState",
    "AssetStateChanged",
    "AsyncChronicle",
    "AsyncRun",
    "AsyncUploadHandle",
    "AuthenticationError",
    "BandwidthSample",
    "Chronicle",
    "ChronicleError",
    "CommandResult",
    "ComponentProgress",
    "ComponentSnapshot",
    "ComponentSpec",
    "ComponentState",
    "ComponentStateChanged",
    "ConflictError",
    "DownloadError",
    "DownloadState",
    "DrainReport",
    "Event",
    "EventStream",
    "InvalidInputError",
    "LoopThread",
    "NotFoundError",
    "PoolSnapshot",
    "PresignedAsset",
    "RankContribution",
    "RanksChanged",
    "RateMeter",
    "RemoteComponent",
    "RetryPolicy",
    "RetryScheduled",
    "Run",
    "RunBinding",
    "ServerError",
    "Subscription",
    "TrackedAsset",
    "TrackedComponent",
    "TrackerError",
    "UploadFailedError",
    "UploadHandle",
    "UploadTarget",
    "UploadTracker",
    "UploaderSession",
    "__version__",
    "adopt_incomplete_uploads",
    "drain_incomplete_uploads",
    "drain_incomplete_uploads_async",
    "parse_rate",
    "scan_directory",
]
