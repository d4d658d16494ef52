"""The states of an asset and of a component, and the sets derived from them, defined once.

Members are ``str`` (``StrEnum``): they compare equal to the plain strings stored in the
tracker and sent in events, so ``state == "paused"`` and ``state in DONE_STATES`` both work.
"""

from __future__ import annotations

from enum import StrEnum


class AssetState(StrEnum):
    """An asset on the uploading side: ``registered -> uploading -> finalizing -> finalized``."""

    REGISTERED = "registered"
    UPLOADING = "uploading"
    FINALIZING = "finalizing"
    FINALIZED = "finalized"
    PAUSED = "paused"
    FAILED = "failed"
    DISCARDED = "discarded"
    # Shown by a pool for an earlier process's upload it holds until an operator acts; never
    # written to a tracker (there it keeps the state the earlier process left).
    INTERRUPTED = "interrupted"


class ComponentState(StrEnum):
    """One file of an asset: ``queued -> uploading -> completed``, or ``failed``."""

    QUEUED = "queued"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"


class DownloadState(StrEnum):
    """A download as a pool shows it (``download_asset``): never in a tracker."""

    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    PAUSED = "paused"
    FAILED = "failed"
    CANCELLED = "cancelled"


DONE_STATES = frozenset(
    {AssetState.FINALIZED, AssetState.DISCARDED, DownloadState.DOWNLOADED, DownloadState.CANCELLED}
)
"""Nothing more will happen to an asset (or a download) in these states."""

UNFINISHED_STATES = frozenset(AssetState) - DONE_STATES - {AssetState.INTERRUPTED}  # tracker states
"""Tracker states of an asset some process still has to finish (or an operator to discard)."""

IN_FLIGHT_STATES = frozenset(
    {AssetState.REGISTERED, AssetState.UPLOADING, AssetState.FINALIZING, DownloadState.DOWNLOADING}
)
"""A pool is working on an asset in these states."""

HELD_STATES = frozenset({AssetState.PAUSED, AssetState.INTERRUPTED})
"""Waiting for an operator to resume it."""

SENDING_STATES = frozenset({AssetState.REGISTERED, AssetState.UPLOADING, DownloadState.DOWNLOADING})
"""An asset whose bytes are being sent (or fetched), or are about to be: what ``pause`` stops."""

SETTLED_COMPONENT_STATES = frozenset({ComponentState.COMPLETED, ComponentState.FAILED})
"""A component no worker sends until someone retries it."""
